"""Running one claimed job: on the worker's loop (`async def`), in its thread pool or in its process pool, with its
timeout; its end becomes an outcome (succeed, retry, fail) that the worker records with its next round. A mixin of
`Worker` (`worker/loop.py`).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..context import JobContext, _current
from ..encoding import decode_args, encode_value, is_utf8, sql_value
from ..encoding import error_record as _err
from ..encoding import exception_text as _text
from ..encoding import exception_trace as _trace
from ..errors import ArgumentError, PayloadTooLarge, TaskTimeout
from ..executors import DaemonThreadPool, ProcessPool, call_in_thread, process_pool
from ..logs import log_failed_attempt
from ..records import Claim, Outcome

if TYPE_CHECKING:
    from ..engines.sqlite import SQLiteEngine
    from ..hooks import Hooks
    from ..store.sqlite import SQLiteStore
    from ..task import Task

__all__ = ["Runs"]


@dataclass(eq=False)
class _Run:
    "A claimed job while it runs: its future and whether its outcome is already recorded."
    claim: Claim
    future: asyncio.Future[Any] | None = None
    timer: asyncio.TimerHandle | None = None
    settled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    ctx: JobContext | None = None
    task: Task[Any, Any] | None = None



class Runs:
    "Starting claimed jobs and turning their ends into outcomes; mixed into `Worker`."

    if TYPE_CHECKING:  # what the mixin uses of `Worker`
        engine: SQLiteEngine
        store: SQLiteStore
        hooks: Hooks
        registry: dict[str, Task[Any, Any]]
        _hooked: tuple[int, bool, bool]
        log: logging.Logger
        eager: bool
        running: dict[tuple[str, int], _Run]
        _outcomes: list[tuple[_Run, Outcome]]
        _stopping: bool
        _loop: asyncio.AbstractEventLoop | None
        _threads: DaemonThreadPool | None
        _procs: ProcessPool | None
        _ended: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]]
        _ended_signalled: bool
        def _nudge(self) -> None: ...

    def _start(self, claim: Claim) -> None:
        "Start a claimed job. Never raises: a job that cannot start (bad row, unknown task, any error) fails alone."
        run = _Run(claim)
        try:
            self.running[(claim.id, claim.attempt)] = run
            self._launch(run)
        except Exception as e:
            if run.future is not None and not run.future.done(): run.future.cancel()
            if not run.settled:
                if self._stopping: self._settle(run, "release")
                else: self._reject(run, type(e).__name__, f"the job could not be started: {_text(e)}", _trace(e))
            try: self.running.pop((claim.id, claim.attempt), None)
            except TypeError: pass  # an unhashable id: it never got in

    def _launch(self, run: _Run) -> None:
        claim = run.claim
        if (bad := _bad_row(claim)): return self._reject(run, "BadRow", f"the stored job cannot be run: {bad}")
        task = self.registry.get(claim.task)
        if task is None:
            return self._reject(run, "UnknownTask", f"no task named {claim.task!r} is registered with this app")
        try:
            args, kwargs = decode_args(claim.args)
        except ValueError as e:
            return self._reject(run, "DecodeError", f"stored arguments cannot be decoded: {e}")
        ctx = JobContext(claim.id, claim.task, claim.attempt, claim.max_attempts, self.store)
        run.ctx, run.task = ctx, task
        loop = self._loop
        assert loop is not None
        hooked = self._hooked if self._hooked[0] == self.hooks.version else self._listening()
        if hooked[1]: self.hooks.emit("before_run", ctx, task)
        if task.is_async:
            fut: asyncio.Future[Any] = asyncio.ensure_future(_run_async(ctx, task, args, kwargs))
        elif task.options.process:
            self._procs = self._procs or process_pool()
            fut = asyncio.ensure_future(self._procs.run(task, ctx, args, kwargs))
        else:
            fut = self._run_in_thread(ctx, task.fn, args, kwargs)
        run.future = fut
        timeout = claim.timeout if claim.timeout is not None else task.options.timeout
        if timeout: run.timer = loop.call_later(timeout, self._timed_out, run, task, timeout)
        fut.add_done_callback(lambda f: self._done(run, task, f))

    def _listening(self) -> tuple[int, bool, bool]:
        """(hooks' version, whether some hook has `before_run`, `after_run`): every job asks, so the answer is kept in
        `_hooked` until a hook is added (the job path reads it there while `hooks.version` is unchanged)."""
        h = self.hooks
        self._hooked = (h.version, bool(h.overriding("before_run")), bool(h.overriding("after_run")))
        return self._hooked

    def _run_in_thread(self, ctx: JobContext, fn: Any, args: list[Any], kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        """Run a sync task in the worker's thread pool. Finished jobs are handed back to the loop in batches:
        one wake-up of the loop for however many jobs ended meanwhile, not one per job."""
        assert self._loop is not None and self._threads is not None
        fut, loop = self._loop.create_future(), self._loop

        def job() -> None:
            try: outcome: tuple[Any, BaseException | None] = (call_in_thread(ctx, fn, args, kwargs), None)
            except BaseException as e: outcome = (None, e)  # SystemExit in a task fails the job, not the thread
            self._ended.append((fut, *outcome))
            if not self._ended_signalled:
                self._ended_signalled = True
                try: loop.call_soon_threadsafe(self._hand_back)
                except RuntimeError: pass  # the loop is closed: the job was given back already

        self._threads.run(job)
        return fut

    def _hand_back(self) -> None:
        self._ended_signalled = False  # before draining: a job ending meanwhile signals again
        while self._ended:
            fut, value, exc = self._ended.popleft()
            if fut.done(): continue  # cancelled at shutdown: the job was given back
            if exc is None: fut.set_result(value)
            else: fut.set_exception(exc)

    def _timed_out(self, run: _Run, task: Task[Any, Any], timeout: float) -> None:
        if run.settled: return
        exc = TaskTimeout(f"{run.claim.task} ran longer than its {timeout}s timeout")
        # Cancelling an async task stops it and cancelling a process job kills its pool child.
        if run.future is not None and (task.is_async or task.options.process): run.future.cancel()
        # A sync thread cannot be killed: its outcome is recorded now; its slot stays taken until it returns.
        self._failed(run, task, exc)

    def _done(self, run: _Run, task: Task[Any, Any], fut: asyncio.Future[Any]) -> None:
        """The job's future ended. Whatever happens on the way to its outcome (a value that breaks the encoder...)
        ends the job: it never stays running."""
        try:
            if run.timer: run.timer.cancel()
            if not run.settled: self._outcome(run, task, fut)
        except Exception as e:
            if not run.settled:
                msg = f"{run.claim.task}: the job's outcome could not be recorded: {type(e).__name__}: {_text(e)}"
                self._reject(run, "ResultError", msg, _trace(e))
        finally:
            # Keyed by attempt: a timed-out sync attempt keeps its slot until its thread returns, beside its retry.
            self.running.pop((run.claim.id, run.claim.attempt), None)
            self._nudge()

    def _outcome(self, run: _Run, task: Task[Any, Any], fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            if self._stopping: self._settle(run, "release")
            else: self._failed(run, task, TaskTimeout(f"{run.claim.task} was cancelled"))
        elif (exc := fut.exception()) is not None: self._failed(run, task, exc)
        else:
            value = fut.result()
            try: result = "null" if value is None else encode_value(value, "the result", self.engine.max_result)
            except Exception as e:
                if isinstance(e, PayloadTooLarge): why = f"{e} (Tasks(max_result=...))"
                else: why = str(e) if isinstance(e, ArgumentError) else f"{type(e).__name__}: {_text(e)}"
                self._reject(run, "ResultError", f"{run.claim.task} returned a value that cannot be stored: {why}")
            else:
                hooked = self._hooked if self._hooked[0] == self.hooks.version else self._listening()
                if run.ctx is not None and hooked[2]: self.hooks.emit("after_run", run.ctx, task, value, None)
                self._settle(run, "succeed", result=result)

    def _failed(self, run: _Run, task: Task[Any, Any], exc: BaseException) -> None:
        "An attempt failed: the hooks decide (the built-in `Retries` hook: the task's backoff while attempts remain)."
        c = run.claim
        if isinstance(exc, _Exited) and exc.__cause__ is not None: exc = exc.__cause__
        error = _err(type(exc).__name__, _text(exc), _trace(exc))
        ctx = run.ctx or JobContext(c.id, c.task, c.attempt, c.max_attempts, None)
        self.hooks.emit("after_run", ctx, task, None, exc)
        decision = self.hooks.decide(ctx, task, exc)
        if decision.retry:
            d: Any = decision.delay  # a delay that is not seconds: the backoff
            delay = max(0.0, float(d)) if _real(d) and math.isfinite(d) else task.policy.backoff(c.attempt)
            if self.eager: delay = 0.0
            self._log_failure(c, error["type"], error["message"], delay)
            self._settle(run, "retry", error=error, run_at=self.store.clock() + delay)
        else:
            self._log_failure(c, error["type"], error["message"])
            self._settle(run, "fail", error=error)

    def _reject(self, run: _Run, type_: str, message: str, tb: str | None = None) -> None:
        "Fail a job for good, now: it cannot run, or its result cannot be stored."
        self._log_failure(run.claim, type_, message)
        self._settle(run, "fail", error=_err(type_, message, tb))

    def _log_failure(self, c: Claim, type_: str, message: str, retry_in: float | None = None) -> None:
        log_failed_attempt(self.log, c.id, c.task, c.attempt, c.max_attempts, type_, message, retry_in)

    def _settle(self, run: _Run, kind: Any, *, result: str | None = None, error: dict[str, Any] | None = None,
                run_at: float | None = None) -> None:
        run.settled = True
        c = run.claim
        self._outcomes.append((run, Outcome(kind, c.id, c.attempt, result, json.dumps(error) if error else None, run_at,
                                            extra={"task": c.task})))
        if run.future is None: self.running.pop((run.claim.id, run.claim.attempt), None)
        self._nudge()


class _Exited(Exception):
    "Carries a task's SystemExit: raised from an asyncio task it would stop the app's event loop."


async def _run_async(ctx: JobContext, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    _current.set(ctx)  # this asyncio task has its own context copy
    try: return await task.fn(*args, **kwargs)
    except SystemExit as e: raise _Exited() from e


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad_row(c: Claim) -> str | None:
    "Why a claimed row cannot run (a column of the wrong type or out of range, written behind the store's back)."
    # The rows the store writes pass this first test; only a row written behind its back takes the long way.
    if (type(c.id) is str and type(c.task) is str and type(c.args) is str and type(c.attempt) is int
            and type(c.max_attempts) is int and type(c.created_at) is float and c.id and c.attempt >= 1
            and c.max_attempts >= 1 and math.isfinite(c.created_at)
            and (c.timeout is None or (type(c.timeout) in (int, float) and 0 < c.timeout < math.inf))
            and c.id.isascii() and c.task.isascii() and c.args.isascii()):
        return None
    def col(name: str, v: Any, want: str) -> str: return f"column {name} is {sql_value(v)}, not {want}"
    if not isinstance(c.id, str) or not c.id: return col("id", c.id, "a job id")
    if not isinstance(c.task, str): return col("task", c.task, "a task name")
    if not (isinstance(c.attempt, int) and _real(c.attempt) and c.attempt >= 1):
        return col("attempts", c.attempt - 1 if _real(c.attempt) else c.attempt, "a whole number >= 0")
    if not (isinstance(c.max_attempts, int) and _real(c.max_attempts) and c.max_attempts >= 1):
        return col("max_attempts", c.max_attempts, "a whole number >= 1")
    if c.timeout is not None and not (_real(c.timeout) and 0 < c.timeout < math.inf):
        return col("timeout", c.timeout, "NULL or a number of seconds > 0")
    if not (_real(c.created_at) and math.isfinite(c.created_at)): return col("created_at", c.created_at, "a time")
    for name, v in (("id", c.id), ("task", c.task), ("args", c.args)):
        if isinstance(v, str) and not is_utf8(v): return f"column {name} holds text that is not valid UTF-8"
    return None

