"""Hooks: around enqueueing and running jobs, deciding retries, on every job event, with the workers; task options."""
from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from integration_support import wait_until
from starlette.testclient import TestClient

from fh_tasks import Decision, Hook, Tasks
from fh_tasks.limits import Limits
from fh_tasks.retention import Retention
from fh_tasks.retry import Retries
from fh_tasks.testing import drain


class Recorder(Hook):
    "Records every call, in order, with what it was given."

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def _add(self, *call: Any) -> None:
        with self.lock: self.calls.append(call)

    def before_enqueue(self, job, task): self._add("before_enqueue", job.task, job.id)
    def after_enqueue(self, jobs): self._add("after_enqueue", tuple(j.id for j in jobs))
    def before_run(self, job, task): self._add("before_run", job.id, job.attempt)
    def after_run(self, job, task, result, error):
        self._add("after_run", job.id, job.attempt, result, type(error).__name__ if error else None)
    def on_worker_start(self, worker): self._add("worker_start")
    def on_worker_stop(self, worker): self._add("worker_stop")
    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self.lock: return [c for c in self.calls if c[0] == kind]


def test_hooks_run_around_enqueue_and_each_attempt_in_order(make_tasks):
    # Given a hub with a recording hook and a task that fails once
    rec = Recorder()
    tasks = make_tasks(workers=0, hooks=[rec])
    runs: list[int] = []

    @tasks.task(name="hooks:flaky", retries=1, retry_delay=0)
    def flaky(x: int) -> int:
        runs.append(x)
        if len(runs) == 1: raise ValueError("first time")
        return x * 2

    # When a job is deferred and drained
    job = flaky.defer(21)
    drain(tasks)
    # Then the hooks saw it stored, then each attempt before and after it ran, with its outcome
    assert rec.calls[:2] == [("before_enqueue", "hooks:flaky", job.id), ("after_enqueue", (job.id,))]
    assert rec.of("before_run") == [("before_run", job.id, 1), ("before_run", job.id, 2)]
    assert rec.of("after_run") == [("after_run", job.id, 1, None, "ValueError"), ("after_run", job.id, 2, 42, None)]
    assert rec.of("worker_start") and rec.of("worker_stop")
    assert job.get().result == 42


def test_a_hook_added_while_a_worker_runs_hears_the_jobs_that_end_and_start_after(make_tasks):
    # Given a hub with no user hook, whose first job adds one while the worker runs
    tasks = make_tasks(workers=0)
    rec = Recorder()

    @tasks.task(name="hooks:adds")
    async def adds(n: int) -> int:
        if n == 1: tasks.hooks.add(rec)
        return n

    first, second = adds.defer(1), adds.defer(2)
    # When one worker runs them one after the other
    drain(tasks, concurrency=1)
    # Then the hook hears the end of the job that added it, and the next job from its start
    assert rec.of("before_run") == [("before_run", second.id, 1)]
    assert rec.of("after_run") == [("after_run", first.id, 1, 1, None), ("after_run", second.id, 1, 2, None)]


def test_before_enqueue_can_refuse_a_job_and_nothing_is_stored(make_tasks):
    # Given a hook that refuses jobs of one customer
    class NoBlocked(Hook):
        def before_enqueue(self, job, task):
            if '"blocked"' in job.args: raise PermissionError("customer is blocked")

    tasks = make_tasks(workers=0, hooks=[NoBlocked()])

    @tasks.task
    def bill(customer: str) -> None: ...

    # When a refused job is deferred, Then the caller gets the hook's error and nothing is stored
    with pytest.raises(PermissionError, match="blocked"): bill.defer("blocked")
    assert tasks.counts() == {}
    # And other jobs are stored as usual
    bill.defer("ada")
    assert tasks.counts() == {"queued": 1}


def test_a_user_hook_decides_before_the_built_in_retries(make_tasks):
    # Given a hook that never retries ValueError, on a task with three retries
    class NoRetryOnValueError(Hook):
        def on_failure(self, job, task, error):
            return Decision(retry=False) if isinstance(error, ValueError) else None

    tasks = make_tasks(workers=0, hooks=[NoRetryOnValueError()])
    calls: list[str] = []

    @tasks.task(retries=3, retry_delay=0)
    def fragile(kind: str) -> None:
        calls.append(kind)
        raise (ValueError if kind == "value" else OSError)(kind)

    # When each fails
    a, b = fragile.defer("value"), fragile.defer("os")
    drain(tasks)
    # Then the ValueError job failed at once and the OSError one used its retries (the built-in rule)
    assert (a.get().state, a.get().attempts) == ("failed", 1)
    assert (b.get().state, b.get().attempts) == ("failed", 4)


def test_a_hook_can_ask_for_more_attempts_with_its_own_delay(make_tasks):
    # Given a hook that retries a task without retries twice
    class TwoMore(Hook):
        def on_failure(self, job, task, error):
            return Decision(retry=True, delay=0) if job.attempt < 3 else None

    tasks = make_tasks(workers=0, hooks=[TwoMore()])
    n: list[int] = []

    @tasks.task
    def third_time(x: int) -> int:
        n.append(x)
        if len(n) < 3: raise RuntimeError("not yet")
        return len(n)

    # When it runs, Then it succeeded on its third attempt
    job = third_time.defer(1)
    drain(tasks)
    assert (job.get().state, job.get().result) == ("succeeded", 3)


def test_a_failing_hook_is_logged_and_the_job_and_other_hooks_go_on(make_tasks, caplog):
    # Given a hook that raises in every method, before a recording one
    class Broken(Hook):
        def before_run(self, job, task): raise RuntimeError("hook bug")
        def after_run(self, job, task, result, error): raise RuntimeError("hook bug")
        def on_failure(self, job, task, error): raise RuntimeError("hook bug")

    rec = Recorder()
    tasks = make_tasks(workers=0, hooks=[Broken(), rec])

    @tasks.task(retries=1, retry_delay=0)
    def once_bad(fail: bool) -> str:
        if fail: raise OSError("down")
        return "ok"

    # When jobs run
    with caplog.at_level(logging.ERROR, logger="fh_tasks.hooks"):
        good, bad = once_bad.defer(False), once_bad.defer(True)
        drain(tasks)
    # Then the jobs ended as without the broken hook (the built-in retry rule still decided)
    assert good.get().state == "succeeded"
    assert (bad.get().state, bad.get().attempts) == ("failed", 2)
    # And the other hook still saw every attempt, and the failures were logged with the hook's name
    assert len(rec.of("after_run")) == 3
    assert "Broken.before_run" in caplog.text and "Broken.on_failure" in caplog.text


def test_hooks_declare_task_options_and_others_are_refused(make_tasks):
    # Given a hook that declares a `notify` option with a converter
    class Notify(Hook):
        options = {"notify": str}

        def __init__(self) -> None: self.sent: list[tuple[str, str]] = []

        def after_run(self, job, task, result, error):
            if (to := task.option("notify")): self.sent.append((to, job.id))

    notify = Notify()
    tasks = make_tasks(workers=0, hooks=[notify])

    @tasks.task(notify="ops@example.com")
    def export() -> None: ...

    @tasks.task
    def quiet() -> None: ...

    # When both run, Then the hook acted on the task that set the option
    a, _ = export.defer(), quiet.defer()
    drain(tasks)
    assert notify.sent == [("ops@example.com", a.id)]
    # And an option no hook declares is a TypeError naming it and the declared ones
    with pytest.raises(TypeError, match=r"unknown task option 'notfy'.*notify"):
        tasks.task(notfy="x")(lambda: None)
    # And a value the converter refuses is a clear error
    class Strict(Hook):
        options = {"level": int}

    with pytest.raises(ValueError, match="task option level='high'"):
        make_tasks(workers=0, hooks=[Strict()], db=str(tasks.store.path) + "2").task(level="high")(lambda: None)
    # And two hooks may not declare the same option
    with pytest.raises(ValueError, match="notify"):
        Tasks(workers=0, hooks=[Notify(), Notify()], db=str(tasks.store.path) + "3")


def test_on_event_hooks_hear_every_change_while_the_app_runs(site):
    # Given an app whose hub has a hook listening to job events
    seen: list[tuple[str, str]] = []

    class Events(Hook):
        def on_event(self, event): seen.append((event.id, event.kind))

    app, _, tasks = site(hooks=[Events()])

    @tasks.task
    def hello() -> str: return "hi"

    with TestClient(app):
        # When a job runs
        job = hello.defer()
        job.wait(10)
        # Then the hook heard it stored, started and succeeded
        wait_until(lambda: (job.id, "succeeded") in seen, what="the final event")
    kinds = [k for i, k in seen if i == job.id]
    assert kinds[0] == "stored" and "started" in kinds and kinds[-1] == "succeeded"


def test_built_in_retries_and_retention_are_hooks_users_can_order_around(make_tasks):
    # Given a hub with one user hook
    rec = Recorder()
    tasks = make_tasks(workers=0, hooks=[rec])
    # Then its hooks are the user's first, then the built-in retry rule, retention and limits
    assert [type(h) for h in tasks.hooks] == [Recorder, Retries, Retention, Limits]
    # And a hook added before Retries goes in front of it
    class Early(Hook): ...
    tasks.hooks.add(Early(), before=Retries)
    assert [type(h) for h in tasks.hooks] == [Recorder, Early, Retries, Retention, Limits]


def test_retention_prunes_finished_jobs_on_a_worker_tick(make_tasks):
    # Given a hub keeping finished jobs for 0 s and a finished job
    tasks = make_tasks(workers=0, retention=0.0)

    @tasks.task
    def done() -> None: ...

    job = done.defer()
    drain(tasks)
    assert job.get() is not None
    # When a worker ticks, Then the finished job is pruned
    retention = next(h for h in tasks.hooks if isinstance(h, Retention))
    retention.on_tick(tasks.worker())
    assert job.get() is None
