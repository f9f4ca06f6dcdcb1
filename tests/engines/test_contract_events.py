"""Contract: job events. `tasks.subscribe(cb)` is told of every change of a job, in order, whichever process made
it; `tasks.events(ids, until_final=True)` streams them and ends once those jobs are final."""
from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

from contract_tasks import PROGRESS, register
from engines_support import Engine, site, wait_until
from fasthtml.common import P
from starlette.testclient import TestClient

from fh_tasks import Tasks
from fh_tasks.events import JobEvent


class Recorder:
    "A subscriber: keeps every event it is given (it is called from the event thread)."

    def __init__(self) -> None:
        self.events: list[JobEvent] = []
        self._lock = threading.Lock()

    def __call__(self, ev: JobEvent) -> None:
        with self._lock: self.events.append(ev)

    def of(self, id: str) -> list[JobEvent]:
        with self._lock: return [e for e in self.events if e.id == id]

    def until_final(self, id: str, timeout: float = 20.0) -> list[JobEvent]:
        "The job's events once its final event has arrived."
        wait_until(lambda: any(e.final for e in self.of(id)), timeout, f"the final event of job {id}")
        return self.of(id)


def kinds(events: list[JobEvent]) -> list[tuple[str, str, int]]:
    return [(e.kind, str(e.state), e.attempt) for e in events]


def assert_in_order(events: list[JobEvent]) -> None:
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    ats = [e.at for e in events]
    assert ats == sorted(ats), ats


def test_a_job_that_reports_progress_and_succeeds(engine: Engine) -> None:
    # Given a subscriber, and no worker running
    tasks = engine.make(workers=0)
    t = register(tasks)
    seen = Recorder()
    unsubscribe = tasks.subscribe(seen)
    try:
        t0 = time.time()
        # When a job that reports progress is deferred and runs, beside another job
        job = t.report_progress.defer()
        other = t.echo.defer("other")
        engine.drain(tasks)
        events = seen.until_final(job.id)
        seen.until_final(other.id)
        t1 = time.time()
    finally:
        unsubscribe()
    # Then its events came in order: stored, started, progress, succeeded, each with the job's state then
    assert kinds(events) == [("stored", "queued", 0), ("started", "running", 1), ("progress", "running", 1),
                             ("succeeded", "succeeded", 1)]
    assert all(e.id == job.id and e.task == "contract.report_progress" for e in events)
    assert events[2].progress == PROGRESS and events[3].progress == PROGRESS
    assert [e.final for e in events] == [False, False, False, True]
    # And every event of the store is numbered in order, and stamped with the time of the change
    assert_in_order(seen.events)
    assert t0 - 0.01 <= events[0].at and events[-1].at <= t1 + 0.01
    assert kinds(seen.of(other.id)) == [("stored", "queued", 0), ("started", "running", 1),
                                        ("succeeded", "succeeded", 1)]


def test_changes_made_by_a_worker_process_reach_a_subscriber_here(engine: Engine) -> None:
    # Given a subscriber in this process and a worker in another
    tasks = engine.make(workers=0)
    t = register(tasks)
    seen = Recorder()
    unsubscribe = tasks.subscribe(seen)
    worker = engine.start_worker()
    try:
        # When a job is deferred here and run there
        job = t.report_progress.defer()
        events = seen.until_final(job.id)
    finally:
        unsubscribe()
    # Then the worker's changes arrive here, in order
    assert kinds(events) == [("stored", "queued", 0), ("started", "running", 1), ("progress", "running", 1),
                             ("succeeded", "succeeded", 1)], worker.tail()
    assert_in_order(events)
    assert events[2].progress == PROGRESS


def test_a_job_deferred_in_a_request(engine: Engine) -> None:
    # Given an app whose workers start with its lifespan, a subscriber, and a handler deferring a job
    app, rt, tasks, t = site(engine)
    seen = Recorder()

    @rt("/go")
    def go():
        job = t.report_progress.defer()
        return P(job.id, id="job"), job

    unsubscribe = tasks.subscribe(seen)
    try:
        with TestClient(app) as client:
            # When it is requested and the job runs
            (id,) = re.findall(r'id="job">([0-9a-f]{32})<', client.get("/go").text)
            events = seen.until_final(id)
    finally:
        unsubscribe()
    # Then its events are stored, started, progress, succeeded, in order (also when the request's commit hands it
    # straight to a free worker of the same process, stored already running)
    assert kinds(events) == [("stored", "queued", 0), ("started", "running", 1), ("progress", "running", 1),
                             ("succeeded", "succeeded", 1)], events
    assert_in_order(events)


def test_a_retried_job_shows_retrying_then_started_again(engine: Engine, tmp_path: Path) -> None:
    # Given a subscriber and a task that fails twice before it succeeds
    tasks = engine.make(workers=0)
    t = register(tasks)
    seen = Recorder()
    unsubscribe = tasks.subscribe(seen)
    try:
        # When it runs
        job = t.flaky.defer(str(tmp_path / "attempts"))
        engine.drain(tasks)
        events = seen.until_final(job.id)
    finally:
        unsubscribe()
    # Then each failed attempt shows as retrying, followed by the next attempt starting
    assert kinds(events) == [("stored", "queued", 0),
                             ("started", "running", 1), ("retrying", "retrying", 1),
                             ("started", "running", 2), ("retrying", "retrying", 2),
                             ("started", "running", 3), ("succeeded", "succeeded", 3)]
    assert_in_order(events)


def test_a_cancelled_job_and_a_subscriber_of_chosen_jobs(engine: Engine) -> None:
    # Given a subscriber of every job, and one of a single job
    tasks = engine.make(workers=0)
    t = register(tasks)
    every, one = Recorder(), Recorder()
    job, other = t.echo.defer("cancel me"), t.echo.defer("other")
    stops = [tasks.subscribe(every), tasks.subscribe(one, jobs=[job.id])]
    try:
        # When both jobs are cancelled
        assert tasks.cancel(other.id) and tasks.cancel(job.id)
        every.until_final(job.id)
        one.until_final(job.id)
    finally:
        for stop in stops: stop()
    # Then each shows one event, cancelled and final (they were stored before anyone subscribed)
    assert kinds(every.of(other.id)) == [("cancelled", "cancelled", 0)]
    assert kinds(every.of(job.id)) == [("cancelled", "cancelled", 0)] and every.of(job.id)[0].final
    # And the subscriber of one job heard of that job only
    assert kinds(one.events) == [("cancelled", "cancelled", 0)] and one.events[0].id == job.id


def test_unsubscribed_callback_hears_nothing_more(engine: Engine) -> None:
    # Given a subscriber that unsubscribed after its first job ended, and another still subscribed
    tasks = engine.make(workers=0)
    t = register(tasks)
    gone, stays = Recorder(), Recorder()
    stop_gone, stop_stays = tasks.subscribe(gone), tasks.subscribe(stays)
    try:
        first = t.echo.defer(1)
        engine.drain(tasks)
        gone.until_final(first.id)
        stop_gone()
        # When another job runs
        second = t.echo.defer(2)
        engine.drain(tasks)
        stays.until_final(second.id)
    finally:
        stop_stays()
    # Then only the one still subscribed heard of it
    assert gone.of(second.id) == [] and [e.kind for e in stays.of(second.id)] == ["stored", "started", "succeeded"]


def test_event_stream_ends_after_the_final_event(engine: Engine) -> None:
    # Given two queued jobs, one reporting progress, and no worker running
    tasks = engine.make(workers=0)
    t = register(tasks)
    a, b = t.report_progress.defer(), t.echo.defer("b")

    async def scenario() -> tuple[list[JobEvent], bool]:
        got: list[JobEvent] = []

        async def follow() -> None:
            async for ev in tasks.events([a.id, b.id], until_final=True): got.append(ev)

        consumer = asyncio.ensure_future(follow())
        await asyncio.sleep(0.3)
        waiting = not consumer.done()  # nothing final yet: the stream must still be open
        # When the jobs run
        await asyncio.get_running_loop().run_in_executor(None, engine.drain, tasks)
        await asyncio.wait_for(consumer, 20)
        return got, waiting

    got, waited = asyncio.run(scenario())
    # Then the stream stayed open until both jobs were final, and ended after the last final event
    assert waited
    assert kinds([e for e in got if e.id == a.id]) == [("started", "running", 1), ("progress", "running", 1),
                                                        ("succeeded", "succeeded", 1)]
    assert kinds([e for e in got if e.id == b.id]) == [("started", "running", 1), ("succeeded", "succeeded", 1)]
    assert got[-1].final and sum(e.final for e in got) == 2
    assert_in_order(got)


def test_event_stream_of_a_finished_job_ends_at_once(engine: Engine) -> None:
    # Given a job that already succeeded and one that was cancelled
    tasks = engine.make(workers=0)
    t = register(tasks)
    done, cancelled = t.echo.defer("done"), t.echo.defer("cancelled")
    tasks.cancel(cancelled.id)
    engine.drain(tasks)
    assert done.get().done and cancelled.get().done

    async def follow(hub: Tasks, ids: list[str]) -> list[JobEvent]:
        return [ev async for ev in hub.events(ids, until_final=True)]

    # When their events are streamed until final, Then the stream ends at once, with nothing to tell
    started = time.monotonic()
    assert asyncio.run(asyncio.wait_for(follow(tasks, [done.id, cancelled.id]), 5)) == []
    assert time.monotonic() - started < 5
