"""The fh-tasks exception tree: one base class, whose docstring is the default message."""
from __future__ import annotations

__all__ = ["FhTasksError", "TaskNotRegistered", "ArgumentError", "PayloadTooLarge", "StoreError",
           "QueueUnavailable", "QueueBusy", "JobFailed", "JobCancelled", "Retry", "TaskTimeout", "Unsupported"]


class FhTasksError(Exception):
    """An fh-tasks error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class TaskNotRegistered(FhTasksError, LookupError):
    """The task is not registered with this `Tasks` hub."""


class ArgumentError(FhTasksError, TypeError):
    """A task argument cannot be stored as JSON."""


class PayloadTooLarge(FhTasksError, ValueError):
    """The job's arguments exceed the configured size limit."""


class StoreError(FhTasksError):
    """The job store failed."""


class QueueUnavailable(StoreError):
    """The job store cannot be opened or written (read-only file, missing directory, disk full)."""


class QueueBusy(StoreError):
    """The job store stayed locked by another process for longer than the busy timeout."""


class JobFailed(FhTasksError):
    """The job failed."""


class JobCancelled(FhTasksError):
    """The job was cancelled."""


class TaskTimeout(FhTasksError, TimeoutError):
    """The task ran longer than its timeout."""


class Retry(FhTasksError):
    """Raised by a task to ask for another attempt, optionally after `delay` seconds."""

    def __init__(self, message: str | None = None, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class Unsupported(FhTasksError):
    """The engine cannot do this (it lacks the capability)."""
