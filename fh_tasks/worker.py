"""Worker: claims due jobs in batches, runs them, records outcomes in batches, keeps leases alive.

One asyncio loop drives everything. Async tasks run on it; sync tasks in the worker's own thread pool;
`process=True` tasks in a process pool. Store calls are short transactions made from the loop.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .context import JobContext, _current
from .encoding import decode_args, encode_value, is_utf8, sql_value, storable_text
from .encoding import error_record as _err
from .encoding import exception_text as _text
from .encoding import exception_trace as _trace
from .errors import ArgumentError, JobCancelled, PayloadTooLarge, QueueBusy, QueueUnavailable, TaskTimeout
from .executors import DaemonThreadPool, ProcessPool, call_in_thread, process_pool, thread_pool
from .limits import worker_spec
from .progress import FLUSH_EVERY
from .records import Claim, Outcome, QueueOrder, WorkerInfo

if TYPE_CHECKING:
    from .engines.sqlite import SQLiteEngine
    from .task import Task

__all__ = ["Worker"]

log = logging.getLogger("fh_tasks.worker")
#: Seconds between the worker's WAL checkpoints.
CHECKPOINT_EVERY = 0.5
#: Seconds between two checks for running jobs cancelled by `tasks.cancel(id, running=True)` (only while jobs run).
CANCEL_CHECK_EVERY = 0.5
#: Most jobs claimed in one statement.
CLAIM_BATCH = 64
#: Seconds a busy worker lets doorbell rings gather before it claims: one claim then takes the jobs of several
#: commits of a producer in another process (an idle worker claims at once).
RING_GATHER = 0.001
#: The workers running in this process. A suspect job (one that was running in a worker that died) runs only
#: while no other job runs in the process, and no worker of the process claims anything beside it.
_in_process: set[Worker] = set()


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


class Worker:
    """The SQLite engine's worker: runs jobs from its store until stopped.

    Args:
        engine: the `SQLiteEngine` whose store it serves and whose hub's registry names the runnable tasks.
        concurrency: jobs running at once (and threads for sync tasks).
        queues: queues served: names (taken together in due order), or a `QueueOrder` (strict or weighted).
        burst: stop once nothing is due (for tests and scripts).
    """

    def __init__(self, engine: SQLiteEngine, *, concurrency: int = 8,
                 queues: QueueOrder | Sequence[str] | str = ("default",),
                 lease: float = 30.0, poll_interval: float = 0.1, grace: float = 10.0, burst: bool = False,
                 eager: bool = False, name: str | None = None) -> None:
        if concurrency < 1: raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        self.engine, self.store, self.hooks = engine, engine.store, engine.hooks
        self.queue_order = QueueOrder.of(queues)
        self.concurrency, self.queues, self.lease = concurrency, self.queue_order.names, lease
        self.rng = random.Random()  # draws the order of weighted queues for each claim (seed it for a fixed order)
        self.poll_interval, self.grace, self.burst, self.eager = poll_interval, grace, burst, eager
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.log = log.getChild(self.id.replace(".", "_"))
        self.running: dict[tuple[str, int], _Run] = {}
        self._outcomes: list[tuple[_Run, Outcome]] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._threads: DaemonThreadPool | None = None
        self._ended: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = collections.deque()
        self._ended_signalled = False
        self._procs: ProcessPool | None = None
        self._hurry = False
        self.processed = 0
        self.linger = 0.002
        self._backlog = True       # the last claim filled every free slot: freed slots should claim at once
        self._reserved = 0         # slots promised to jobs handed over by `handoff` and not started yet
        self._linger: asyncio.TimerHandle | None = None
        self._ring: asyncio.TimerHandle | None = None  # a gathered doorbell ring, due to wake the worker
        self._suspect: Claim | None = None  # the suspect job this worker runs alone
        self._held = False         # busy while a suspect job waits: it claims nothing (and takes no handoff) to drain
        self._tasks = (-1, "[]")   # (registry size, JSON list of the names of the tasks this worker can run)
        self._limits: tuple[int, dict[str, tuple[int | None, float | None]]] = (-1, {})  # see `limit_spec`

    # -- control ---------------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        "The event loop the worker runs on, while it runs."
        return self._loop

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
        self.engine.attach(self)
        _in_process.add(self)
        upkeep = () if self.burst else (self._heartbeats(), self._checkpoints())
        side = [asyncio.ensure_future(c) for c in upkeep]
        side.append(asyncio.ensure_future(self._progress_flushes()))
        if not self.burst: side.append(asyncio.ensure_future(self._cancel_checks()))
        if any(t.options.process and t.options.queue in self.queues for t in self.engine.registry.values()):
            self._procs = process_pool()
            side.append(asyncio.ensure_future(self._procs.warm()))  # so the first process job need not wait
        bell = self._listen()
        self.log.debug("worker %s started on queues %s", self.id, ",".join(self.queues))
        self.hooks.emit("on_worker_start", self)
        try:
            if not self.eager: self.store.register_worker(self.info())
            self.store.expire()
            await self._serve()
        finally:
            if bell is not None:
                self._loop.remove_reader(bell.listening.fileno())
                bell.close()
            await self._shutdown()  # leases stay renewed while running jobs get their grace period
            for t in side: t.cancel()
            self.engine.detach(self)
            self.hooks.emit("on_worker_stop", self)
            _in_process.discard(self)
            if not self.eager:
                try: self.store.unregister_worker(self.id)
                except Exception: self.log.warning("could not unregister worker %s", self.id, exc_info=True)
            self._threads.shutdown(wait=False, cancel_futures=True)
            if self._procs: self._procs.shutdown(wait=True, cancel_futures=True)
            self.log.debug("worker %s stopped after %d jobs", self.id, self.processed)

    def _listen(self) -> Any:
        "Watch the store's doorbell, so other processes' new jobs wake this worker without waiting for a poll."
        bell = self.store.listen() if not self.burst else None
        if bell is not None and bell.listening is not None and self._loop is not None and self._wake is not None:
            wake, loop = self._wake, self._loop

            def rung() -> None:
                bell.drain()
                if not self.running: wake.set()
                elif self._ring is None: self._ring = loop.call_later(RING_GATHER, self._rang)

            self._loop.add_reader(bell.listening.fileno(), rung)
        return bell

    async def _serve(self) -> None:
        assert self._wake is not None
        seen = self.store.data_version()
        while not self._stopping:
            self._wake.clear()
            asked, got = self._round()
            if got and got == asked: await asyncio.sleep(0); continue
            if self.burst and not got and not self.running and not self._outcomes and not self._rate_waits(): return
            # Sleep until woken (in-process enqueue, a finished job) or, for other processes' commits, poll.
            while not self._wake.is_set() and not self._stopping:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_timeout())
                except asyncio.TimeoutError:
                    v = self.store.data_version()
                    if v != seen or self._due_soon(): seen = v; break
                    if self.burst and not self.running: break

    def _round(self) -> tuple[int, int]:
        "Record the outcomes gathered so far and claim jobs for the free slots, in one transaction."
        batch = self.take_outcomes()
        free = self.concurrency - len(self.running) - self._reserved
        asked = min(free, CLAIM_BATCH) if free > 0 and not _suspect_running() else 0
        if not batch and not asked: return 0, 0
        alone = asked > 0 and _process_idle()
        try:
            outcomes = [o for _, o in batch]
            queues, ordered = self.queue_order.draw(self.rng)
            accepted, claims = self.store.finish_and_claim(outcomes, self.id, queues, asked, self.lease,
                                                           tasks=self.task_names(), alone=alone, ordered=ordered,
                                                           limits=self.limit_spec() or None)
        except Exception as e:
            if batch and not isinstance(e, (QueueBusy, QueueUnavailable)):
                # Not a busy store: an outcome that cannot be written must not hold back the others.
                self.log.warning("could not record %d outcome(s) in one commit (%s: %s); recording them one by one",
                                 len(batch), type(e).__name__, _text(e))
                if self._record_each(batch): return self._round()
                return asked, 0
            self.log.exception("could not record outcomes or claim jobs; retrying")
            self._outcomes = batch + self._outcomes
            return asked, 0
        self.recorded(batch, accepted)
        self._suspect = next((c for c in claims if c.suspect), self._suspect)
        for c in claims: self._start(c)
        self._backlog = len(claims) >= asked
        # Busy, nothing claimed: perhaps a suspect job waits for this worker to drain (then take no handoff either).
        if asked: self._held = not claims and not alone and self.store.suspect_due(self.queues, self.task_names())
        return asked, len(claims)

    def _rang(self) -> None:
        "The gathered doorbell rings (or freed slots) are due: wake the worker."
        self._ring = None
        if self._wake is not None: self._wake.set()

    def _waits(self) -> bool:
        "Claims nothing until a job ends: a suspect job runs in this process, or this worker drains for one."
        return self._held or _suspect_running()

    def limit_spec(self) -> dict[str, tuple[int | None, float | None]]:
        "The limits of the tasks this worker runs ({name: (concurrency, interval)}): the claim enforces them."
        reg = self.engine.registry
        if self._limits[0] != len(reg): self._limits = (len(reg), worker_spec(reg))
        return self._limits[1]

    def _next_due(self) -> float | None:
        "When a job is next due here: a job without limits, or one whose key has room (`SQLiteStore.limited_next`)."
        t = self.store.next_due(self.queues, self.task_names())
        if not (spec := self.limit_spec()): return t
        u = self.store.limited_next(self.queues, spec)
        return u if t is None else t if u is None else min(t, u)

    def _rate_waits(self) -> bool:
        "A due job waits for its key's rate window to open (a burst worker waits for it rather than stop)."
        return bool(self.limit_spec()) and self.store.limited_next(self.queues, self.limit_spec(), now_only=True) \
            is not None

    def task_names(self) -> str:
        "The names of the tasks this worker can run, as a JSON list: it claims only their jobs."
        reg = self.engine.registry
        if self._tasks[0] != len(reg): self._tasks = (len(reg), json.dumps(sorted(reg)))
        return self._tasks[1]

    def info(self) -> WorkerInfo:
        "This worker as registered in the store (`fh_workers`), where `fh-tasks stats` and the dashboard see it."
        return WorkerInfo(self.id, socket.gethostname(), os.getpid(), self.queues, tuple(json.loads(self.task_names())),
                          self.concurrency, self.lease)

    def recorded(self, batch: list[tuple[_Run, Outcome]], accepted: int) -> None:
        "Outcomes were committed (by this worker, or by a request's commit that took them)."
        if not batch: return
        self.processed += len(batch)
        if accepted >= len(batch): return
        if len(batch) == 1:
            c = batch[0][0].claim
            self.log.warning("job %s (%s): outcome refused: the lease had expired and the job was taken back", c.id,
                             c.task, extra={"action": "refused", "job_id": c.id, "task": c.task})
        else:
            ids = ", ".join(f"{r.claim.id} ({r.claim.task})" for r, _ in batch[:10])
            self.log.warning("%d of %d outcome(s) refused: the lease had expired and the job was taken back; jobs: %s",
                             len(batch) - accepted, len(batch), ids, extra={"action": "refused"})

    def _record_each(self, batch: list[tuple[_Run, Outcome]]) -> bool:
        """Record outcomes one commit each, after a commit carrying them all failed for a reason other than a busy
        or unavailable store: one that cannot be written fails its job with a minimal error, and the others are
        recorded. False when the store is busy or unavailable: the rest wait for the next round."""
        for i, (run, o) in enumerate(batch):
            try: accepted = self._record_alone(run, o)
            except (QueueBusy, QueueUnavailable):
                self.log.warning("the job store is busy or unavailable; %d outcome(s) wait", len(batch) - i,
                                 exc_info=True)
                self._outcomes = batch[i:] + self._outcomes
                return False
            self.recorded([(run, o)], accepted)
        return True

    def _record_alone(self, run: _Run, o: Outcome) -> int:
        try: return int(self.store.finish([o]))
        except (QueueBusy, QueueUnavailable): raise
        except Exception as e: why = f"{type(e).__name__}: {_text(e)}"
        c = run.claim
        msg = f"{c.task}: the job's outcome ({o.kind}) could not be stored ({why}); it is recorded as failed"
        self._log_failure(c, "OutcomeError", msg)
        minimal = Outcome("fail", o.id, o.attempt, error=json.dumps(_err("OutcomeError", msg)), extra={"task": c.task})
        try: return int(self.store.finish([minimal]))
        except (QueueBusy, QueueUnavailable): raise
        except Exception:
            self.log.exception("job %s (%s): not even its failure could be recorded; it runs again once its lease "
                               "runs out", c.id, c.task, extra={"action": "lost", "job_id": c.id, "task": c.task})
            return 0

    def _idle_timeout(self) -> float:
        "Sleep until the next poll, or until a scheduled job or a retry falls due if that is sooner."
        # A short poll finds due jobs soon enough on its own; a full worker is woken when a job ends, and so is one
        # that runs a suspect job alone or drains for one.
        if self.poll_interval <= 0.05 or len(self.running) >= self.concurrency or self._waits():
            return self.poll_interval
        t = self._next_due()
        return self.poll_interval if t is None else min(self.poll_interval, max(0.001, t - self.store.clock()))

    def _due_soon(self) -> bool:
        if self._waits(): return False
        t = self._next_due()
        return t is not None and t <= self.store.clock()

    async def _heartbeats(self) -> None:
        every = max(0.05, self.lease / 3)
        sweep_at = 0.0
        while True:
            await asyncio.sleep(every)
            try:
                self.store.heartbeat(self.id, self.lease, self.info())  # also tells the store this worker is alive
                now = time.monotonic()
                if now >= sweep_at:
                    sweep_at = now + max(1.0, self.lease / 2)
                    if self.store.expire(): self.wake()
                self.hooks.emit("on_tick", self)
            except Exception:
                self.log.exception("lease upkeep failed; will retry")

    async def _progress_flushes(self) -> None:
        "Write the progress tasks recorded (`current_job().progress`) in one transaction per interval, from a thread."
        store, loop = self.store, asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            if not store.progress_pending(): continue
            try: await loop.run_in_executor(None, store.flush_progress)
            except Exception: self.log.warning("could not record progress; will retry", exc_info=True)

    async def _cancel_checks(self) -> None:
        """Cancelling running jobs (`tasks.cancel(id, running=True)`): every `CANCEL_CHECK_EVERY` seconds, from a
        thread, ask the store which running attempts were cancelled; an async or process job is stopped, a sync one
        sees `current_job().cancelled` (and `progress()` raises `JobCancelled`); no outcome is recorded (`_cancelled`).
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CANCEL_CHECK_EVERY)
            if not self.running: continue
            try: found = await loop.run_in_executor(None, self.store.cancelled_among, list(self.running))
            except Exception:
                self.log.warning("could not check for cancelled jobs; will retry", exc_info=True)
                continue
            for key in found:
                if (run := self.running.get(key)) is not None and not run.settled: self._cancelled(run)

    def _cancelled(self, run: _Run) -> None:
        """A running job was found cancelled. The store holds it cancelled already (the rest of its workflow too), so
        no outcome is recorded: an async job is cancelled and a process job's pool child killed (and replaced) now; a
        sync one runs until it sees the flag (`current_job().cancelled`, or `progress()` raises). Its slot frees as it
        ends."""
        run.settled = True
        c = run.claim
        self.log.info("job %s (%s) cancelled while running", c.id, c.task,
                      extra={"action": "cancel", "job_id": c.id, "task": c.task})
        if run.timer: run.timer.cancel()
        if run.future is not None and run.task is not None and (run.task.is_async or run.task.options.process):
            run.future.cancel()
        if run.ctx is not None and run.task is not None:
            self.hooks.emit("after_run", run.ctx, run.task, None, JobCancelled(f"job {c.id} ({c.task}) was cancelled"))

    async def _checkpoints(self) -> None:
        "Checkpoint the WAL from a thread, off the commit path, so it stays small and commits stay cheap."
        checkpoint, loop = self.store.checkpoint, asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            try: await loop.run_in_executor(None, checkpoint)
            except Exception: self.log.warning("WAL checkpoint failed; commits will checkpoint instead", exc_info=True)

    # -- running one job ------------------------------------------------------------------------
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
        task = self.engine.registry.get(claim.task)
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
        self.hooks.emit("before_run", ctx, task)
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
            try: result = encode_value(fut.result(), "the result", self.engine.max_result)
            except Exception as e:
                if isinstance(e, PayloadTooLarge): why = f"{e} (Tasks(max_result=...))"
                else: why = str(e) if isinstance(e, ArgumentError) else f"{type(e).__name__}: {_text(e)}"
                self._reject(run, "ResultError", f"{run.claim.task} returned a value that cannot be stored: {why}")
            else:
                if run.ctx is not None: self.hooks.emit("after_run", run.ctx, task, fut.result(), None)
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
        "Every failed attempt is a WARNING carrying the job's id, task and error type (also as `extra`)."
        extra = {"action": "fail" if retry_in is None else "retry", "job_id": c.id, "task": c.task,
                 "error_type": type_, "attempt": c.attempt}
        msg = storable_text(message if len(message) <= 500 else message[:497] + "...")
        if retry_in is None:
            self.log.warning("job %s (%s) failed after %s attempt(s): %s: %s", c.id, c.task, c.attempt, type_, msg,
                             extra=extra)
        else:
            self.log.warning("job %s (%s) attempt %s/%s failed: %s: %s; retrying in %.2fs", c.id, c.task, c.attempt,
                             c.max_attempts, type_, msg, retry_in, extra=extra)

    def _settle(self, run: _Run, kind: Any, *, result: str | None = None, error: dict[str, Any] | None = None,
                run_at: float | None = None) -> None:
        run.settled = True
        c = run.claim
        self._outcomes.append((run, Outcome(kind, c.id, c.attempt, result, json.dumps(error) if error else None, run_at,
                                            extra={"task": c.task})))
        if run.future is None: self.running.pop((run.claim.id, run.claim.attempt), None)
        self._nudge()

    def _nudge(self) -> None:
        """A slot freed or an outcome is waiting. With a backlog, claim again at once; otherwise linger briefly,
        so the outcome rides along with the next commit (a request storing a job, or the next claim)."""
        if self._wake is None or self._loop is None: return
        if self.burst or self._stopping: self._wake.set()
        elif self._backlog:
            # Claim when half the slots are free, or soon: one claim per freed slot would cost a commit per job.
            if 2 * (self.concurrency - len(self.running) - self._reserved) >= self.concurrency: self._wake.set()
            elif self._ring is None: self._ring = self._loop.call_later(RING_GATHER, self._rang)
        elif self._linger is None: self._linger = self._loop.call_later(self.linger, self._wake.set)

    # -- in-process handoff: a request's commit takes new jobs and records finished ones ---------
    def handoff_slots(self) -> int:
        "Free slots a commit made on this worker's loop may fill directly (0 from any other thread)."
        if self._stopping or self.burst or self._loop is None or not _loop_is_current(self._loop): return 0
        if self._waits(): return 0  # a suspect job runs, or waits for this worker to drain: it runs alone
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
        except Exception as e:
            if not isinstance(e, (QueueBusy, QueueUnavailable)) and self._record_each(batch): return
            self._outcomes = []
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


def _process_idle() -> bool:
    "No worker of this process runs a job (one whose outcome is not recorded yet) or is about to start one."
    for w in list(_in_process):
        if w._reserved or any(not r.settled for r in list(w.running.values())): return False
    return True


def _suspect_running() -> bool:
    "A worker of this process runs a suspect job: nothing else may start in the process until it ends."
    for w in list(_in_process):
        if (c := w._suspect) is not None and (r := w.running.get((c.id, c.attempt))) is not None and not r.settled:
            return True
    return False


def _loop_is_current(loop: asyncio.AbstractEventLoop) -> bool:
    try: return asyncio.get_running_loop() is loop
    except RuntimeError: return False
