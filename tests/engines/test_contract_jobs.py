"""Contract: defer, read, list, count, cancel and retry jobs, in the states the README lists."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from contract_tasks import register
from engines_support import Engine, WorkerProcess

import fh_tasks
from fh_tasks import JobCancelled, JobFailed, JobState


def test_deferred_job_is_stored_listed_counted_and_runs(engine: Engine) -> None:
    # Given a hub with no worker running
    tasks = engine.make(workers=0)
    t = register(tasks)
    t0 = time.time()
    # When a job is deferred outside a request, and another with a delay
    now = t.echo.defer({"n": 1, "tags": ["a", "b"]})
    later = t.echo.with_options(delay=60).defer("later")
    # Then both are stored at once: one queued, one scheduled, with their task, arguments and no attempt yet
    rec = tasks.get(now.id)
    assert rec is not None and now.get() == rec
    assert (rec.id, rec.task, rec.state, rec.attempts) == (now.id, "contract.echo", JobState.queued, 0)
    assert rec.args == [{"n": 1, "tags": ["a", "b"]}] and rec.kwargs == {}
    assert rec.result is None and rec.error is None and not rec.done
    assert t0 - 1 <= rec.created_at <= time.time() + 1
    sched = tasks.get(later.id)
    assert sched is not None and sched.state == JobState.scheduled and sched.run_at >= t0 + 59
    # And they are listed (newest first, by state, by task) and counted
    assert [r.id for r in tasks.jobs()] == [later.id, now.id]
    assert [r.id for r in tasks.jobs(state="queued")] == [now.id]
    assert [r.id for r in tasks.jobs(state=JobState.scheduled, task=t.echo)] == [later.id]
    assert [r.id for r in tasks.jobs(task="contract.echo", limit=1)] == [later.id]
    assert [r.id for r in tasks.jobs(task="contract.echo", limit=1, offset=1)] == [now.id]
    assert tasks.jobs(task=t.append) == []
    assert tasks.counts() == {"queued": 1, "scheduled": 1}
    assert tasks.get("0" * 32) is None
    # When the due jobs run
    assert engine.drain(tasks) == 1
    # Then the queued one succeeded with its result; the scheduled one waits for its time
    done = now.wait(5)
    assert (done.state, done.attempts, done.result, done.error) == (JobState.succeeded, 1, {"n": 1, "tags": ["a", "b"]},
                                                                     None)
    assert done.done and done.finished_at is not None and done.started_at is not None
    assert now.result() == {"n": 1, "tags": ["a", "b"]}
    assert tasks.counts() == {"succeeded": 1, "scheduled": 1}


def test_cancel_a_queued_job(engine: Engine) -> None:
    # Given two queued jobs and one that already ran
    tasks = engine.make(workers=0)
    t = register(tasks)
    ran = t.echo.defer("ran")
    engine.drain(tasks)
    doomed, kept = t.echo.defer("doomed"), t.echo.defer("kept")
    # When one queued job is cancelled
    assert tasks.cancel(doomed.id) is True
    # Then it is final and cancelled, and it never runs; the other job runs
    assert tasks.get(doomed.id).state == JobState.cancelled and tasks.get(doomed.id).done
    engine.drain(tasks)
    assert tasks.get(doomed.id).state == JobState.cancelled and tasks.get(doomed.id).attempts == 0
    assert kept.result(5) == "kept"
    with pytest.raises(JobCancelled):
        doomed.result(5)
    # And cancelling again, a finished job, or an unknown id does nothing
    assert tasks.cancel(doomed.id) is False
    assert tasks.cancel(ran.id) is False and tasks.get(ran.id).state == JobState.succeeded
    assert tasks.cancel("0" * 32) is False
    assert tasks.counts() == {"succeeded": 2, "cancelled": 1}


def test_failed_job_keeps_its_error_and_runs_again_when_retried(engine: Engine, tmp_path: Path) -> None:
    # Given a task that fails while a file is missing, with no retries
    tasks = engine.make(workers=0)
    t = register(tasks)
    flag = tmp_path / "flag"
    job = t.fails_unless.defer(str(flag))
    # When it runs
    engine.drain(tasks)
    # Then it failed after one attempt, with its error type, message and traceback stored
    rec = tasks.get(job.id)
    assert (rec.state, rec.attempts, rec.result) == (JobState.failed, 1, None)
    assert rec.error["type"] == "FileNotFoundError" and rec.error["message"] == f"{flag} is not there yet"
    assert "fails_unless" in rec.error["traceback"]
    assert [r.id for r in tasks.jobs(state="failed", task=t.fails_unless)] == [job.id]
    with pytest.raises(JobFailed, match="FileNotFoundError"):
        job.result(5)
    # When the cause is fixed and the job is retried
    flag.touch()
    assert tasks.retry(job.id) is True
    # Then it is due again and runs to success
    assert tasks.get(job.id).state == JobState.queued
    engine.drain(tasks)
    rec = tasks.get(job.id)
    assert (rec.state, rec.result, rec.error) == (JobState.succeeded, "found", None)
    # And a succeeded job (or an unknown id) cannot be retried
    assert tasks.retry(job.id) is False
    assert tasks.retry("0" * 32) is False
    assert tasks.counts() == {"succeeded": 1}


def test_cancelled_job_runs_when_retried(engine: Engine) -> None:
    # Given a job cancelled before it ran
    tasks = engine.make(workers=0)
    t = register(tasks)
    job = t.echo.defer("second chance")
    assert tasks.cancel(job.id)
    # When it is retried and the queue drains
    assert tasks.retry(job.id) is True
    engine.drain(tasks)
    # Then it ran once, to success
    rec = tasks.get(job.id)
    assert (rec.state, rec.attempts, rec.result) == (JobState.succeeded, 1, "second chance")


def test_every_documented_state(engine: Engine, tmp_path: Path) -> None:
    # Given jobs stopped in each state the README lists
    tasks = engine.make(workers=0)
    t = register(tasks)
    queued = t.echo.defer("q")
    scheduled = t.echo.with_options(delay=60).defer("s")
    chain = fh_tasks.BackgroundTasks()  # outside a request: stored at once, the second waits for the first
    chain.add_task(t.append, str(tmp_path / "chain"), "first")
    chain.add_task(t.append, str(tmp_path / "chain"), "second")
    cancelled = t.echo.defer("c")
    tasks.cancel(cancelled.id)
    failed = t.fails_unless.defer(str(tmp_path / "never"))
    retrying = t.retry_later.defer(str(tmp_path / "retry.log"), 60.0)
    release = tmp_path / "release"
    running = t.progress_then_wait.defer(str(release))
    assert tasks.get(queued.id).state == JobState.queued
    assert tasks.get(chain.ids[1]).state == JobState.waiting
    # When a worker has run what is due, with retry backoffs honoured, while one job is still running
    worker = engine.start_worker()
    try:
        for job, state in ((running, JobState.running), (failed, JobState.failed), (retrying, JobState.retrying),
                           (queued, JobState.succeeded)):
            _wait_state(tasks, job.id, state, worker)
        _wait_state(tasks, chain.ids[1], JobState.succeeded, worker)
        # Then every state shows in the records, the listing and the counts
        assert tasks.get(scheduled.id).state == JobState.scheduled
        assert tasks.get(cancelled.id).state == JobState.cancelled
        assert tasks.counts() == {"running": 1, "scheduled": 1, "retrying": 1, "succeeded": 3, "failed": 1,
                                  "cancelled": 1}
        assert {r.id for r in tasks.jobs(state="running")} == {running.id}
        assert {r.id for r in tasks.jobs(state="retrying")} == {retrying.id}
        assert {r.id for r in tasks.jobs(state="failed")} == {failed.id}
    finally:
        release.touch()
    assert running.result(20) == "released"


def _wait_state(tasks: fh_tasks.Tasks, id: str, state: JobState, worker: WorkerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (rec := tasks.get(id)) is None or rec.state != state:
        assert worker.alive(), f"the worker exited:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"job {id} is {rec and rec.state}, not {state}:\n{worker.tail()}"
        time.sleep(0.02)
