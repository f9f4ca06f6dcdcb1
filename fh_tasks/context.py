"""What a running task knows about itself: `current_job()` gives its id, attempt and a progress setter."""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from .encoding import encode_progress
from .errors import JobCancelled

__all__ = ["JobContext", "current_job", "ProgressSink"]


class ProgressSink(Protocol):
    "Where an engine keeps a running job's progress (the SQLite store; a broker engine's status store)."

    def record_progress(self, id: str, attempt: int, progress: str) -> bool:
        "Keep the attempt's latest progress (JSON text) to be written soon; False once the attempt is known stale."


@dataclass(frozen=True)
class JobContext:
    """The job a task is running as. Delivery is at-least-once: use `id` (and `attempt`) to be idempotent."""
    id: str
    task: str
    attempt: int
    max_attempts: int
    store: ProgressSink | None = None

    def progress(self, value: Any) -> bool:
        """Record progress (any JSON value, e.g. `{'done': 3, 'total': 10}`), shown by status pages.

        Cheap enough for a tight loop: the value is checked at once (a non-JSON value raises `ArgumentError`) and
        kept in memory, latest wins; the worker writes it within about 0.2 s, and the last value of an attempt is
        committed with its outcome (a pool process writes it before handing the outcome back). Returns True when the
        value was kept; False when it will never be stored: no store, or a write already found that this attempt no
        longer holds the job (it ended, timed out, or was taken back). A stale attempt may still get True until the
        next write notices.
        """
        text = encode_progress(value)
        if self.store is None: return False
        if self.cancelled: raise JobCancelled(f"job {self.id} ({self.task}) was cancelled")
        return bool(self.store.record_progress(self.id, self.attempt, text))

    @property
    def cancelled(self) -> bool:
        """True once the job was cancelled while running (`tasks.cancel(id, running=True)`), as its worker found it
        (it checks about every half second); `progress()` then raises `JobCancelled`. A sync task that reports no
        progress can check this flag in its loop; an async task is cancelled by its worker."""
        check = getattr(self.store, "is_cancelled", None)
        return bool(check(self.id, self.attempt)) if check is not None else False


_current: ContextVar[JobContext | None] = ContextVar("fh_tasks_job", default=None)


def current_job() -> JobContext:
    "The job the calling task runs as; raises RuntimeError outside a task run by a worker."
    ctx = _current.get()
    if ctx is None: raise RuntimeError("current_job() is only available inside a task run by an fh-tasks worker")
    return ctx
