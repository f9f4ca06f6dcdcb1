"""fh-tasks: durable background tasks for FastHTML, on an embedded SQLite queue."""
from .app import Tasks
from .chain import BackgroundTasks
from .context import JobContext, current_job
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
)
from .job import Job, JobRecord, JobState
from .task import Task
from .ui.status import JobStatus

__version__ = "0.1.0"

__all__ = [
    # The hub and its tasks
    "Tasks", "Task", "BackgroundTasks",
    # Jobs
    "Job", "JobRecord", "JobState", "JobContext", "current_job", "JobStatus",
    # Errors and control flow
    "FhTasksError", "ArgumentError", "PayloadTooLarge", "TaskNotRegistered", "StoreError", "QueueUnavailable",
    "QueueBusy", "JobFailed", "JobCancelled", "TaskTimeout", "Retry",
]
