"""BrokerEngine: what the Celery and Dramatiq engines share. A subclass brings the broker; this class brings the rest.

The broker carries one message per job attempt, with the job id as its message id; everything else lives in the
status store (`status.py`, Redis) and, for requests, the outbox (`outbox.py`, the local SQLite file):

- `submit(jobs)` (outside a request) stores the records and publishes the queued jobs (the two round trips overlap);
  if the broker or the status store is down, the jobs go to the outbox and the relay sends them later.
  `submit_request(jobs)` always commits them to the outbox (the request never waits on the broker) and wakes the
  relay, which stores, then publishes them.
- A worker that receives a message calls `run_job(id, task, args, kwargs)`: the status store's `start` admits one
  copy as the next attempt (or drops it), the task runs with `current_job()` set, and the outcome is written,
  fenced by attempt: succeeded (chained jobs released and published), retrying (decided by the hub's hooks:
  `hooks.decide`), or failed. With `overlap=True` a success goes out with the next job's `start`, in the same
  write, and its answer is read with that one's (no job next: the keeper writes it within `HOLD_AT_MOST`, 20 ms,
  while the process is busy, within `FLUSH_EVERY` after a second of no job). Progress is buffered and written by
  a thread of the process, which also renews the leases of the attempts running there (`Keeper`, in
  `threads.py`, with the `Pump` and the `Heartbeat`).
- A `Pump` thread in each worker process publishes what the status store says is due: delayed jobs and retries
  whose time came, jobs whose worker died (their lease ran out), queued jobs past their redelivery deadline. So
  delays and retry backoffs never sit in the broker (no visibility-timeout duplicates, no consumer timeouts),
  and a lost worker's job runs again under our own attempt count, on any broker.

A subclass implements four things, each documented below: `register(task)` (make one hub task known to the broker
library, idempotently), `publish(jobs)` (send messages in order), `worker(**options)` (a worker for `fh-tasks
worker`, or a burst worker for `fh_tasks.testing.drain`) and its class attributes `name`, `capabilities` and
`default_broker`. It may override `call(task, args, kwargs, timeout)` and `timeout_error(error)` to run a task the
way its library does (time limits, event loops).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..context import JobContext, _current
from ..encoding import decode_args, encode_value, error_record
from ..encoding import exception_text as _text
from ..encoding import exception_trace as _trace
from ..engine import RUN_TIME_BUCKETS, Capabilities, EngineSettings, EngineWorker, Overview
from ..errors import ArgumentError, JobCancelled, PayloadTooLarge, QueueUnavailable, TaskTimeout
from ..events import EventBus
from ..logs import log_failed_attempt
from ..pid import pid
from ..records import JobRecord, NewJob, WorkerInfo
from .outbox import Outbox
from .status import REDELIVER_AFTER, Due, StatusStore, worker_name
from .threads import Keeper

if TYPE_CHECKING:
    from ..hooks import Hooks
    from ..hub import Tasks
    from ..task import Task

__all__ = ["BrokerEngine", "Message", "DEFAULT_REDIS"]

log = logging.getLogger("fh_tasks.engines")

#: The status store when neither `status=` nor a redis:// broker says where it is.
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
#: A retry due within this many seconds is published at once by the worker (later ones by a pump, on time).
PUBLISH_NOW = 0.05
#: How long a worker waits for the record of a job whose message came first (about 1.5 s in all), then drops it.
MISSING_WAITS = (0.005, 0.02, 0.05, 0.1, 0.3, 1.0)


class Message(Protocol):
    "What `publish` sends for one job: a `NewJob` or a `status.Due` (`args` is the job's JSON text)."
    @property
    def id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def args(self) -> str: ...
    @property
    def timeout(self) -> float | None: ...


class BrokerEngine(ABC):
    """An engine whose jobs travel through a broker and whose records live in the status store (module docstring).

    Args:
        settings: the hub's settings (`broker`, `status`, `db` for the outbox, `lease`, `poll_interval`...).
        namespace: prefix of the status store's keys and of the broker's queue names: apps (or tests) sharing a
            Redis or a broker each use their own.
        redeliver_after: seconds after which a queued job that no worker started is published again (its message
            may be lost: a Redis without AOF that restarted); the copy a worker takes second is dropped.
    """

    name = ""
    capabilities = Capabilities(listing=True, progress=True, events=True, cancel_queued=True, cancel_running=True,
                                retry=True, delay=True, chains=True, async_tasks=True, burst=True,
                                schedule_at=True, stats=True,
                                admin=True)
    #: The broker used when `Tasks(broker=...)` is not given.
    default_broker = DEFAULT_REDIS

    def __init__(self, settings: EngineSettings | None = None, *, namespace: str = "fh",
                 redeliver_after: float = REDELIVER_AFTER) -> None:
        s = self.settings = settings or EngineSettings()
        self.namespace, self.clock, self.lease = namespace, s.clock, s.lease
        self.broker_url = s.broker or self.default_broker
        redis_broker = self.broker_url.startswith(("redis://", "rediss://", "unix://"))
        self.status_url = s.status or (self.broker_url if redis_broker else DEFAULT_REDIS)
        self.status = StatusStore(self.status_url, namespace=namespace, engine=self.name, clock=s.clock,
                                  redeliver_after=redeliver_after)
        self.bus = EventBus(self.status.feed())
        self.outbox = Outbox(s.db, f"{self.name}:{namespace}", self._send, durability=s.durability, clock=s.clock)
        self._hub: Tasks | None = None
        self._registered: set[str] = set()
        self._keeper = Keeper(self)
        self._warned_workers = False
        #: Writes held for a thread's next status script whose answers are not read yet (see `settle`): the thread, and
        #: what reads the answer (the successes of `run_job(overlap=True)`, a subclass's `hold_answer`).
        self._answers: list[tuple[int, Callable[[], None]]] = []
        self._answers_lock = threading.Lock()
        self._async_runs: dict[tuple[str, int], tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} broker={self.broker_url!r} status={self.status_url!r} ns={self.namespace!r}>"

    # -- what a subclass implements --------------------------------------------------------------------------------
    @abstractmethod
    def register(self, task: Task[Any, Any]) -> None:
        "Make `task` known to the broker library under `task.name` (called once per task, before it is needed)."

    @abstractmethod
    def publish(self, jobs: Sequence[Message]) -> tuple[int, BaseException | None]:
        """Send one message per job, in order, with the job id as message id; returns how many were sent and the
        error that stopped it (a broker that cannot be reached as `QueueUnavailable`), or None."""

    @abstractmethod
    def worker(self, **options: Any) -> EngineWorker:
        "A worker process's worker (`fh-tasks worker`), or a burst worker with `burst=True` (`testing.drain`)."

    def call(self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """Run the task's function (in the worker's process): sync functions as they are (the library enforces
        `timeout`), async ones on this thread's event loop, cut at `timeout` (and stopped by `stop_attempt`)."""
        if not task.is_async: return task.fn(*args, **kwargs)
        ctx, loop = _current.get(), _loop()
        coro = task.fn(*args, **kwargs)
        fut = loop.create_task(asyncio.wait_for(coro, timeout) if timeout else coro)
        if ctx is not None: self._async_runs[(ctx.id, ctx.attempt)] = (loop, fut)
        try: return loop.run_until_complete(fut)
        except asyncio.TimeoutError:
            raise TaskTimeout(f"{task.name} ran longer than its {timeout}s timeout") from None
        except asyncio.CancelledError:
            raise JobCancelled(f"job {ctx and ctx.id} ({task.name}) was cancelled") from None
        finally:
            if ctx is not None: self._async_runs.pop((ctx.id, ctx.attempt), None)

    def stop_attempt(self, id: str, attempt: int) -> None:
        """The job of a running attempt of this process was cancelled: stop it if it can be (an async task run by
        `call`). A sync task sees `current_job().cancelled`, and its `progress()` raises `JobCancelled`."""
        run = self._async_runs.get((id, attempt))
        if run is not None: run[0].call_soon_threadsafe(run[1].cancel)

    def timeout_error(self, error: BaseException) -> bool:
        "True when `error` is the library's way of saying an attempt ran out of time (it is recorded as TaskTimeout)."
        return False

    # -- the hub ---------------------------------------------------------------------------------------------------
    def bind(self, hub: Tasks) -> None:
        if self._hub is not None and self._hub is not hub: raise RuntimeError("this engine belongs to another hub")
        self._hub = hub
        from ..retention import Retention
        after = next((h.after for h in hub.hooks if isinstance(h, Retention)), None)
        self.status.retention = after

    @property
    def hub(self) -> Tasks:
        if self._hub is None: raise RuntimeError(f"this {self.name} engine is not bound to a Tasks hub yet")
        return self._hub

    @property
    def hooks(self) -> Hooks:
        return self.hub.hooks

    def sync_tasks(self) -> None:
        "Register the hub's tasks that the broker library does not know yet (tasks may be added after `bind`)."
        reg = self.hub.registry
        if len(self._registered) == len(reg): return
        for name, task in list(reg.items()):
            if name not in self._registered:
                self.register(task)
                self._registered.add(name)

    # -- storing jobs ----------------------------------------------------------------------------------------------
    def submit(self, jobs: Sequence[NewJob]) -> None:
        "Store and publish `jobs`; whatever the broker or the status store could not take waits in the outbox."
        if not jobs: return
        self.sync_tasks()
        if self.settings.eager: return self._eager(list(jobs))
        sent, error = self._send_new(list(jobs))
        if error is None: return
        if not isinstance(error, QueueUnavailable): raise error
        self.outbox.add(jobs[sent:])

    def _send_new(self, jobs: list[NewJob]) -> tuple[int, BaseException | None]:
        """`_send` for jobs never stored before: the records are written while the messages are published (the two
        round trips overlap), as each new job's state is known (queued unless delayed or chained)."""
        try: answer = self.status.insert_soon(jobs)
        except QueueUnavailable as e: return 0, e
        queued = [j for j in jobs if j.state == "queued"]
        n, error = self.publish(queued)
        try: states = answer()
        except QueueUnavailable as e: return 0, e  # published, maybe not stored: sent again (the copies are dropped)
        if error is not None: return jobs.index(queued[n]), error
        now_queued = {id for id, state, _ in states if state == "queued"}
        if (late := [j for j in jobs if j.id in now_queued and j.state != "queued"]):  # chained after a finished job
            m, error = self.publish(late)
            if error is not None: return jobs.index(late[m]), error
        return len(jobs), None

    async def submit_request(self, jobs: Sequence[NewJob]) -> None:
        "Commit the request's jobs to the outbox (never waiting on the broker); the relay sends them at once."
        if not jobs: return
        if self.settings.eager: return self.submit(jobs)
        if self.settings.durability == "full":
            await asyncio.get_running_loop().run_in_executor(None, self.outbox.add, jobs)
        else:
            self.outbox.add(jobs)

    def _send(self, jobs: list[NewJob]) -> tuple[int, BaseException | None]:
        "Store then publish `jobs` (the outbox's `send`): how many were handed over, in order, and what stopped it."
        self.sync_tasks()
        try: states = self.status.insert(jobs)
        except QueueUnavailable as e: return 0, e
        queued = [j for j, (_, state, _) in zip(jobs, states, strict=True) if state == "queued"]
        n, error = self.publish(queued)
        if error is None: return len(jobs), None
        return jobs.index(queued[n]), error

    def publish_or_later(self, jobs: Sequence[Message]) -> None:
        "Publish jobs the status store already holds; what cannot be sent now is left to the pumps (in a second)."
        if not jobs: return
        n, error = self.publish(jobs)
        if error is None: return
        log.warning("could not publish %d job(s) (%s); a worker's pump sends them later", len(jobs) - n, error)
        try: self.status.due_at([j.id for j in jobs[n:]], self.clock() + 1.0)
        except QueueUnavailable: pass  # their redelivery deadline sends them anyway

    # -- reading and managing jobs ---------------------------------------------------------------------------------
    def get(self, id: str) -> JobRecord | None:
        return self._read(id, self.status.get)

    def summary(self, id: str) -> JobRecord | None:
        return self._read(id, self.status.summary)

    def _read(self, id: str, read: Callable[[str], JobRecord | None]) -> JobRecord | None:
        "The status store's record; while the job waits in the outbox (or the store is down), the outbox's."
        try:
            if (rec := read(id)) is not None: return rec
        except QueueUnavailable:
            if (job := self._pending(id)) is not None: return _pending_record(job)
            raise
        if (job := self._pending(id)) is not None: return _pending_record(job)
        return read(id)  # sent meanwhile

    def _pending(self, id: str) -> NewJob | None:
        return self.outbox.pending(id) if self.outbox.exists() else None

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        return self.status.jobs(state=state, task=task, limit=limit, offset=offset)

    def counts(self) -> dict[str, int]:
        return self.status.counts()

    def cancel_running(self, id: str) -> bool:
        "Cancel a running job: final at once; its worker stops an async attempt, a sync one sees the flag."
        return self.status.cancel_running(id)

    def cancel(self, id: str) -> bool:
        if self.status.cancel(id): return True
        if self._pending(id) is None: return False
        self.outbox.drain(5.0)  # still in the outbox: send it (and what precedes it), then cancel it
        return self.status.cancel(id)

    def retry(self, id: str) -> bool:
        self.sync_tasks()
        due = self.status.requeue(id)
        if due is not None: self.publish_or_later([due])
        return due is not None

    def prune(self, before: float) -> int:
        return self.status.prune(before)

    def prune_events(self) -> int:
        "Forget job events older than an hour (the `Retention` hook calls this)."
        return self.status.prune_events()

    # -- the jobs dashboard (capabilities `stats` and `admin`): the status store's indexes and figures ------------
    def page(self, *, state: str | None = None, task: str | None = None, queue: str | None = None,
             since: float | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[JobRecord], str | None]:
        return self.status.page(state=state, task=task, queue=queue, since=since, before=before, limit=limit)

    def overview(self, window: float = 3600.0) -> Overview:
        hub = self._hub
        return self.status.overview(window, hub.registry if hub else (), hub.all_queues() if hub else (),
                                    RUN_TIME_BUCKETS)

    def attempts(self, id: str) -> list[dict[str, Any]]:
        return self.status.attempts(id)

    def delete(self, id: str) -> bool:
        return self.status.delete(id)

    def retry_failed(self, task: str) -> int:
        self.sync_tasks()
        due = self.status.requeue_failed(task)
        self.publish_or_later(due)
        return len(due)

    def pause(self, queue: str) -> None:
        """Workers start no job of `queue` from now on (each process sees it within `status.PAUSED_TTL`): a job
        delivered meanwhile is held in the status store, its message dropped, until `resume`. Running jobs finish."""
        self.status.pause(queue)

    def resume(self, queue: str) -> None:
        "Workers start jobs of `queue` again; the jobs held meanwhile are published by a pump."
        self.status.resume(queue)

    def worker_info(self, id: str, queues: Sequence[str], concurrency: int, started_at: float) -> WorkerInfo:
        "How a worker process of this engine describes itself in its heartbeats."
        import socket
        return WorkerInfo(id=id, host=socket.gethostname(), pid=os.getpid(), queues=tuple(sorted(queues)),
                          tasks=tuple(sorted(self.hub.registry)), concurrency=concurrency, lease=self.lease,
                          started_at=started_at, last_seen=started_at)

    # -- running jobs (in a worker's process) ----------------------------------------------------------------------
    def run_job(self, id: str, name: str, args: list[Any], kwargs: dict[str, Any], *, eager: bool = False,
                then: Callable[[Sequence[Message]], None] | None = None, overlap: bool = False) -> str:
        """Run a delivered job as its next attempt and record the outcome; returns what happened: "succeeded",
        "retrying", "failed", "cancelled" (while it ran); "lost" (not run: it failed for good, its workers kept
        dying); "held" (not run: its queue is paused); "dropped" (not run: a copy
        of a job that runs elsewhere, has ended, was cancelled, is not due yet or has no record).
        `eager`: retries without backoff. `then` publishes the jobs that follow (default: `publish_or_later`).
        `overlap`: return before the status store has a success (the worker takes its next job meanwhile): it goes
        out with this thread's next `start` and is answered before it, or the process's keeper thread writes it
        (within `HOLD_AT_MOST` while jobs run) and reads its answer."""
        then = then or self.publish_or_later
        task = self.hub.registry.get(name)
        if task is None:  # the library knows it, so the hub did: a task registered under another name meanwhile
            log.error("job %s: no task %r is registered with this hub; the message is dropped", id, name)
            return "unknown"
        if self._held(id, name): return "held"
        st = self.status.start(id, worker_name(), self.lease)
        self.settle(mine=True)  # this thread's earlier successes went with this `start`, answered before it
        for wait in MISSING_WAITS:  # its record may still be on its way (`status.insert_soon`)
            if st.why != "missing": break
            time.sleep(wait)
            if self._held(id, name): return "held"
            st = self.status.start(id, worker_name(), self.lease)
        if not st.run:
            if st.lost: log.warning("job %s (%s) failed (WorkerLost): its workers kept dying under it", id, name)
            else: log.debug("job %s (%s): message dropped (%s)", id, name, st.why)
            return "lost" if st.lost else "dropped"
        ctx = JobContext(id, name, st.attempt, st.max_attempts, self.status)
        self._keeper.add(id, st.attempt)
        token = _current.set(ctx)
        result: Any = None
        error: BaseException | None = None
        try:
            self.hooks.emit("before_run", ctx, task)
            try: result = self.call(task, args, kwargs, st.timeout)
            except (Exception, SystemExit) as e:
                error = TaskTimeout(f"{name} ran longer than its {st.timeout}s timeout") if self.timeout_error(e) else e
        finally:
            _current.reset(token)
            self._keeper.remove(id, st.attempt)
        try:
            if self.status.is_cancelled(id, st.attempt): outcome = "cancelled"  # final already: nothing to record
            else: outcome = self._record(ctx, task, result, error, eager, then, overlap)
        finally: self.hooks.emit("after_run", ctx, task, result, error)
        return outcome

    def _held(self, id: str, name: str) -> bool:
        "While a queue is paused: True when job `id` is of a paused queue (it then waits in the status store)."
        if not self.status.paused() or not self.status.hold(id): return False
        log.debug("job %s (%s) waits: its queue is paused", id, name)
        return True

    def settle(self, mine: bool = False) -> None:
        """Read the status store's answers to the writes held for a thread's next script: the successes sent with
        `overlap` (publishing the jobs they released), a subclass's `hold_answer`s. `mine`: only those of the calling
        thread (another thread's may still wait for its next `start`)."""
        if not self._answers: return
        me = threading.get_ident()
        with self._answers_lock:
            if mine:
                answers = [a for a in self._answers if a[0] == me]
                self._answers = [a for a in self._answers if a[0] != me]
            else: answers, self._answers = self._answers, []
        for _, read in answers: read()

    def hold_answer(self, read: Callable[[], None]) -> None:
        """Read an answer at this thread's next `settle` (after its next job's `start`): for a write sent with that
        script (`StatusStore.send_held`). `read` handles its own errors."""
        with self._answers_lock: self._answers.append((threading.get_ident(), read))

    def _settle_success(self, ctx: JobContext, read: Callable[[], tuple[bool, list[Due]]],
                        then: Callable[[Sequence[Message]], None]) -> None:
        try: self._succeeded(ctx, read, then)
        except QueueUnavailable as e:
            log.warning("job %s (%s): its success may not be recorded (%s); it runs again if not", ctx.id, ctx.task, e)

    def _succeeded(self, ctx: JobContext, read: Callable[[], tuple[bool, list[Due]]],
                   then: Callable[[Sequence[Message]], None]) -> None:
        ok, follow = read()
        if not ok: log.warning("job %s (%s): outcome refused: attempt no longer holds the job", ctx.id, ctx.task)
        if follow:  # the chained jobs it released: published now, then their redelivery deadline (was: a few seconds)
            then(follow)
            self.status.due_at([j.id for j in follow], self.clock() + self.status.redeliver_after)

    def _record(self, ctx: JobContext, task: Task[Any, Any], result: Any, error: BaseException | None, eager: bool,
                then: Callable[[Sequence[Message]], None], overlap: bool = False) -> str:
        if error is None:
            try: text = encode_value(result, "the result", self.hub.max_result)
            except (ArgumentError, PayloadTooLarge) as e:
                why = f"{e} (Tasks(max_result=...))" if isinstance(e, PayloadTooLarge) else str(e)
                msg = f"{ctx.task} returned a value that cannot be stored: {why}"
                _log_failure(ctx, "ResultError", msg)
                self.status.fail(ctx.id, ctx.attempt, _err("ResultError", msg))
                return "failed"
            # overlap: the success goes with this thread's next `start` (one write), or with the keeper's next flush
            read = self.status.succeed_soon(ctx.id, ctx.attempt, text, defer=overlap)
            if overlap: self.hold_answer(lambda: self._settle_success(ctx, read, then))
            else: self._succeeded(ctx, read, then)
            return "succeeded"
        return self.attempt_failed(ctx, task, error, eager=eager, then=then)

    def attempt_failed(self, ctx: JobContext, task: Task[Any, Any], error: BaseException, *, eager: bool = False,
                       then: Callable[[Sequence[Message]], None] | None = None) -> str:
        """Record a failed attempt: retried (after the delay the hooks decide; at once when `eager`) or failed.
        Also for failures seen outside the attempt's process (a hard time limit noticed by a worker's main process)."""
        err = _err(type(error).__name__, _text(error), _trace(error))
        decision = self.hooks.decide(ctx, task, error)
        if not decision.retry:
            _log_failure(ctx, type(error).__name__, _text(error))
            self.status.fail(ctx.id, ctx.attempt, err)
            return "failed"
        delay = 0.0 if eager else max(0.0, float(decision.delay))
        _log_failure(ctx, type(error).__name__, _text(error), delay)
        now_ = delay <= PUBLISH_NOW
        ok, due = self.status.retry(ctx.id, ctx.attempt, err, self.clock() + delay, publish_now=now_)
        if ok and now_ and due is not None: (then or self.publish_or_later)([due])
        return "retrying"

    def attempt_failed_elsewhere(self, id: str, error: BaseException) -> None:
        "A worker's main process saw the attempt running job `id` end badly (its process was killed at its time limit)."
        rec = self.status.get(id)
        task = self.hub.registry.get(rec.task) if rec is not None else None
        if rec is None or task is None or rec.state.value != "running": return
        ctx = JobContext(id, rec.task, rec.attempts, rec.max_attempts, self.status)
        if self.timeout_error(error):
            error = TaskTimeout(f"{rec.task} ran longer than its {self.status.timeout(id)}s timeout")
        self.attempt_failed(ctx, task, error)

    def _eager(self, jobs: list[NewJob]) -> None:
        "Eager mode: store the jobs, then run them here, one after another, retries and chained jobs included."
        states = self.status.insert(jobs)
        todo: list[Message] = [j for j, (_, state, _) in zip(jobs, states, strict=True) if state == "queued"]
        while todo:
            j = todo.pop(0)
            args, kwargs = decode_args(j.args)
            self.run_job(j.id, j.task, args, kwargs, eager=True, then=todo.extend)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        "No in-process workers: jobs run in `fh-tasks worker` processes. Jobs a crash left in the outbox are sent."
        if self.settings.workers and not self.settings.eager and not self._warned_workers:
            self._warned_workers = True
            log.info("the %s engine runs no workers in the web process (workers=%d is ignored): run `fh-tasks worker "
                     "module:tasks` beside it", self.name, self.settings.workers)
        if self.outbox.exists(): self.outbox.start()

    async def stop(self) -> None:
        "Nothing runs here (the outbox relay keeps sending until `close`)."
        return

    def runs_on_current_loop(self) -> bool:
        return False

    def close(self) -> None:
        self.bus.close()
        self.outbox.close()
        self._keeper.stop()
        self.status.close()


_loops: dict[tuple[int, int], asyncio.AbstractEventLoop] = {}


def _loop() -> asyncio.AbstractEventLoop:
    "The event loop async tasks run on in this thread of this process (made on first use)."
    key = (pid(), threading.get_ident())
    loop = _loops.get(key)
    if loop is None or loop.is_closed(): loop = _loops[key] = asyncio.new_event_loop()
    return loop


def _pending_record(j: NewJob) -> JobRecord:
    "A job still in the outbox, as a record: stored, not sent yet."
    return JobRecord.from_row({"id": j.id, "task": j.task, "queue": j.queue, "state": j.state, "args": j.args,
                               "attempts": 0, "max_attempts": j.max_attempts, "created_at": j.created_at,
                               "run_at": j.run_at, "parent": j.parent, "owner": j.owner})


def _err(type_: str, message: str, tb: str | None = None) -> str:
    return json.dumps(error_record(type_, message, tb))


def _log_failure(ctx: JobContext, type_: str, message: str, retry_in: float | None = None) -> None:
    log_failed_attempt(log, ctx.id, ctx.task, ctx.attempt, ctx.max_attempts, type_, message, retry_in)
