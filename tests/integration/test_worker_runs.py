"""The in-process worker: retries with backoff, timeouts, results, unknown or corrupt rows, job context, waiting."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fasthtml.common import P
from integration_support import insert_row, wait_until
from starlette.testclient import TestClient

from fh_tasks import JobCancelled, JobFailed, Retry, current_job


def test_retries_wait_longer_each_time_and_the_last_error_is_stored(site):
    # Given a task that always fails, with three retries from 0.05 s
    app, _, tasks = site()
    stamps: list[float] = []

    @tasks.task(retries=3, retry_delay=0.05)
    def flaky(x: int) -> None:
        stamps.append(time.monotonic())
        raise ValueError(f"attempt {len(stamps)} of {x} broke")

    with TestClient(app):
        # When it runs
        rec = flaky.defer(7).wait(10)
    # Then it was tried four times, each wait at least the doubled backoff
    assert (rec.state, rec.attempts, len(stamps)) == ("failed", 4, 4)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.10 and gaps[2] >= 0.20, gaps
    assert gaps[2] > gaps[0]
    # And the final error's type, message and traceback are stored
    assert rec.error["type"] == "ValueError" and rec.error["message"] == "attempt 4 of 7 broke"
    assert "in flaky" in rec.error["traceback"] and "ValueError: attempt 4 of 7 broke" in rec.error["traceback"]
    assert rec.finished_at is not None and rec.result is None


def test_a_retry_that_succeeds_clears_the_error(site):
    app, _, tasks = site()
    calls: list[int] = []

    @tasks.task(retries=2, retry_delay=0.01)
    def second_time_lucky() -> str:
        calls.append(1)
        if len(calls) == 1: raise ConnectionError("flaky network")
        return "ok"

    with TestClient(app):
        rec = second_time_lucky.defer().wait(10)
    assert (rec.state, rec.attempts, rec.result, rec.error) == ("succeeded", 2, "ok", None)


def test_task_can_ask_for_a_retry_after_a_delay(site):
    # Given a task that raises Retry(delay=0.2) on its first attempt, though its own backoff is tiny
    app, _, tasks = site()
    stamps: list[float] = []

    @tasks.task(retries=1, retry_delay=0.001)
    def later() -> int:
        stamps.append(time.monotonic())
        if len(stamps) == 1: raise Retry("not ready", delay=0.2)
        return len(stamps)

    with TestClient(app):
        rec = later.defer().wait(10)
    # Then the second attempt came no sooner than asked
    assert (rec.state, rec.result) == ("succeeded", 2)
    assert stamps[1] - stamps[0] >= 0.2


def test_retry_without_attempts_left_fails(site):
    app, _, tasks = site()

    @tasks.task
    def never() -> None: raise Retry("still not ready", delay=0.01)

    with TestClient(app):
        rec = never.defer().wait(10)
    assert (rec.state, rec.attempts, rec.error["type"]) == ("failed", 1, "Retry")
    assert rec.error["message"] == "still not ready"


def test_timeout_fails_an_async_task(site):
    # Given an async task that would run for a minute, with a 0.1 s timeout
    app, _, tasks = site()
    cancelled = threading.Event()

    @tasks.task(timeout=0.1)
    async def stuck() -> None:
        try: await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with TestClient(app):
        # When it runs, Then it fails with TaskTimeout and the coroutine is cancelled
        rec = stuck.defer().wait(10)
        assert (rec.state, rec.error["type"]) == ("failed", "TaskTimeout")
        assert "0.1s timeout" in rec.error["message"]
        assert cancelled.wait(5)


def test_timeout_fails_a_sync_task(site):
    app, _, tasks = site()
    release = threading.Event()

    @tasks.task(timeout=0.1)
    def stuck() -> None: release.wait(10)

    with TestClient(app):
        try:
            rec = stuck.defer().wait(5)
            assert (rec.state, rec.attempts, rec.error["type"]) == ("failed", 1, "TaskTimeout")
        finally:
            release.set()


def test_timeout_with_retries_left_retries(site):
    # Given an async task that hangs on its first attempt only
    app, _, tasks = site()
    attempts: list[int] = []

    @tasks.task(timeout=0.1, retries=1, retry_delay=0.01)
    async def hangs_once() -> int:
        attempts.append(current_job().attempt)
        if len(attempts) == 1: await asyncio.sleep(60)
        return len(attempts)

    with TestClient(app):
        rec = hangs_once.defer().wait(10)
    assert (rec.state, rec.attempts, rec.result) == ("succeeded", 2, 2)
    assert attempts == [1, 2]


def test_sync_task_that_outlives_its_timeout_does_not_hide_its_retry(site):
    # Given a sync task whose first attempt overruns its timeout and keeps its thread,
    # and whose second attempt is still running when the first attempt's thread finally returns
    app, _, tasks = site(grace=0.1)
    first_go, second_started, second_go = threading.Event(), threading.Event(), threading.Event()
    first_back = threading.Event()

    @tasks.task(timeout=1.0, retries=1, retry_delay=0.01)
    def overrun() -> str:
        if current_job().attempt == 1:
            first_go.wait(10)
            first_back.set()
            return "first"
        second_started.set()
        second_go.wait(10)
        return "second"

    try:
        with TestClient(app):
            job = overrun.defer()
            assert second_started.wait(10)
            first_go.set()
            assert first_back.wait(5)
            time.sleep(0.1)  # let the worker see the first attempt's thread return
            # When the app stops while the second attempt still runs past the grace period
        # Then the worker still knew about the second attempt and gave it back to the queue
        rec = job.get()
        assert (rec.state, rec.attempts, rec.worker) == ("queued", 1, None)
    finally:
        first_go.set()
        second_go.set()


def test_non_json_result_fails_clearly(site):
    app, _, tasks = site()

    @tasks.task
    def returns_a_set() -> set:
        return {1, 2}

    with TestClient(app):
        rec = returns_a_set.defer().wait(10)
    assert (rec.state, rec.error["type"]) == ("failed", "ResultError")
    assert "returned a value that cannot be stored" in rec.error["message"] and "is a set" in rec.error["message"]


def test_jobs_of_unknown_tasks_stay_queued_for_a_worker_that_can_run_them(site, db, tmp_path):
    # Given a running app, and rows naming os:system and an unknown task written straight into the store
    app, _, tasks = site()
    marker = tmp_path / "os-system-was-called"

    @tasks.task
    def good(x: int) -> int: return x + 1

    with TestClient(app):
        good.defer(0).wait(10)
        evil = insert_row(db, "os:system", f'{{"args": ["touch {marker}"], "kwargs": {{}}}}', max_attempts=3)
        nope = insert_row(db, "nope", '{"kwargs": {}}')
        # When the worker serves jobs deferred after them
        after = good.defer(41).wait(10)
        bad = [tasks.get(i) for i in (evil, nope)]
    # Then it never claims them (another app, or a newer deploy, may run them): queued, no attempt charged, no error
    for rec in bad:
        assert rec is not None and (rec.state, rec.attempts, rec.error, rec.worker) == ("queued", 0, None, None)
    assert after.result == 42
    # And nothing named by the row was imported or called
    assert not marker.exists()


@pytest.mark.parametrize("args", ["not json at all", "[1, 2]", '{"args": "x", "kwargs": {}}'])
def test_undecodable_arguments_fail_with_decode_error(site, db, args):
    app, _, tasks = site()
    ran: list[int] = []

    @tasks.task(name="registered")
    def registered(*a: object) -> None: ran.append(1)

    with TestClient(app):
        jid = insert_row(db, "registered", args, max_attempts=3)
        rec = wait_until(lambda: (r := tasks.get(jid)) and r.done and r, what="the corrupt job")
    assert (rec.state, rec.attempts, rec.error["type"]) == ("failed", 1, "DecodeError")
    assert ran == []


def test_current_job_inside_sync_and_async_tasks(site):
    app, _, tasks = site()

    @tasks.task(retries=1, retry_delay=0.01)
    def sync_me() -> dict:
        ctx = current_job()
        if ctx.attempt == 1: raise RuntimeError("again")
        return {"id": ctx.id, "task": ctx.task, "attempt": ctx.attempt, "max": ctx.max_attempts}

    @tasks.task
    async def async_me() -> dict:
        ctx = current_job()
        return {"id": ctx.id, "task": ctx.task, "attempt": ctx.attempt, "max": ctx.max_attempts}

    with TestClient(app):
        s, a = sync_me.defer(), async_me.defer()
        assert s.result(10) == {"id": s.id, "task": sync_me.name, "attempt": 2, "max": 2}
        assert a.result(10) == {"id": a.id, "task": async_me.name, "attempt": 1, "max": 1}


def test_current_job_outside_a_task_is_an_error():
    with pytest.raises(RuntimeError, match="only available inside a task"):
        current_job()


def test_progress_is_stored_while_running(site):
    app, _, tasks = site()
    go = threading.Event()

    @tasks.task
    def long_job() -> str:
        assert current_job().progress({"done": 1, "total": 3})
        go.wait(10)
        current_job().progress({"done": 3, "total": 3})
        return "done"

    with TestClient(app):
        job = long_job.defer()
        try:
            rec = wait_until(lambda: (r := job.get()) and r.progress and r, what="progress")
            assert (rec.state, rec.progress) == ("running", {"done": 1, "total": 3})
        finally:
            go.set()
        rec = job.wait(10)
    assert (rec.state, rec.progress) == ("succeeded", {"done": 3, "total": 3})


def test_wait_result_and_wait_async(site):
    app, _, tasks = site()
    go = threading.Event()

    @tasks.task
    def add(a: int, b: int) -> int:
        go.wait(10)
        return a + b

    @tasks.task
    def bad() -> None: raise KeyError("missing")

    with TestClient(app):
        job = add.defer(2, b=3)
        try:
            # A job not finished in time raises TimeoutError naming it
            with pytest.raises(TimeoutError, match=job.id):
                job.wait(timeout=0.05)
        finally:
            go.set()
        assert job.result(10) == 5
        assert asyncio.run(add.defer(4, 5).wait_async(10)).result == 9
        # A failed job's result() raises JobFailed with the error
        with pytest.raises(JobFailed, match=r"KeyError: 'missing'"):
            bad.defer().result(10)


def test_wait_on_the_workers_own_loop_is_refused(site):
    # Given an async handler (it runs on the loop the in-process worker uses)
    app, rt, tasks = site()

    @tasks.task
    def noop() -> None: ...

    jobs = []

    @rt("/block")
    async def block():
        jobs[0].wait(1)
        return P("unreachable")

    with TestClient(app, raise_server_exceptions=True) as cli:
        jobs.append(noop.defer())  # stored at once, outside any request
        # When the handler blocks on it, Then it is told to await wait_async() instead
        with pytest.raises(RuntimeError, match="wait_async"):
            cli.get("/block")


def test_cancel_a_job_that_has_not_started(site):
    app, _, tasks = site()
    ran: list[str] = []
    go = threading.Event()

    @tasks.task
    def note(x: str) -> None:
        ran.append(x)
        go.wait(10)

    with TestClient(app):
        later = note.with_options(delay=60).defer("later")
        running = note.defer("now")
        wait_until(lambda: running.state == "running", what="running")
        try:
            # When each is cancelled
            assert tasks.cancel(later.id) is True
            assert tasks.cancel(running.id) is False
        finally:
            go.set()
        # Then only the one that had not started is cancelled, and it never runs
        assert running.wait(10).state == "succeeded"
        rec = later.get()
        assert rec.state == "cancelled" and rec.done
        with pytest.raises(JobCancelled):
            later.result(1)
        assert tasks.cancel("no-such-id") is False
    assert ran == ["now"]


def test_a_task_deferring_another_job(site):
    app, _, tasks = site()

    @tasks.task
    def child(n: int) -> int: return n * 10

    @tasks.task
    async def parent(n: int) -> str:
        return child.defer(n).id

    with TestClient(app):
        child_id = parent.defer(4).result(10)
        rec = wait_until(lambda: (r := tasks.get(child_id)) and r.done and r, what="the child")
    assert rec.result == 40


def test_app_shutdown_gives_unfinished_jobs_back_uncharged(site, make_tasks, db):
    # Given a running async job that outlasts the shutdown grace period
    app, _, tasks = site(grace=0.1)
    runs: list[int] = []

    @tasks.task(name="long")
    async def long() -> str:
        runs.append(current_job().attempt)
        if len(runs) == 1: await asyncio.sleep(60)
        return "finished"

    with TestClient(app):
        job = long.defer()
        wait_until(lambda: job.state == "running", what="running")
        # When the app stops
    # Then the job is queued again and its attempt is not charged
    rec = job.get()
    assert (rec.state, rec.attempts, rec.worker) == ("queued", 0, None)
    # And the next start of the app runs it, as attempt 1
    with TestClient(app):
        assert job.result(10) == "finished"
    assert runs == [1, 1]


def test_heartbeats_keep_a_long_job_leased(site):
    # Given a lease of 0.3 s and a job that runs for 1.3 s (past a lease sweep)
    app, _, tasks = site(lease=0.3)
    runs: list[int] = []

    @tasks.task
    def slow() -> None:
        runs.append(1)
        time.sleep(1.3)

    with TestClient(app):
        rec = slow.defer().wait(10)
    # Then it was never taken back and run again
    assert (rec.state, rec.attempts, rec.error) == ("succeeded", 1, None)
    assert runs == [1]


def test_sys_exit_in_a_task_fails_the_job_not_the_app(site):
    # Given tasks that call sys.exit(), as code written for the command line does
    import sys
    app, rt, tasks = site()

    @tasks.task
    async def exits_async() -> None: sys.exit(3)

    @tasks.task
    def exits_sync() -> None: sys.exit(4)

    @tasks.task
    def ok() -> str: return "still serving"

    @rt("/ping")
    def ping(): return P("pong")

    with TestClient(app) as cli:
        # When they run
        a, s = exits_async.defer().wait(10), exits_sync.defer().wait(10)
        # Then each job fails with SystemExit, and the app and its worker keep going
        assert (a.state, a.error["type"], a.error["message"]) == ("failed", "SystemExit", "3")
        assert (s.state, s.error["type"], s.error["message"]) == ("failed", "SystemExit", "4")
        assert "sys.exit(3)" in a.error["traceback"]
        assert ok.defer().result(10) == "still serving"
        assert cli.get("/ping").status_code == 200


def test_a_worker_whose_idle_reads_fail_goes_on_and_runs_the_job(tmp_path, caplog):
    # Given a worker waiting for a delayed job, and a store whose idle reads (when is the next job due, did another
    # process commit) fail a few times, as a store on a failing disk would
    from fh_tasks import QueueUnavailable, Tasks
    tasks = Tasks(db=str(tmp_path / "jobs.db"), workers=0)

    @tasks.task(name="idle.later")
    def later() -> str:
        return "ran"

    job = later.with_options(delay=0.4).defer()
    store, failures = tasks.store, {"next_due": 2, "data_version": 2}
    for name in failures:
        real = getattr(store, name)

        def failing(*a, _name=name, _real=real, **k):
            if failures[_name] > 0:
                failures[_name] -= 1
                raise QueueUnavailable(f"cannot read job store: disk I/O error ({_name})")
            return _real(*a, **k)
        setattr(store, name, failing)
    worker = tasks.worker(concurrency=1, poll_interval=0.1)

    async def run() -> None:
        running = asyncio.ensure_future(worker.run())
        while tasks.get(job.id).state != "succeeded" and not running.done(): await asyncio.sleep(0.05)
        worker.stop()
        await asyncio.wait_for(running, 10)

    # When it runs
    asyncio.run(run())
    # Then it logged the failed reads, went on, and ran the job once it was due
    assert failures == {"next_due": 0, "data_version": 0}
    assert tasks.get(job.id).state == "succeeded" and tasks.get(job.id).result == "ran"
    assert "could not read" in caplog.text
    tasks.store.close()
