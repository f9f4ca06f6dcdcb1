"""What a running task knows about itself: `current_job()` gives its id, attempt and a progress setter."""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .encoding import encode_value

if TYPE_CHECKING:
    from .store import Store

__all__ = ["JobContext", "current_job"]


@dataclass(frozen=True)
class JobContext:
    """The job a task is running as. Delivery is at-least-once: use `id` (and `attempt`) to be idempotent."""
    id: str
    task: str
    attempt: int
    max_attempts: int
    store: Store | None = None

    def progress(self, value: Any) -> bool:
        "Record progress (any JSON value, e.g. `{'done': 3, 'total': 10}`); shown by status pages. False if stale."
        if self.store is None: return False
        return self.store.set_progress(self.id, self.attempt, encode_value(value, "progress"))


_current: ContextVar[JobContext | None] = ContextVar("fh_tasks_job", default=None)


def current_job() -> JobContext:
    "The job the calling task runs as; raises RuntimeError outside a task run by a worker."
    ctx = _current.get()
    if ctx is None: raise RuntimeError("current_job() is only available inside a task run by an fh-tasks worker")
    return ctx
