"""Contract: `current_job().progress(...)` inside a task shows in `tasks.get(id).progress`, while the job runs
(in this process or in a worker process) and after it has ended."""
from __future__ import annotations

from pathlib import Path

from contract_tasks import PROGRESS, register
from engines_support import Engine, site, wait_until
from starlette.testclient import TestClient

from fh_tasks import Job, JobState, Tasks


def test_progress_is_kept_after_the_job(engine: Engine) -> None:
    # Given a task that reports {'done': 3, 'total': 10}
    tasks = engine.make(workers=0)
    t = register(tasks)
    job = t.report_progress.defer()
    assert tasks.get(job.id).progress is None
    # When it runs
    engine.drain(tasks)
    # Then its record shows the progress it reported, beside its result
    rec = tasks.get(job.id)
    assert (rec.state, rec.result, rec.progress) == (JobState.succeeded, "reported", PROGRESS)


def _seen_while_running(tasks: Tasks, job: Job, release: Path) -> None:
    "The job's progress shows while it is running; it finishes once released."
    try:
        rec = wait_until(lambda: (r := tasks.get(job.id)) and r.progress is not None and r, what="progress to show")
        assert (rec.state, rec.progress, rec.attempts) == (JobState.running, PROGRESS, 1)
        assert [r.progress for r in tasks.jobs(state="running")] == [PROGRESS]
    finally:
        release.touch()
    rec = job.wait(20)
    assert (rec.state, rec.result, rec.progress) == (JobState.succeeded, "released", PROGRESS)


def test_progress_shows_while_the_job_runs_in_the_app(engine: Engine, tmp_path: Path) -> None:
    # Given an app whose workers start with its lifespan, and a task that reports progress, then waits
    app, _, tasks, t = site(engine)
    release = tmp_path / "release"
    with TestClient(app):
        # When it runs, Then its progress is visible before it ends, and kept after
        _seen_while_running(tasks, t.progress_then_wait.defer(str(release)), release)


def test_progress_shows_while_the_job_runs_in_a_worker_process(engine: Engine, tmp_path: Path) -> None:
    # Given a worker process, and the same task deferred from this process
    tasks = engine.make(workers=0)
    t = register(tasks)
    release = tmp_path / "release"
    engine.start_worker()
    # When it runs there, Then its progress is visible here before it ends, and kept after
    _seen_while_running(tasks, t.progress_then_wait.defer(str(release)), release)
