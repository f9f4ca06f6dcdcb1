"""Hooks: code that runs around enqueueing and running jobs, on every state change, and with the workers.

A hook is a `Hook` subclass overriding the methods it needs (every method here does nothing), added with
`Tasks(app, hooks=[...])` or `tasks.hooks.add(hook)`. Features that are not the worker's core are hooks:
retries (`fh_tasks.retry.Retries`) and retention (`fh_tasks.retention.Retention`) are built this way.

    class ReportFailures(Hook):
        def after_run(self, job, task, result, error):
            if error is not None and job.attempt >= job.max_attempts: sentry_sdk.capture_exception(error)

A hook may declare task options (`options = {'notify': str}`): `@tasks.task(notify=...)` then accepts
them, validated by the converter, and the hook reads them with `task.option('notify')`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .context import JobContext
    from .events import JobEvent
    from .records import NewJob
    from .task import Task

__all__ = ["Hook", "Hooks", "Decision"]

log = logging.getLogger("fh_tasks.hooks")


@dataclass(frozen=True)
class Decision:
    "What to do after a failed attempt: run it again after `delay` seconds, or fail the job."
    retry: bool
    delay: float = 0.0


class Hook:
    "Base class of hooks; see the module docstring. Methods run in the process where the event happens."

    #: Task options this hook adds to `@tasks.task(...)`: name -> converter that returns the value or raises.
    options: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}

    def before_enqueue(self, job: NewJob, task: Task[Any, Any]) -> None:
        "A job is about to be stored (in `defer()`). Raise to refuse it: the error reaches the caller."

    def after_enqueue(self, jobs: Sequence[NewJob]) -> None:
        "These jobs were committed."

    def before_run(self, job: JobContext, task: Task[Any, Any]) -> None:
        "An attempt is about to start, in the worker's process."

    def after_run(self, job: JobContext, task: Task[Any, Any], result: Any, error: BaseException | None) -> None:
        "An attempt ended, with `result`, or with `error` (a failure, a timeout, a cancellation)."

    def on_failure(self, job: JobContext, task: Task[Any, Any], error: BaseException) -> Decision | None:
        "An attempt failed: return a `Decision` to retry or fail it, or None to leave it to the next hook."
        return None

    def on_event(self, event: JobEvent) -> None:
        "A job changed, in any process sharing the engine (delivered by the engine's event feed)."

    def on_worker_start(self, worker: Any) -> None:
        "A worker started (in-process or `fh-tasks worker`)."

    def on_worker_stop(self, worker: Any) -> None:
        "A worker stopped."

    def on_tick(self, worker: Any) -> None:
        "Periodic upkeep, every few seconds in each running worker (not in burst workers)."


_BASE = {name: getattr(Hook, name) for name in vars(Hook) if name.startswith(("before_", "after_", "on_"))}


class Hooks:
    "The ordered hooks of a hub. `emit` isolates a failing hook: it is logged and the others still run."

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self._hooks: list[Hook] = []
        self._by_method: dict[str, list[Hook]] = {}  # `overriding` answers, per method (the job path asks often)
        self.version = 0  # counts `add`s: a caller that keeps `overriding` answers asks again when it changes
        for h in hooks: self.add(h)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    def add(self, hook: Hook, *, before: type[Hook] | None = None) -> None:
        "Add `hook` last, or just before the first hook of type `before` (as Dramatiq's `add_middleware`)."
        if not isinstance(hook, Hook): raise TypeError(f"a hook must be a fh_tasks.Hook, not {type(hook).__name__}")
        for name in hook.options:
            if name in self.options: raise ValueError(f"two hooks declare the task option {name!r}")
        at = next((i for i, h in enumerate(self._hooks) if before and isinstance(h, before)), len(self._hooks))
        self._hooks.insert(at, hook)
        self._by_method.clear()
        self.version += 1

    @property
    def options(self) -> dict[str, Callable[[Any], Any]]:
        "Every task option the hooks declare, with its converter."
        return {k: v for h in self._hooks for k, v in h.options.items()}

    def overriding(self, method: str) -> list[Hook]:
        "The hooks that override `method` (so a caller can skip work nobody listens for)."
        if (found := self._by_method.get(method)) is None:
            base = _BASE[method]
            found = self._by_method[method] = [h for h in self._hooks if getattr(type(h), method) is not base]
        return found

    def emit(self, method: str, *args: Any) -> None:
        "Call `method` on every hook that overrides it, in order; an exception is logged and skipped."
        if (found := self._by_method.get(method)) is None: found = self.overriding(method)
        for h in found:
            try: getattr(h, method)(*args)
            except Exception: log.exception("hook %s.%s failed", type(h).__name__, method)

    def before_enqueue(self, job: NewJob, task: Task[Any, Any]) -> None:
        "Run every `before_enqueue`; the first exception refuses the job and propagates."
        for h in self.overriding("before_enqueue"): h.before_enqueue(job, task)

    def decide(self, job: JobContext, task: Task[Any, Any], error: BaseException) -> Decision:
        "The first `Decision` a hook returns for a failed attempt (a failing hook is skipped); fail without one."
        for h in self.overriding("on_failure"):
            try: d = h.on_failure(job, task, error)
            except Exception:
                log.exception("hook %s.on_failure failed", type(h).__name__)
                continue
            if d is not None: return d
        return Decision(retry=False)
