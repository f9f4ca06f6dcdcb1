"""Worker: claims due jobs in batches, runs them, records outcomes in batches, keeps leases alive.

One asyncio loop drives everything. Async tasks run on it; sync tasks in the worker's own thread pool;
`process=True` tasks in a process pool. Store calls are short transactions made from the loop.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
import traceback
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .context import JobContext, _current
from .encoding import decode_args, encode_value
from .errors import ArgumentError, Retry, TaskTimeout
from .executors import ProcessPool, call_in_thread, process_pool, thread_pool
from .store import Claim, Outcome

if TYPE_CHECKING:
    from .app import Tasks
    from .task import Task

__all__ = ["Worker"]

log = logging.getLogger("fh_tasks.worker")
#: Seconds between the worker's WAL checkpoints.
CHECKPOINT_EVERY = 0.5
#: Most jobs claimed in one statement.
CLAIM_BATCH = 64


@dataclass(eq=False)
class _Run:
    "A claimed job while it runs: its future and whether its outcome is already recorded."
    claim: Claim
    future: asyncio.Future[Any] | None = None
    timer: asyncio.TimerHandle | None = None
    settled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Worker:
    """Runs jobs from a hub's store until stopped.

    Args:
        hub: the `Tasks` whose registry names the runnable tasks.
        concurrency: jobs running at once (and threads for sync tasks).
        queues: queue names served.
        burst: stop once nothing is due (for tests and scripts).
    """

    def __init__(self, hub: Tasks, *, concurrency: int = 8, queues: tuple[str, ...] = ("default",),
                 lease: float = 30.0, poll_interval: float = 0.1, grace: float = 10.0, burst: bool = False,
                 eager: bool = False, name: str | None = None) -> None:
        if concurrency < 1: raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        self.hub, self.store = hub, hub.store
        self.concurrency, self.queues, self.lease = concurrency, tuple(queues), lease
        self.poll_interval, self.grace, self.burst, self.eager = poll_interval, grace, burst, eager
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.log = log.getChild(self.id.replace(".", "_"))
        self.running: dict[tuple[str, int], _Run] = {}
        self._outcomes: list[tuple[_Run, Outcome]] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._threads: Executor | None = None
        self._ended: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = collections.deque()
        self._ended_signalled = False
        self._procs: ProcessPool | None = None
        self._hurry = False
        self.processed = 0
        self.linger = 0.002
        self._backlog = True       # the last claim filled every free slot: freed slots should claim at once
        self._reserved = 0         # slots promised to jobs handed over by `handoff` and not started yet
        self._linger: asyncio.TimerHandle | None = None

    # -- control ---------------------------------------------------------------------------------
    def wake(self) -> None:
        "Tell the worker new jobs may be due (safe from any thread)."
        loop, ev = self._loop, self._wake
        if loop is None or ev is None or loop.is_closed(): return
        try:
            if _loop_is_current(loop): ev.set()
            else: loop.call_soon_threadsafe(ev.set)
        except RuntimeError: pass  # loop closed meanwhile

    def stop(self, now: bool = False) -> None:
        "Stop claiming; `run()` then finishes running jobs within the grace period (`now`: gives them back at once)."
        self._stopping = True
        if now: self._hurry = True
        self.wake()

    # -- main loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        "Serve jobs until `stop()` (or, in burst mode, until nothing is due)."
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._threads = thread_pool(self.concurrency)
        self.hub._attach(self)
        upkeep = () if self.burst else (self._heartbeats(), self._checkpoints())
        side = [asyncio.ensure_future(c) for c in upkeep]
        if any(t.options.process and t.options.queue in self.queues for t in self.hub.registry.values()):
            self._procs = process_pool()
            side.append(asyncio.ensure_future(self._procs.warm()))  # so the first process job need not wait
        bell = self._listen()
        self.log.debug("worker %s started on queues %s", self.id, ",".join(self.queues))
        try:
            self.store.expire()
            await self._serve()
        finally:
            if bell is not None:
                self._loop.remove_reader(bell.listening.fileno())
                bell.close()
            await self._shutdown()  # leases stay renewed while running jobs get their grace period
            for t in side: t.cancel()
            self.hub._detach(self)
            self._threads.shutdown(wait=False, cancel_futures=True)
            if self._procs: self._procs.shutdown(wait=True, cancel_futures=True)
            self.log.debug("worker %s stopped after %d jobs", self.id, self.processed)

    def _listen(self) -> Any:
        "Watch the store's doorbell, so other processes' new jobs wake this worker without waiting for a poll."
        listen = getattr(self.store, "listen", None)
        bell = listen() if listen is not None and not self.burst else None
        if bell is not None and self._loop is not None and self._wake is not None:
            wake = self._wake

            def rung() -> None:
                bell.drain()
                wake.set()

            self._loop.add_reader(bell.listening.fileno(), rung)
        return bell

    async def _serve(self) -> None:
        assert self._wake is not None
        seen = self.store.data_version() if hasattr(self.store, "data_version") else 0
        while not self._stopping:
            self._wake.clear()
            asked, got = self._round()
            if got and got == asked: await asyncio.sleep(0); continue
            if self.burst and not got and not self.running and not self._outcomes: return
            # Sleep until woken (in-process enqueue, a finished job) or, for other processes' commits, poll.
            while not self._wake.is_set() and not self._stopping:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_timeout())
                except asyncio.TimeoutError:
                    v = self.store.data_version() if hasattr(self.store, "data_version") else seen + 1
                    if v != seen or self._due_soon(): seen = v; break
                    if self.burst and not self.running: break

    def _round(self) -> tuple[int, int]:
        "Record the outcomes gathered so far and claim jobs for the free slots, in one transaction."
        batch = self.take_outcomes()
        free = self.concurrency - len(self.running) - self._reserved
        asked = min(free, CLAIM_BATCH) if free > 0 else 0
        if not batch and not asked: return 0, 0
        try:
            outcomes = [o for _, o in batch]
            accepted, claims = self.store.finish_and_claim(outcomes, self.id, self.queues, asked, self.lease)
        except Exception:
            self.log.exception("could not record outcomes or claim jobs; retrying")
            self._outcomes = batch + self._outcomes
            return asked, 0
        self.recorded(batch, accepted)
        for c in claims: self._start(c)
        self._backlog = len(claims) >= asked
        return asked, len(claims)

    def recorded(self, batch: list[tuple[_Run, Outcome]], accepted: int) -> None:
        "Outcomes were committed (by this worker, or by a request's commit that took them)."
        if not batch: return
        self.processed += len(batch)
        if accepted < len(batch):
            self.log.warning("%d outcome(s) refused: the lease had expired and the job was taken back",
                             len(batch) - accepted)

    def _idle_timeout(self) -> float:
        "Sleep until the next poll, or until a scheduled job or a retry falls due if that is sooner."
        nd = getattr(self.store, "next_due", None)
        # A short poll finds due jobs soon enough on its own; a full worker is woken when a job ends.
        if nd is None or self.poll_interval <= 0.05 or len(self.running) >= self.concurrency:
            return self.poll_interval
        t = nd(self.queues)
        return self.poll_interval if t is None else min(self.poll_interval, max(0.001, t - self.store.clock()))

    def _due_soon(self) -> bool:
        nd = getattr(self.store, "next_due", None)
        if nd is None: return True
        t = nd(self.queues)
        return t is not None and t <= self.store.clock()

    async def _heartbeats(self) -> None:
        every = max(0.05, self.lease / 3)
        sweep_at = 0.0
        while True:
            await asyncio.sleep(every)
            try:
                if self.running: self.store.heartbeat(self.id, self.lease)
                now = time.monotonic()
                if now >= sweep_at:
                    sweep_at = now + max(1.0, self.lease / 2)
                    if self.store.expire(): self.wake()
                    self.hub._maybe_prune()
            except Exception:
                self.log.exception("lease upkeep failed; will retry")

    async def _checkpoints(self) -> None:
        "Checkpoint the WAL from a thread, off the commit path, so it stays small and commits stay cheap."
        checkpoint = getattr(self.store, "checkpoint", None)
        if checkpoint is None: return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            try: await loop.run_in_executor(None, checkpoint)
            except Exception: self.log.warning("WAL checkpoint failed; commits will checkpoint instead", exc_info=True)

    # -- running one job ------------------------------------------------------------------------
    def _start(self, claim: Claim) -> None:
        run = _Run(claim)
        self.running[(claim.id, claim.attempt)] = run
        task = self.hub.registry.get(claim.task)
        if task is None:
            msg = f"no task named {claim.task!r} is registered with this app"
            return self._settle(run, "fail", error=_err("UnknownTask", msg))
        try:
            args, kwargs = decode_args(claim.args)
        except ValueError as e:
            return self._settle(run, "fail", error=_err("DecodeError", f"stored arguments cannot be decoded: {e}"))
        ctx = JobContext(claim.id, claim.task, claim.attempt, claim.max_attempts, self.store)
        loop = self._loop
        assert loop is not None
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

        self._threads.submit(job)
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
        if run.timer: run.timer.cancel()
        if not run.settled:
            if fut.cancelled():
                if self._stopping: self._settle(run, "release")
                else: self._failed(run, task, TaskTimeout(f"{run.claim.task} was cancelled"))
            elif (exc := fut.exception()) is not None: self._failed(run, task, exc)
            else:
                try: result = encode_value(fut.result(), "the result")
                except ArgumentError as e:
                    msg = f"{run.claim.task} returned a value that is not JSON: {e}"
                    self._settle(run, "fail", error=_err("ResultError", msg))
                else: self._settle(run, "succeed", result=result)
        # Keyed by attempt: a timed-out sync attempt keeps its slot until its thread returns, beside its retry.
        self.running.pop((run.claim.id, run.claim.attempt), None)
        self._nudge()

    def _failed(self, run: _Run, task: Task[Any, Any], exc: BaseException) -> None:
        c = run.claim
        if isinstance(exc, _Exited) and exc.__cause__ is not None: exc = exc.__cause__
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = _err(type(exc).__name__, str(exc), tb)
        if c.attempt < c.max_attempts:
            delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else task.policy.backoff(c.attempt)
            if self.eager: delay = 0.0
            self.log.info("job %s (%s) attempt %d/%d failed: %s; retrying in %.2fs", c.id, c.task, c.attempt,
                          c.max_attempts, error["message"], delay, extra={"action": "retry", "job_id": c.id})
            self._settle(run, "retry", error=error, run_at=self.store.clock() + delay)
        else:
            self.log.warning("job %s (%s) failed after %d attempt(s): %s: %s", c.id, c.task, c.attempt, error["type"],
                             error["message"], extra={"action": "fail", "job_id": c.id})
            self._settle(run, "fail", error=error)

    def _settle(self, run: _Run, kind: Any, *, result: str | None = None, error: dict[str, Any] | None = None,
                run_at: float | None = None) -> None:
        run.settled = True
        self._outcomes.append((run, Outcome(kind, run.claim.id, run.claim.attempt, result,
                                            json.dumps(error) if error else None, run_at)))
        if run.future is None: self.running.pop((run.claim.id, run.claim.attempt), None)
        self._nudge()

    def _nudge(self) -> None:
        """A slot freed or an outcome is waiting. With a backlog, claim again at once; otherwise linger briefly,
        so the outcome rides along with the next commit (a request storing a job, or the next claim)."""
        if self._wake is None or self._loop is None: return
        if self._backlog or self.burst or self._stopping: self._wake.set()
        elif self._linger is None: self._linger = self._loop.call_later(self.linger, self._wake.set)

    # -- in-process handoff: a request's commit takes new jobs and records finished ones ---------
    def handoff_slots(self) -> int:
        "Free slots a commit made on this worker's loop may fill directly (0 from any other thread)."
        if self._stopping or self.burst or self._loop is None or not _loop_is_current(self._loop): return 0
        return max(0, self.concurrency - len(self.running) - self._reserved)

    def take_outcomes(self) -> list[tuple[_Run, Outcome]]:
        "Hand the outcomes waiting to be recorded to a commit; give them back with `restore_outcomes` if it fails."
        if self._linger is not None: self._linger.cancel(); self._linger = None
        batch, self._outcomes = self._outcomes, []
        return batch

    def restore_outcomes(self, batch: list[tuple[_Run, Outcome]]) -> None:
        self._outcomes = batch + self._outcomes
        self._nudge()

    def handoff(self, claims: list[Claim]) -> None:
        "Start jobs a commit stored as claimed by this worker, once the current response is on its way."
        assert self._loop is not None
        self._reserved += len(claims)
        for c in claims: self._loop.call_soon(self._start_reserved, c)

    def _start_reserved(self, claim: Claim) -> None:
        self._reserved -= 1
        self._start(claim)

    def _flush(self) -> None:
        "Record every outcome gathered so far (used at shutdown, when nothing more is claimed)."
        batch, self._outcomes = self._outcomes, []
        if not batch: return
        try:
            accepted = self.store.finish([o for _, o in batch])
        except Exception:
            self.log.exception("could not record %d outcome(s); their leases will expire and they will run again",
                               len(batch))
            return
        self.recorded(batch, accepted)

    # -- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        "Let running jobs finish within the grace period, then give the rest back to the queue."
        pending = [r.future for r in self.running.values() if r.future is not None and not r.future.done()]
        if pending:
            self.log.info("waiting up to %ss for %d running job(s)", self.grace, len(pending))
            await self._wait_running(pending)
        for run in list(self.running.values()):
            if not run.settled:
                if run.future is not None and not run.future.done(): run.future.cancel()
                self._settle(run, "release")
        self._flush()

    async def _wait_running(self, pending: list[asyncio.Future[Any]]) -> None:
        "Wait until the running jobs finish, the grace period ends, or `stop(now=True)` is called."
        assert self._wake is not None
        deadline = time.monotonic() + self.grace
        while pending and not self._hurry and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            woken = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait([*pending, woken], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
            pending = [f for f in pending if not f.done()]


class _Exited(Exception):
    "Carries a task's SystemExit: raised from an asyncio task it would stop the app's event loop."


async def _run_async(ctx: JobContext, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    _current.set(ctx)  # this asyncio task has its own context copy
    try: return await task.fn(*args, **kwargs)
    except SystemExit as e: raise _Exited() from e


def _err(type_: str, message: str, tb: str | None = None) -> dict[str, Any]:
    return {"type": type_, "message": message, "traceback": tb}


def _loop_is_current(loop: asyncio.AbstractEventLoop) -> bool:
    try: return asyncio.get_running_loop() is loop
    except RuntimeError: return False
