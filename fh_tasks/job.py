"""Job: the handle `defer()` returns, a Starlette `BackgroundTask` that FastHTML runs from a returned tuple."""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from starlette.background import BackgroundTask

from .records import JobRecord, JobState

if TYPE_CHECKING:
    from .hub import Tasks
    from .records import NewJob

__all__ = ["Job", "JobRecord", "JobState"]


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
        self.dropped = False  # its request failed: it is never stored
        # BackgroundTask's attributes, so code that inspects them sees a no-argument coroutine.
        self.func, self.args, self.kwargs = self._ensure_stored, (), {}  # type: ignore[assignment]
        self.is_async = True

    def __repr__(self) -> str:
        return f"Job({self.task!r}, id={self.id!r})"

    async def _ensure_stored(self) -> None:
        if not self.stored and not self.dropped: self.hub.store_jobs([self])

    async def __call__(self) -> None:
        await self._ensure_stored()

    def get(self) -> JobRecord | None:
        "The job's current record (None until it is stored)."
        return self.hub.get(self.id)

    @property
    def state(self) -> JobState | None:
        "The job's state, read from the store now (None: not stored yet, or deleted)."
        rec = self.get()
        return rec.state if rec else None

    def _check_waitable(self) -> None:
        if not self.stored and self.hub.is_pending(self):
            raise RuntimeError(f"job {self.id} ({self.task}) is stored when the response starts, so the handler that "
                               "deferred it cannot wait for it; wait after the response, or defer outside a request")

    def wait(self, timeout: float | None = 30.0, interval: float = 0.01) -> JobRecord:
        "Block until the job is final and return its record; raises TimeoutError after `timeout` seconds."
        self._check_waitable()
        try: asyncio.get_running_loop()
        except RuntimeError: pass
        else:
            if self.hub.engine.runs_on_current_loop():
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
        rec = self.hub.summary(self.id)  # cheap while it runs; the whole record once it is final
        if rec and rec.done: return self.get()
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {self.id} ({self.task}) not finished after {timeout}s (state {rec and rec.state})")
        return None

    def result(self, timeout: float | None = 30.0) -> Any:
        "Wait for the job and return its result; raises `JobFailed`/`JobCancelled` if it did not succeed."
        return self.wait(timeout).value()
