"""Uniqueness keys (`with_options(key=...)`) on the SQLite engine: one live job per key, whoever defers it and however
many at once; the caller gets the live job's id; in a request, at defer time and (in a race) at the commit."""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from fasthtml.common import P
from starlette.testclient import TestClient

from fh_tasks import Tasks
from fh_tasks.records import NewJob
from fh_tasks.task import new_id


def keyed(tasks: Tasks) -> Any:
    @tasks.task(name="uniq:sync")
    def sync(user: int) -> int: return user
    return sync


def rows(tasks: Tasks, key: str) -> list[Any]:
    return tasks.store._read("SELECT id, state FROM fh_jobs WHERE ukey = ? ORDER BY seq", (key,))


def test_concurrent_defers_from_8_threads_store_one_job_and_all_get_its_id(db):
    # Given 8 hubs on one store file (8 connections), each deferring from its own thread at the same moment
    hubs = [Tasks(db=db, workers=0) for _ in range(8)]
    try:
        tasks = [keyed(h) for h in hubs]
        go, ids = threading.Barrier(8), [""] * 8

        def defer(i: int) -> None:
            go.wait()
            ids[i] = tasks[i].with_options(key="user:42").defer(i).id

        threads = [threading.Thread(target=defer, args=(i,)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        # Then exactly one job is stored, and every caller got its id
        stored = rows(hubs[0], "user:42")
        assert len(stored) == 1 and set(ids) == {stored[0][0]}
        assert hubs[0].get(ids[0]).args[0] in range(8)  # the arguments of whichever call won
    finally:
        for h in hubs: h.close()


def test_the_key_is_free_again_once_the_job_finished(make_tasks):
    tasks = make_tasks(workers=0)
    sync = keyed(tasks)
    first = sync.with_options(key="k").defer(1)
    assert sync.with_options(key="k").defer(2).id == first.id
    assert [r.args for r in tasks.jobs()] == [[1]]
    asyncio.run(tasks.worker(burst=True).run())
    assert first.result() == 1
    # A new job with the same key is accepted, and is a job of its own
    second = sync.with_options(key="k").defer(3)
    assert second.id != first.id and tasks.get(second.id).state.value == "queued"
    # Other keys and keyless jobs never collide
    assert len({sync.with_options(key="k2").defer(4).id, sync.defer(5).id, sync.defer(5).id, second.id}) == 4


def test_a_retried_or_requeued_keyed_job_stays_unique(make_tasks):
    tasks = make_tasks(workers=0)

    @tasks.task(name="uniq:fail")
    def fail() -> None: raise ValueError("no")

    a = fail.with_options(key="f").defer()
    asyncio.run(tasks.worker(burst=True).run())
    b = fail.with_options(key="f").defer()  # a failed: the key is free
    assert b.id != a.id
    # Requeueing the failed one while b is live is refused (b does the work); once b ended it is allowed
    assert tasks.retry(a.id) is False
    asyncio.run(tasks.worker(burst=True).run())
    assert tasks.engine.retry_failed("uniq:fail") == 1  # the latest of the two failed jobs with that key
    assert [r[1] for r in rows(tasks, "f")] == ["failed", "queued"]


def test_defer_many_with_a_key_keeps_one_job_within_the_batch_and_against_stored_ones(make_tasks):
    tasks = make_tasks(workers=0)
    sync = keyed(tasks)
    jobs = sync.with_options(key="batch").defer_many([(1,), (2,), (3,)])
    assert len({j.id for j in jobs}) == 1 and len(rows(tasks, "batch")) == 1
    again = sync.with_options(key="batch").defer_many([(4,), (5,)])
    assert {j.id for j in again} == {jobs[0].id} and tasks.get(jobs[0].id).args == [1]


def test_after_enqueue_hooks_see_only_the_jobs_stored(make_tasks):
    from fh_tasks import Hook
    seen: list[str] = []

    class Seen(Hook):
        def after_enqueue(self, jobs: Any) -> None: seen.extend(j.id for j in jobs)

    tasks = make_tasks(workers=0, hooks=[Seen()])
    sync = keyed(tasks)
    first = sync.with_options(key="h").defer(1)
    sync.with_options(key="h").defer(2)
    assert seen == [first.id]


@pytest.mark.parametrize("key, error", [("", "non-empty"), ("x" * 201, "at most 200"), (42, "string")])
def test_bad_keys_are_refused_at_with_options(make_tasks, key, error):
    sync = keyed(make_tasks(workers=0))
    with pytest.raises(ValueError, match=rf"key must be a .*{error}.*\(task uniq:sync, with_options\)|key must be"):
        sync.with_options(key=key)
    with pytest.raises(TypeError, match=r"key= is given per call"):
        sync.hub.task(name="uniq:bad", key="k")(lambda: None)


def test_in_a_request_the_live_job_is_returned_at_defer_time(site):
    app, rt, tasks = site(workers=0)
    sync = keyed(tasks)
    handles: list[Any] = []

    @rt("/go/{user}")
    def get(user: int):
        job = sync.with_options(key=f"user:{user}").defer(user)
        handles.append(job)
        return P(job.id, id="job"), job

    with TestClient(app) as client:
        one = client.get("/go/7").text
        two = client.get("/go/7").text
        other = client.get("/go/8").text
    assert handles[0].id in one and handles[1].id == handles[0].id and handles[0].id in two
    assert handles[2].id in other and handles[2].id != handles[0].id
    assert len(rows(tasks, "user:7")) == 1 and len(tasks.jobs()) == 2


def test_a_duplicate_that_arrives_at_the_commit_does_not_fail_the_request(site):
    # Given a handler whose keyed job finds no live job at defer time, but another process stores one before the
    # response starts (simulated here by storing it directly)
    app, rt, tasks = site(workers=0)
    sync = keyed(tasks)
    handles: list[Any] = []
    racer = NewJob(id=new_id(), task="uniq:sync", args="[[99],{}]", key="race", created_at=1.0, run_at=1.0)

    @rt("/race")
    def get():
        job = sync.with_options(key="race").defer(1)
        handles.append((job, job.id))
        tasks.store.enqueue([racer])
        return P("ok"), job

    with TestClient(app) as client:
        r = client.get("/race")
    # Then the request succeeds, the duplicate is not stored, and the handle now names the live job
    assert r.status_code == 200
    job, deferred_as = handles[0]
    assert job.id == racer.id != deferred_as and job.stored
    assert [x[0] for x in rows(tasks, "race")] == [racer.id] and tasks.get(deferred_as) is None


def test_an_in_process_worker_never_takes_a_duplicate_through_the_handoff(site):
    app, rt, tasks = site(workers=1, concurrency=4)
    started = threading.Event()
    release = threading.Event()

    @tasks.task(name="uniq:hold")
    def hold() -> None:
        started.set()
        release.wait(10)

    @rt("/hold")
    def get():
        job = hold.with_options(key="one").defer()
        return P(job.id), job

    with TestClient(app) as client:
        first = client.get("/hold").text
        assert started.wait(10)
        second = client.get("/hold").text
        release.set()
    assert first == second and len(rows(tasks, "one")) == 1


def test_a_handed_off_duplicate_is_neither_stored_nor_claimed(tmp_path):
    from fh_tasks.store.sqlite import SQLiteStore
    store = SQLiteStore(tmp_path / "s.db")
    live = NewJob(id=new_id(), task="t", args="[[],{}]", key="k", created_at=1.0, run_at=1.0)
    store.enqueue([live])
    dup, fresh = (NewJob(id=new_id(), task="t", args="[[],{}]", key=k, created_at=1.0, run_at=1.0) for k in "kz")
    _, claims = store.enqueue_claimed([dup, fresh], 2, "w", 30.0)
    assert [c.id for c in claims] == [fresh.id] and dup.id == live.id
    assert store.counts() == {"queued": 1, "running": 1}
    store.close()
