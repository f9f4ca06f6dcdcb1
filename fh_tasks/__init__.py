"""fh-tasks: durable background tasks for FastHTML, on an embedded SQLite queue or on Celery and Dramatiq."""
from .chain import BackgroundTasks
from .context import JobContext, current_job
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
from .hooks import Decision, Hook
from .hub import Tasks
from .job import Job
from .records import JobRecord, JobState
from .task import Task
from .ui.status import JobStatus

__version__ = "0.1.0"

__all__ = [
    # The hub and its tasks
    "Tasks", "Task", "BackgroundTasks",
    # Jobs
    "Job", "JobRecord", "JobState", "JobContext", "current_job", "JobStatus",
    # Events, hooks and engines
    "JobEvent", "Hook", "Decision", "Engine", "Capabilities",
    # Errors and control flow
    "FhTasksError", "ArgumentError", "PayloadTooLarge", "TaskNotRegistered", "StoreError", "QueueUnavailable",
    "QueueBusy", "JobFailed", "JobCancelled", "TaskTimeout", "Retry", "Unsupported",
]
