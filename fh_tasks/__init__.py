"""fh-tasks: durable background tasks for FastHTML, on an embedded SQLite queue or on Celery and Dramatiq.

Names are loaded when first used, so `import fh_tasks.records` (or `events`, `engine`, `hooks`) does not
import Starlette or the web binding.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import JobContext, current_job
    from .cron import cron_slot
    from .engine import Capabilities, Engine
    from .errors import (
        ArgumentError,
        FhTasksError,
        JobCancelled,
        JobFailed,
        PayloadTooLarge,
        QueueBusy,
        QueueUnavailable,
        Retry,
        StoreError,
        TaskNotRegistered,
        TaskTimeout,
        Unsupported,
    )
    from .events import JobEvent
    from .flow import BackgroundTasks, Flow, Signature, chain, group
    from .hooks import Decision, Hook
    from .hub import Tasks
    from .job import Job
    from .records import JobRecord, JobState
    from .task import Call, Task
    from .ui.status import JobStatus

__version__ = "0.1.0"

__all__ = [
    # The hub and its tasks
    "Tasks", "Task", "Call", "BackgroundTasks",
    # Workflows
    "chain", "group", "Signature", "Flow",
    # Jobs
    "Job", "JobRecord", "JobState", "JobContext", "current_job", "cron_slot", "JobStatus",
    # Events, hooks and engines
    "JobEvent", "Hook", "Decision", "Engine", "Capabilities",
    # Errors and control flow
    "FhTasksError", "ArgumentError", "PayloadTooLarge", "TaskNotRegistered", "StoreError", "QueueUnavailable",
    "QueueBusy", "JobFailed", "JobCancelled", "TaskTimeout", "Retry", "Unsupported",
]

_WHERE = {
    "Tasks": "hub", "Task": "task", "Call": "task", "BackgroundTasks": "flow", "Job": "job", "JobRecord": "records",
    "JobState": "records", "JobContext": "context", "current_job": "context", "cron_slot": "cron",
    "JobStatus": "ui.status",
    "chain": "flow", "group": "flow", "Signature": "flow", "Flow": "flow",
    "JobEvent": "events", "Hook": "hooks", "Decision": "hooks", "Engine": "engine", "Capabilities": "engine",
    **{name: "errors" for name in __all__[__all__.index("FhTasksError"):]},
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE: raise AttributeError(f"module 'fh_tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
