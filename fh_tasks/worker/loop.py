"""The SQLite engine's worker: claims due jobs in batches, runs them (`runs.py`), records outcomes in batches, keeps
leases alive (`upkeep.py`).

One asyncio loop drives everything. Async tasks run on it; sync tasks in the worker's own thread pool;
`process=True` tasks in a process pool. Store calls are short transactions made from the loop.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..encoding import error_record as _err
from ..encoding import exception_text as _text
from ..errors import QueueBusy, QueueUnavailable
from ..executors import DaemonThreadPool, ProcessPool, process_pool, thread_pool
from ..limits import worker_spec
from ..records import Claim, Outcome, QueueOrder, WorkerInfo
from .runs import Runs, _Run
from .upkeep import Upkeep

if TYPE_CHECKING:
    from ..engines.sqlite import SQLiteEngine

__all__ = ["Worker"]

log = logging.getLogger("fh_tasks.worker")
#: Most jobs claimed in one statement.
CLAIM_BATCH = 64
#: Seconds a busy worker lets doorbell rings gather before it claims: one claim then takes the jobs of several
#: commits of a producer in another process (an idle worker claims at once).
RING_GATHER = 0.001
#: The workers running in this process. A suspect job (one that was running in a worker that died) runs only
#: while no other job runs in the process, and no worker of the process claims anything beside it.
_in_process: set[Worker] = set()


class Worker(Runs, Upkeep):
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
        self.registry = engine.registry  # the hub's dict of tasks, filled in place as tasks are registered
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
        self._hooked = (-1, True, True)  # see `_listening`

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
        if any(t.options.process and t.options.queue in self.queues for t in self.registry.values()):
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
        try: seen = self.store.data_version()
        except Exception:  # the first idle wait reads it again
            self.log.exception("could not read the job store's change counter; trying again")
            seen = -1
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
                    try:
                        v = self.store.data_version()
                        if v != seen or self._due_soon(): seen = v; break
                    except Exception:  # the store could not be read: the next round tries it again
                        self.log.exception("could not read the job store while idle; trying again")
                        break
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
        reg = self.registry
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
        reg = self.registry
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
        try: t = self._next_due()
        except Exception:
            self.log.exception("could not read when the next job falls due; polling")
            return self.poll_interval
        return self.poll_interval if t is None else min(self.poll_interval, max(0.001, t - self.store.clock()))

    def _due_soon(self) -> bool:
        if self._waits(): return False
        t = self._next_due()
        return t is not None and t <= self.store.clock()


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



def _process_idle() -> bool:
    "No worker of this process runs a job (one whose outcome is not recorded yet) or is about to start one."
    for w in list(_in_process):
        if w._reserved or (w.running and any(not r.settled for r in list(w.running.values()))): return False
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
