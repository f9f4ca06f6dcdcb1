"""Jobs: the handle `defer()` returns (a Starlette `BackgroundTask`), the stored record, its states."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from starlette.background import BackgroundTask

from .encoding import decode_args, decode_value
from .errors import JobCancelled, JobFailed

if TYPE_CHECKING:
    from .app import Tasks
    from .store import NewJob

__all__ = ["JobState", "JobRecord", "Job"]


class JobState(str, Enum):
    "Where a job is in its life; stored as the lowercase value."
    waiting = "waiting"      #: in an ordered chain, waiting for the previous job to succeed
    scheduled = "scheduled"  #: deferred with a delay, not due yet
    queued = "queued"        #: due, waiting for a worker
    running = "running"      #: claimed by a worker under a lease
    retrying = "retrying"    #: an attempt failed; due again after a backoff
    succeeded = "succeeded"  #: final: the task returned
    failed = "failed"        #: final: out of attempts, or a non-retryable error
    cancelled = "cancelled"  #: final: cancelled before it started

    def __str__(self) -> str: return self.value

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = {JobState.succeeded, JobState.failed, JobState.cancelled}


@dataclass(frozen=True)
class JobRecord:
    "A stored job, as read from the store."
    id: str
    task: str
    queue: str
    state: JobState
    args: list[Any]
    kwargs: dict[str, Any]
    attempts: int
    max_attempts: int
    created_at: float
    run_at: float
    started_at: float | None
    finished_at: float | None
    result: Any
    error: dict[str, Any] | None
    progress: Any
    parent: str | None = None
    worker: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JobRecord:
        "Build a record from a store row; undecodable arguments are shown as they are stored."
        try: args, kwargs = decode_args(row["args"])
        except ValueError: args, kwargs = [row["args"]], {}
        return cls(id=row["id"], task=row["task"], queue=row["queue"], state=JobState(row["state"]),
                   args=args, kwargs=kwargs, attempts=row["attempts"], max_attempts=row["max_attempts"],
                   created_at=row["created_at"], run_at=row["run_at"], started_at=row["started_at"],
                   finished_at=row["finished_at"], result=_loads(row["result"]), error=_loads(row["error"]),
                   progress=_loads(row["progress"]), parent=row["parent"], worker=row["worker"])

    @property
    def done(self) -> bool:
        "True once the job is final (succeeded, failed or cancelled)."
        return self.state.final

    def value(self) -> Any:
        "The result; raises `JobFailed` or `JobCancelled` if the job did not succeed."
        if self.state is JobState.succeeded: return self.result
        if self.state is JobState.cancelled: raise JobCancelled(f"job {self.id} ({self.task}) was cancelled")
        if self.state is JobState.failed:
            e = self.error or {}
            raise JobFailed(f"job {self.id} ({self.task}) failed: {e.get('type', 'Error')}: {e.get('message', '')}")
        raise JobFailed(f"job {self.id} ({self.task}) is not finished (state {self.state})")


def _loads(text: str | None) -> Any:
    try: return decode_value(text)
    except ValueError: return text


class Job(BackgroundTask):
    """One deferred call of a registered task, with its id.

    FastHTML and Starlette accept it wherever they accept a `BackgroundTask`. It is stored before the
    response is sent (inside a request) or at once (outside one); running it as a background task
    only makes sure it is stored.
    """

    def __init__(self, hub: Tasks, new: NewJob) -> None:
        self.hub, self.new = hub, new
        self.id, self.task = new.id, new.task
        self.stored = False
        # BackgroundTask's attributes, so code that inspects them sees a no-argument coroutine.
        self.func, self.args, self.kwargs = self._ensure_stored, (), {}  # type: ignore[assignment]
        self.is_async = True

    def __repr__(self) -> str:
        return f"Job({self.task!r}, id={self.id!r})"

    async def _ensure_stored(self) -> None:
        if not self.stored: self.hub._store_now([self])

    async def __call__(self) -> None:
        await self._ensure_stored()

    def get(self) -> JobRecord | None:
        "The job's current record (None until it is stored)."
        return self.hub.get(self.id)

    @property
    def state(self) -> JobState | None:
        rec = self.get()
        return rec.state if rec else None

    def _check_waitable(self) -> None:
        if not self.stored and self.hub._is_pending(self):
            raise RuntimeError(f"job {self.id} ({self.task}) is stored when the response starts, so the handler that "
                               "deferred it cannot wait for it; wait after the response, or defer outside a request")

    def wait(self, timeout: float | None = 30.0, interval: float = 0.01) -> JobRecord:
        "Block until the job is final and return its record; raises TimeoutError after `timeout` seconds."
        self._check_waitable()
        try: asyncio.get_running_loop()
        except RuntimeError: pass
        else:
            if self.hub._worker_loop_is_current():
                raise RuntimeError("Job.wait() would block the event loop the worker runs on; "
                                   "use `await job.wait_async()`")
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rec := self._final(deadline, timeout)) is None: time.sleep(interval)
        return rec

    async def wait_async(self, timeout: float | None = 30.0, interval: float = 0.01) -> JobRecord:
        "Await the job's final record; raises TimeoutError after `timeout` seconds."
        self._check_waitable()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rec := self._final(deadline, timeout)) is None: await asyncio.sleep(interval)
        return rec

    def _final(self, deadline: float | None, timeout: float | None) -> JobRecord | None:
        "The record once the job is final, None while it is not; TimeoutError past the deadline."
        rec = self.get()
        if rec and rec.done: return rec
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {self.id} ({self.task}) not finished after {timeout}s (state {rec and rec.state})")
        return None

    def result(self, timeout: float | None = 30.0) -> Any:
        "Wait for the job and return its result; raises `JobFailed`/`JobCancelled` if it did not succeed."
        return self.wait(timeout).value()
