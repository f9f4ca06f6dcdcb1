"""Contract: at-least-once delivery. A job running in a worker process that is SIGKILLed runs again in another
worker and succeeds; no job is lost, neither the one that was running nor those queued around the kill."""
from __future__ import annotations

import signal

from contract_tasks import register
from engines_support import Engine, wait_until

from fh_tasks import JobState


def test_job_of_a_killed_worker_runs_again_in_a_new_one(engine: Engine) -> None:
    # Given a worker process with a 1 s lease, running a job that stalls on its first attempt, and other jobs
    tasks = engine.make(workers=0)
    t = register(tasks)
    first = engine.start_worker(lease=1.0)
    stalled = t.stall_first.defer()
    before = [t.echo.defer(i) for i in range(20)]
    rec = wait_until(lambda: (r := tasks.get(stalled.id)) and r.progress and r, what="the stalled job to start")
    assert (rec.state, rec.attempts, rec.progress) == (JobState.running, 1, {"pid": first.pid}), first.tail()
    # When that worker is SIGKILLed mid-job
    assert engine.kill(first) == -signal.SIGKILL
    # Then the job is still recorded as running its first attempt: nobody is left to say otherwise
    rec = tasks.get(stalled.id)
    assert (rec.state, rec.attempts) == (JobState.running, 1)
    # And when more jobs are deferred and a new worker starts, the job is taken back and succeeds there
    after = [t.echo.defer(100 + i) for i in range(20)]
    second = engine.start_worker(lease=1.0)
    rec = stalled.wait(30)
    assert (rec.state, rec.attempts, rec.result) == (JobState.succeeded, 2, {"attempt": 2, "pid": second.pid}), \
        second.tail()
    # And nothing was lost: every other job ran to success with its own argument
    assert [j.result(30) for j in before + after] == list(range(20)) + [100 + i for i in range(20)]
    assert tasks.counts() == {"succeeded": 41}
