"""The hub outside requests and in test modes: immediate storing, eager runs, drain, management calls, exports."""
from __future__ import annotations

import threading
import time

import pytest
from fasthtml.common import P
from starlette.testclient import TestClient

import fh_tasks
from fh_tasks import JobState, Tasks
from fh_tasks.testing import drain, eager


def test_defer_outside_a_request_stores_at_once(make_tasks):
    # Given a hub with no workers
    tasks = make_tasks(workers=0)

    @tasks.task
    def later(x: int) -> int: return x

    # When code outside a request defers a job
    job = later.defer(5)
    # Then the row is there before defer() returns, queued, with its arguments
    rec = job.get()
    assert job.stored and rec is not None
    assert (rec.state, rec.args, rec.kwargs, rec.attempts, rec.task) == ("queued", [5], {}, 0, later.name)
    assert rec.created_at <= time.time() and rec.started_at is None and rec.finished_at is None


def test_eager_mode_runs_request_jobs_inline_with_retries(site):
    # Given an eager hub and a task that fails twice before it succeeds, with long backoffs
    app, rt, tasks = site(eager=True)
    calls: list[int] = []

    @tasks.task(retries=2, retry_delay=30)
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3: raise RuntimeError("not yet")
        return x * 2

    @rt("/go")
    def go():
        job = flaky.defer(4)
        return P(job.id, id="jid"), job

    with TestClient(app) as cli:
        # When a handler defers it
        r = cli.get("/go")
        jid = r.text.split('id="jid">')[1].split("<")[0]
        # Then it has finished when the response arrives, retries included and backoffs skipped
        rec = tasks.get(jid)
        assert (rec.state, rec.attempts, rec.result) == ("succeeded", 3, 8)
    assert calls == [4, 4, 4]


def test_eager_mode_outside_a_request(make_tasks):
    tasks = make_tasks(workers=0, eager=True)
    seen: list[int] = []

    @tasks.task
    def child(n: int) -> None: seen.append(n)

    @tasks.task
    def parent(n: int) -> None:
        seen.append(n)
        child.defer(n + 1)

    job = parent.defer(1)
    # The job and the job it deferred have run when defer() returns
    assert job.get().state == "succeeded"
    assert seen == [1, 2] and tasks.counts() == {"succeeded": 2}


def test_eager_function_switches_a_hub(make_tasks):
    tasks = eager(make_tasks(workers=0))

    @tasks.task
    def one() -> int: return 1

    assert one.defer().get().result == 1


def test_drain_runs_everything_due_and_returns(make_tasks):
    # Given a hub without workers, with good, retried, failing and scheduled jobs queued
    tasks = make_tasks(workers=0)
    tries: list[int] = []

    @tasks.task
    def ok(x: int) -> int: return x

    @tasks.task(retries=2, retry_delay=60)
    def twice() -> int:
        tries.append(1)
        if len(tries) < 2: raise ValueError("first try")
        return len(tries)

    @tasks.task
    def broken() -> None: raise ValueError("always")

    jobs = [ok.defer(1), ok.defer(2), twice.defer(), broken.defer()]
    later = ok.with_options(delay=3600).defer(3)
    # When the queue is drained
    recorded = drain(tasks)
    # Then every due job is final (the retry ran at once), the scheduled one still waits
    assert [j.get().state for j in jobs] == ["succeeded", "succeeded", "succeeded", "failed"]
    assert jobs[2].get().attempts == 2 and recorded == 5
    assert later.get().state == "scheduled"
    assert drain(tasks) == 0


def test_drain_from_inside_a_running_loop(make_tasks):
    import asyncio
    tasks = make_tasks(workers=0)

    @tasks.task
    async def hello() -> str: return "hi"

    async def main() -> str:
        job = hello.defer()
        drain(tasks)
        return job.get().result

    assert asyncio.run(main()) == "hi"


def test_retry_and_prune_through_the_hub(make_tasks):
    # Given a job that failed
    tasks = make_tasks(workers=0)
    fail = [True]

    @tasks.task
    def sometimes() -> str:
        if fail[0]: raise RuntimeError("down")
        return "up"

    job = sometimes.defer()
    drain(tasks)
    assert job.get().state == "failed"
    # When it is retried after the cause is fixed
    fail[0] = False
    assert tasks.retry(job.id) is True and job.get().state == "queued"
    drain(tasks)
    # Then it succeeds on a fresh attempt: its second run, the first of its new budget
    rec = job.get()
    assert (rec.state, rec.attempts, rec.max_attempts, rec.result) == ("succeeded", 2, 2, "up")
    assert tasks.retry(job.id) is False
    # And prune removes finished jobs older than asked, not newer ones
    assert tasks.prune(older_than=3600) == 0
    assert tasks.prune(older_than=-1) == 1 and tasks.get(job.id) is None


def test_listing_through_the_hub(make_tasks):
    tasks = make_tasks(workers=0)

    @tasks.task
    def a(n: int) -> None: ...

    @tasks.task
    def b() -> None: raise ValueError("b")

    for i in range(3): a.defer(i)
    b.defer()
    drain(tasks)
    assert tasks.counts() == {"succeeded": 3, "failed": 1}
    assert [r.args for r in tasks.jobs(task=a, limit=2)] == [[2], [1]]
    assert [r.task for r in tasks.jobs(state=JobState.failed)] == [b.name]
    assert tasks.jobs(state="succeeded", task=b) == []
    with pytest.raises(ValueError):
        tasks.jobs(state="finished")


def test_full_durability_group_commit_from_many_threads(make_tasks):
    # Given a hub that fsyncs every commit
    tasks = make_tasks(workers=0, durability="full")

    @tasks.task
    def n(i: int) -> int: return i

    # When eight threads defer 25 jobs each at the same time
    ids: list[str] = []
    lock = threading.Lock()

    def burst(k: int) -> None:
        for i in range(25):
            j = n.defer(k * 100 + i)
            with lock: ids.append(j.id)

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    # Then every job is stored once and runs
    assert len(set(ids)) == 200 and tasks.counts() == {"queued": 200}
    drain(tasks)
    assert tasks.counts() == {"succeeded": 200}


def test_star_import_exports_only_all():
    namespace: dict = {}
    exec("from fh_tasks import *", namespace)
    exported = set(namespace) - {"__builtins__"}
    assert exported == set(fh_tasks.__all__)
    assert {"Tasks", "BackgroundTasks", "Job", "current_job", "Retry", "ArgumentError"} <= exported
    assert all(getattr(fh_tasks, n) is namespace[n] for n in exported)


def test_hub_without_an_app_can_be_bound_later(make_tasks):
    from fasthtml.common import fast_app
    tasks = make_tasks(workers=1)
    app, rt = fast_app(secret_key="x")
    tasks.init_app(app)
    with pytest.raises(RuntimeError, match="already bound"):
        tasks.init_app(app)

    @tasks.task
    def ping() -> str: return "pong"

    with TestClient(app):
        assert ping.defer().result(10) == "pong"


def test_two_hubs_on_two_files(tmp_path):
    # Given two hubs on separate files
    a, b = Tasks(db=str(tmp_path / "a.db"), workers=0), Tasks(db=str(tmp_path / "b.db"), workers=0)

    @a.task(name="shared")
    def on_a() -> str: return "a"

    @b.task(name="shared")
    def on_b() -> str: return "b"

    # When each defers and drains
    ja, jb = on_a.defer(), on_b.defer()
    drain(a)
    drain(b)
    # Then each ran its own function on its own store
    assert (ja.get().result, jb.get().result) == ("a", "b")
    assert a.get(jb.id) is None and b.get(ja.id) is None
    a.store.close()
    b.store.close()


def test_workers_serve_every_registered_tasks_queue_unless_told_otherwise(make_tasks):
    # Given a hub with a task on its own queue, and a hub told to serve one queue only
    tasks = make_tasks()

    @tasks.task(queue="emails")
    def send() -> None: ...

    only = make_tasks(db=tasks.store.path + ".2", queues=["reports"])
    # Then the first serves "default" and "emails", the second just "reports"
    assert tasks.queues == ("default", "emails") and tasks.worker().queues == ("default", "emails")
    assert only.queues == ("reports",)
