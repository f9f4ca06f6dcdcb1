"""Contract: failed attempts are retried (with backoff, or after the delay a task asks for), and an attempt that
runs past its timeout fails with TaskTimeout. Jobs run on the app's workers, started by its lifespan."""
from __future__ import annotations

from pathlib import Path

from contract_tasks import TIMEOUT, lines
from engines_support import Engine, site
from starlette.testclient import TestClient

from fh_tasks import JobState


def test_flaky_task_succeeds_on_its_third_attempt(engine: Engine, tmp_path: Path) -> None:
    # Given a task with retries=2 that fails on attempts 1 and 2
    app, _, tasks, t = site(engine)
    log = str(tmp_path / "attempts")
    with TestClient(app):
        # When it runs
        rec = t.flaky.defer(log).wait(20)
    # Then it ran three times and succeeded on the third, with no error left
    assert (rec.state, rec.attempts, rec.max_attempts, rec.result, rec.error) == (JobState.succeeded, 3, 3, 3, None)
    assert lines(log) == ["1", "2", "3"]


def test_flaky_task_out_of_retries_fails_with_its_last_error(engine: Engine, tmp_path: Path) -> None:
    # Given the same task allowed only one retry
    app, _, tasks, t = site(engine)
    log = str(tmp_path / "attempts")
    with TestClient(app):
        # When it runs
        rec = t.flaky.with_options(retries=1).defer(log).wait(20)
    # Then it failed after two attempts, keeping the second attempt's error
    assert (rec.state, rec.attempts, rec.result) == (JobState.failed, 2, None)
    assert rec.error["type"] == "ConnectionError" and rec.error["message"] == "attempt 2 could not connect"
    assert lines(log) == ["1", "2"]


def test_retry_waits_for_the_delay_the_task_asks_for(engine: Engine, tmp_path: Path) -> None:
    # Given a task whose own backoff is 1 ms, which raises Retry(delay=0.5) on its first attempt
    app, _, tasks, t = site(engine)
    log = str(tmp_path / "attempts")
    with TestClient(app):
        # When it runs
        job = t.retry_later.defer(log, 0.5)
        rec = job.wait(20)
    # Then the second attempt started no sooner than asked, and succeeded
    assert (rec.state, rec.attempts, rec.result) == (JobState.succeeded, 2, 2)
    (a1, t1), (a2, t2) = (line.split() for line in lines(log))
    assert (a1, a2) == ("1", "2")
    assert float(t2) - float(t1) >= 0.5, float(t2) - float(t1)


def test_sync_task_over_its_timeout_fails_with_task_timeout(engine: Engine, tmp_path: Path) -> None:
    # Given a sync task with a 0.2 s timeout and one retry, that sleeps 1 s
    app, _, tasks, t = site(engine)
    log = str(tmp_path / "attempts")
    with TestClient(app):
        # When it runs
        rec = t.sync_overrun.defer(log, 1.0).wait(20)
    # Then both attempts ran and timed out, and the job failed with TaskTimeout
    assert (rec.state, rec.attempts, rec.result) == (JobState.failed, 2, None)
    assert rec.error["type"] == "TaskTimeout" and f"{TIMEOUT}s timeout" in rec.error["message"]
    assert lines(log) == ["1", "2"]


def test_async_task_over_its_timeout_fails_with_task_timeout(engine: Engine, tmp_path: Path) -> None:
    # Given an async task with a 0.2 s timeout and one retry, that would sleep a minute
    app, _, tasks, t = site(engine)
    log = str(tmp_path / "attempts")
    with TestClient(app):
        # When it runs
        rec = t.async_overrun.defer(log, 60.0).wait(20)
    # Then both attempts were cut at the timeout, and the job failed with TaskTimeout
    assert (rec.state, rec.attempts, rec.result) == (JobState.failed, 2, None)
    assert rec.error["type"] == "TaskTimeout" and f"{TIMEOUT}s timeout" in rec.error["message"]
    assert lines(log) == ["1", "2"]


def test_task_within_its_timeout_succeeds(engine: Engine, tmp_path: Path) -> None:
    # Given the same async task, quick enough this time
    app, _, tasks, t = site(engine)
    log = str(tmp_path / "attempts")
    with TestClient(app):
        # When it runs
        rec = t.async_overrun.defer(log, 0.0).wait(20)
    # Then it succeeded on its first attempt
    assert (rec.state, rec.attempts, rec.error) == (JobState.succeeded, 1, None)
