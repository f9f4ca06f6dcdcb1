"""Jobs: the handle `defer()` returns (a Starlette `BackgroundTask`), the stored record, its states."""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    #: read only: a stored state this version does not know (written by another version); never written.
    #: The stored text is kept in `JobRecord.raw["state"]`; such a job is not final.
    unknown = "unknown"

    def __str__(self) -> str: return self.value

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = {JobState.succeeded, JobState.failed, JobState.cancelled}


@dataclass(frozen=True)
class JobRecord:
    """A stored job, as read from the store.

    Reading never fails on what another version (or a hand edit) left in a row: an unknown state reads as
    `JobState.unknown`, a value of the wrong type as a default (0, 0.0, None or ""), and every such stored value
    is kept as it was in `raw` (column name -> stored value). An `error` is always None or a dict with a `type`
    and a `message` (str); a `result` or `progress` that is not JSON is the stored text.
    """
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
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobRecord:
        "Build a record from a store row (a mapping of column names); never raises. See the class doc."
        raw: dict[str, Any] = {}
        get = row.get

        def text(k: str) -> str:
            v = get(k)
            if isinstance(v, str): return v
            raw[k] = v
            return "" if v is None else _text(v)

        def opt_text(k: str) -> str | None:
            v = get(k)
            return v if v is None or isinstance(v, str) else text(k)

        def num(k: str, kind: type, default: Any) -> Any:
            v = get(k)
            if v is None and default is None: return None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if kind is float: return float(v)
                if isinstance(v, int) or v.is_integer(): return int(v)
            raw[k] = v
            return default

        try: state = JobState(get("state"))
        except (ValueError, TypeError): state, raw["state"] = JobState.unknown, get("state")
        a = get("args")
        try: args, kwargs = ([], {}) if a is None else decode_args(a)
        except Exception: args, kwargs = [_text(a)], {}  # shown as stored
        return cls(id=text("id"), task=text("task"), queue=text("queue"), state=state, args=args, kwargs=kwargs,
                   attempts=num("attempts", int, 0), max_attempts=num("max_attempts", int, 0),
                   created_at=num("created_at", float, 0.0), run_at=num("run_at", float, 0.0),
                   started_at=num("started_at", float, None), finished_at=num("finished_at", float, None),
                   result=_loads(get("result")), error=_error(get("error")), progress=_loads(get("progress")),
                   parent=opt_text("parent"), worker=opt_text("worker"), raw=raw)

    @property
    def state_text(self) -> str:
        "The state as stored: its value, or the stored text of a state this version does not know."
        if self.state is JobState.unknown and self.raw.get("state") is not None: return _text(self.raw["state"])
        return self.state.value

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
        raise JobFailed(f"job {self.id} ({self.task}) is not finished (state {self.state_text})")


def _text(v: Any) -> str:
    "Stored text as a str: bytes are decoded (bad bytes replaced), anything else is formatted."
    if isinstance(v, str): return v
    if isinstance(v, (bytes, bytearray, memoryview)): return bytes(v).decode("utf-8", "replace")
    return str(v)


def _loads(text: Any) -> Any:
    "A stored JSON value; text that is not JSON (or not text) is returned as stored (bytes decoded)."
    if text is None: return None
    if not isinstance(text, str):
        if not isinstance(text, (bytes, bytearray, memoryview)): return text
        text = _text(text)
    try: return decode_value(text)
    except Exception: return text  # not JSON, or nested too deep for the decoder


def _error(stored: Any) -> dict[str, Any] | None:
    "A stored error as a dict with a str `type` and `message`, whatever shape it was stored in."
    e = _loads(stored)
    if e is None: return None
    if not isinstance(e, dict): e = {"message": e}
    t, m = e.get("type"), e.get("message")
    return {**e, "type": t if isinstance(t, str) and t else "Error",
            "message": m if isinstance(m, str) else "" if m is None else _text(m)}


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
