"""DramatiqEngine: the hub's tasks on Dramatiq 2.2 workers, over Redis or RabbitMQ (`pip install 'fh-tasks[dramatiq]'`).

    tasks = Tasks(app, engine="dramatiq", broker="redis://127.0.0.1:6379/0", workers=0)
    # then: fh-tasks worker myapp:tasks      (or Dramatiq's own CLI: dramatiq myapp)

`BrokerEngine` (broker.py) keeps every job's record in the status store and decides attempts, retries, delays and
lost workers; this module is the Dramatiq side of it (docs/scaling.md has the operator's view):

- **Broker.** Made here from the URL, never `dramatiq.get_broker()` (which silently makes a RabbitMQ broker on
  localhost), with an explicit middleware stack: `CurrentMessage`, `TimeLimit` (no default limit: the job's own),
  `AsyncIO`, and `_Jobs` (actors, pump, time-limit thread at worker boot). Dramatiq's `Retries`, `AgeLimit`,
  `Callbacks` and `Pipelines` are left out: Dramatiq's 20 retries and 10-minute limit never apply. It becomes the
  global broker only when none is set yet, so that `dramatiq myapp` finds it.
- **Actors.** One per task, named after the task's stored name, declared on that broker with `dramatiq.actor(...,
  broker=broker)`; its function hands the message to `BrokerEngine.run_job`. Queue `q` is Dramatiq queue
  `<namespace>.q`.
- **Messages.** One per attempt, message id = job id, the job's arguments as the message's args and kwargs, JSON
  only (`JSONEncoder`; another encoder is refused). A retry or a delay is never a Dramatiq delay: the status store
  holds it and a pump publishes the job when due, so no delayed message waits unacked in a worker's memory. With
  the status store in the broker's Redis, a new job's record and its message go in one round trip (record first),
  the message written as Dramatiq's own enqueue writes it (one script less); several messages go in one pipeline.
- **Acks.** Dramatiq acks a message after its actor returned (at-least-once). With the status store in the
  broker's Redis, an fh-tasks job's ack (Dramatiq's own script) is sent with the worker thread's next status-store
  script, as the job's success is (its next job's `start`, or the process's keeper within 20 ms): a job costs the
  worker thread one round trip, as in plain Dramatiq, not two. An ack lost with a dying worker only means that its
  message comes back, and that copy is dropped.
- **Retries.** One side only: ours. The hooks decide (`hooks.decide`), the status store records `retrying`, and the
  job is published again when due; Dramatiq's `Retries` middleware is absent, so Dramatiq never retries by itself.
  A failed message is acked, not dead-lettered: its record keeps the error, `tasks.retry(id)` runs it again.
- **Time limits.** A sync task's `timeout` arms Dramatiq's time-limit thread for exactly that call (it raises in the
  worker thread, at the next bytecode: a blocking C call runs to its end first); an async task runs on the AsyncIO
  middleware's event loop, one per worker process, cut at its timeout by asyncio. Both fail the attempt with
  `TaskTimeout`.
- **Lost workers.** A job is running under a lease that a thread of the worker renews. RabbitMQ redelivers a killed
  worker's messages at once and Redis after its `heartbeat_timeout`; while the lease lives those copies are dropped,
  and once it runs out a pump publishes the job again as its next attempt (at most 3 in all, or `max_attempts`).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, cast

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import AsyncIO, CurrentMessage, Middleware, Retries, TimeLimit
from dramatiq.middleware.time_limit import TimeLimitExceeded

from ..context import _current
from ..encoding import decode_args, encode_args
from ..engine import EngineSettings
from ..errors import FhTasksError, QueueUnavailable, TaskTimeout
from ..records import NewJob
from .broker import BrokerEngine, Message
from .status import _safe, worker_name
from .threads import Heartbeat, Pump

if TYPE_CHECKING:
    from ..task import Task

__all__ = ["DramatiqEngine", "DramatiqWorker"]

log = logging.getLogger("fh_tasks.engines.dramatiq")

#: Dramatiq's rule for queue names.
_QUEUE = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")
#: How often Dramatiq's time-limit thread looks for attempts past their timeout (ms): timeouts are that precise.
TIME_LIMIT_INTERVAL = 100
#: What Dramatiq's Redis `dispatch` script does to enqueue a message: a new job's message is written with these two
#: commands, after its record, in one round trip (no second script), once its source shows it still does this.
_ENQUEUE_LUA = ('local queue_full_name = namespace .. ":" .. queue_name',
                'local queue_messages = queue_full_name .. ".msgs"',
                'redis.call("hset", queue_messages, message_id, message_data)',
                'redis.call("rpush", queue_full_name, message_id)')
#: Waits (s) before each try at running a delivered job while the status store cannot be reached.
STATUS_RETRIES = (0.0, 0.05, 0.25, 1.0)


class DramatiqEngine(BrokerEngine):
    """The hub's jobs on Dramatiq (see the module docstring).

    Args:
        settings: the hub's settings (`broker`: `redis://...` or `amqp://...`; `status`: the status store's Redis,
            by default the broker's when it is Redis; `db`: the request outbox; `lease`, `grace`, `concurrency`).
        namespace: prefix of the status store's keys and of the Dramatiq queue names (`<namespace>.<queue>`).
        heartbeat_timeout: Redis broker: seconds without a heartbeat after which Dramatiq takes a worker for dead and
            puts its unacked messages back (Dramatiq's default, 60).
        maintenance_chance: Redis broker: the share of broker commands (0..1) that run that check; Dramatiq's
            default is 0.001. Our lease brings a lost job back on its own; this only returns the dead worker's
            prefetched messages sooner.
        confirm_delivery: RabbitMQ: wait for the broker to confirm each published message (default True).
        middleware: more Dramatiq middleware, added after ours (not `Retries`: retries are the hub's).
    """

    name = "dramatiq"

    def __init__(self, settings: EngineSettings | None = None, *, namespace: str = "fh",
                 heartbeat_timeout: float = 60.0, maintenance_chance: float = 0.001, confirm_delivery: bool = True,
                 middleware: Sequence[Middleware] = ()) -> None:
        if not _QUEUE.fullmatch(namespace):
            raise ValueError(f"namespace {namespace!r} cannot start a Dramatiq queue name (letters, digits, ._-)")
        if not 0 <= maintenance_chance <= 1: raise ValueError(f"maintenance_chance must be in [0, 1], not "
                                                              f"{maintenance_chance!r}")
        if any(isinstance(m, Retries) for m in middleware):
            raise ValueError("the hub decides retries (Tasks(hooks=...), @tasks.task(retries=...)); "
                             "Dramatiq's Retries middleware cannot be added")
        _require_json()
        super().__init__(settings, namespace=namespace)
        self.time_limit = TimeLimit(time_limit=float("inf"), interval=TIME_LIMIT_INTERVAL)
        stack: list[Middleware] = [CurrentMessage(), self.time_limit, AsyncIO(), _Jobs(self), *middleware]
        self.broker = _broker(self.broker_url, stack, heartbeat_timeout=heartbeat_timeout,
                              maintenance_chance=maintenance_chance, confirm_delivery=confirm_delivery)
        if dramatiq.broker.global_broker is None: dramatiq.set_broker(self.broker)  # `dramatiq myapp` finds it
        self._pipelined = self._redis_batch if hasattr(self.broker, "scripts") else None  # Redis: batches pipelined
        # A new job's record and message in one round trip when the status store is the broker's Redis database
        self._same_redis = self._pipelined is not None and self.status_url == self.broker_url and all(
            hasattr(self.status, a) for a in ("_shas", "_insert_argv", "prefix", "max_events", "redis"))
        self._dispatch_sha: str | None = None
        source = getattr(cast(Any, self.broker).scripts.get("dispatch"), "script", b"") if self._same_redis else b""
        source = source.decode() if isinstance(source, bytes) else str(source)
        self._plain_enqueue = all(x in source for x in _ENQUEUE_LUA)
        # An fh-tasks job's ack goes with its thread's next status script, when that is the broker's Redis database
        if self._same_redis: cast(Any, self.broker).ack_later = self._ack_later
        self.pump: Pump | None = None
        self.heartbeat: Heartbeat | None = None
        self.eager_retries = False  # a burst worker (`testing.drain`) retries without backoff
        self.outcomes = 0           # outcomes recorded by this process's actors
        self._count = threading.Lock()
        self._booted = threading.Lock()

    def __repr__(self) -> str:
        return f"<DramatiqEngine broker={_safe(self.broker_url)!r} status={_safe(self.status_url)!r} " \
               f"ns={self.namespace!r}>"

    def queue_name(self, queue: str) -> str:
        "The Dramatiq queue of the hub's queue `queue`."
        name = f"{self.namespace}.{queue}"
        if not _QUEUE.fullmatch(name):
            raise ValueError(f"queue {queue!r} cannot be a Dramatiq queue name (letters, digits, '.', '_', '-')")
        return name

    # -- BrokerEngine ----------------------------------------------------------------------------------------------
    def register(self, task: Task[Any, Any]) -> None:
        "Declare the task's actor on this engine's broker (no retry or time-limit options: those are the hub's)."
        if task.name in self.broker.actors: return
        name = task.name

        def run(*args: Any, **kwargs: Any) -> None:
            self._deliver(name, list(args), kwargs)

        run.__name__ = run.__qualname__ = name
        run.__module__ = getattr(task.fn, "__module__", None) or __name__
        dramatiq.actor(actor_name=name, queue_name=self.queue_name(task.options.queue), broker=self.broker)(run)

    def publish(self, jobs: Sequence[Message]) -> tuple[int, BaseException | None]:
        "Enqueue one message per job (message id = job id), in order; a broker that cannot be reached stops it."
        if len(jobs) > 1 and self._pipelined is not None:
            try: return self._pipelined(jobs)
            except Exception as e: return 0, self._error(e)  # some may be sent: sent again, their copies are dropped
        for i, j in enumerate(jobs):
            try: self.broker.enqueue(self.message(j))
            except Exception as e: return i, self._error(e)
        return len(jobs), None

    def _send_new(self, jobs: list[NewJob]) -> tuple[int, BaseException | None]:
        """One new job, with the status store in the broker's Redis (the default): its record and its message in one
        round trip on this thread's script connection, the record first (so no worker sees the message before it);
        the message as Dramatiq's `dispatch` script enqueues it (`_ENQUEUE_LUA`: HSET, RPUSH), without running that
        script (its producer heartbeat and 1-in-1000 maintenance are the workers' business). Else, and when a script
        is not loaded yet, `BrokerEngine._send_new` (two overlapping round trips)."""
        st, b = self.status, cast(Any, self.broker)
        sha, dsha = st._shas.get("insert"), self._dispatch_sha
        if len(jobs) != 1 or not self._same_redis or sha is None or dsha is None:
            if self._same_redis and dsha is None: self._dispatch_sha = b.scripts["dispatch"].sha
            return super()._send_new(jobs)
        import redis
        job = jobs[0]
        cmds: list[tuple[Any, ...]] = [("EVALSHA", sha, 1, st.prefix, f"{st.clock():.6f}", st.max_events,
                                        *st._insert_argv(jobs))]
        m = None
        if job.state == "queued" and (text := self._message_text(job)) is not None:  # no Message object needed
            key, rid = f"{b.namespace}:{self.queue_name(job.queue)}", text[0]
            cmds += [("HSET", key + ".msgs", rid, text[1]), ("RPUSH", key, rid)]
        elif job.state == "queued":
            m = self._redis_message(job)
            if self._plain_enqueue:
                key, rid = f"{b.namespace}:{m.queue_name}", m.options["redis_message_id"]
                cmds += [("HSET", key + ".msgs", rid, m.encode()), ("RPUSH", key, rid)]
            else: cmds.append(("EVALSHA", dsha, 1, b.namespace, *self._enqueue_args(m)))
        try: replies = st.send_all(cmds)
        except Exception as e:
            if isinstance(e, redis.exceptions.NoScriptError):  # Redis restarted: the base's path loads the scripts
                st._shas.pop("insert", None)
                self._dispatch_sha = None
                return super()._send_new(jobs)
            return 0, self._error(e)
        if m is not None: b.emit_after("enqueue", m, None)
        elif job.state != "queued" and "queued" in replies[0][1::3]:  # (id, state, new): chained after a success
            return self.publish(jobs)
        return 1, None

    def _ack_later(self, queue: str, message: dramatiq.MessageProxy) -> bool:
        """Ack an fh-tasks job's message with this thread's next status script (its next job's `start`, or the keeper's
        flush within `HOLD_AT_MOST`), the way its success goes: one round trip a job, not two. The ack is Dramatiq's
        own (its `dispatch` script, as `RedisBroker.do_ack` runs it). False, and Dramatiq acks at once, for another
        actor's message or before this process ran a job (no keeper thread to flush it yet)."""
        if message.actor_name not in self.hub.registry or not self._keeper.here: return False
        from dramatiq.common import current_millis
        b, rid = cast(Any, self.broker), message.options["redis_message_id"]
        read = self.status.send_held("EVALSHA", b.scripts["dispatch"].sha, 1, b.namespace, "ack", current_millis(),
                                     queue, b.broker_id, b.heartbeat_timeout, b.dead_message_ttl, 0,
                                     b._max_unpack_size(), rid, doing="ack a message")

        def acked() -> None:
            try:
                read()
                return
            except Exception as e: why = e  # its script not loaded (Redis restarted), or the connection broke
            try: b.do_ack(queue, rid)  # an ack is idempotent: sent again the plain way
            except Exception as e:
                log.warning("message %s (job %s): could not be acked (%s, then %s); Dramatiq delivers it again once "
                            "this worker is gone, and that copy is dropped", rid, message.message_id, why, e)

        self.hold_answer(acked)
        return True

    def _error(self, e: Exception) -> Exception:
        if not _down(e): return e
        return QueueUnavailable(f"the Dramatiq broker at {_safe(self.broker_url)} cannot be reached: "
                                f"{type(e).__name__}: {e}")

    def _redis_batch(self, jobs: Sequence[Message]) -> tuple[int, None]:
        """Several jobs in one round trip on the Redis broker: what `RedisBroker.enqueue` does for each message (a
        fresh `redis_message_id`, the enqueue hooks, its `dispatch` script), pipelined."""
        b: Any = self.broker
        pipe, script = b.client.pipeline(transaction=False), b.scripts["dispatch"]
        sent = [self._redis_message(j) for j in jobs]
        for m in sent: script(keys=[b.namespace], client=pipe, args=self._enqueue_args(m))
        pipe.execute()
        for m in sent: b.emit_after("enqueue", m, None)
        return len(jobs), None

    def _message_text(self, job: Message) -> tuple[str, bytes] | None:
        """A new job's `redis_message_id` and message, encoded as `Message.encode` would encode `message(job)` with it,
        but spliced from the job's stored arguments (`encode_args`' compact JSON object) instead of decoding and
        encoding them again. None when that cannot stand in for the message: the enqueue is not `_ENQUEUE_LUA`, the
        encoder is not Dramatiq's plain JSONEncoder, a middleware watches enqueues (it needs the Message), or the
        arguments are not in that shape."""
        a = job.args
        if not self._plain_enqueue or type(dramatiq.get_encoder()) is not dramatiq.JSONEncoder or \
                not a.endswith("}") or any(_watches_enqueue(mw) for mw in self.broker.middleware): return None
        if a.startswith('{"args":['): body = a[1:-1]
        elif a.startswith('{"kwargs":{'): body = '"args":[],' + a[1:-1]
        else: return None
        from dramatiq.common import current_millis
        rid = str(uuid.uuid4())
        rest = json.dumps({"queue_name": self.queue_name(job.queue), "actor_name": job.task,
                           "options": {"redis_message_id": rid}, "message_id": job.id,
                           "message_timestamp": current_millis()}, separators=(",", ":"))
        return rid, ("{" + body + "," + rest[1:]).encode("utf-8")

    def _redis_message(self, job: Message) -> dramatiq.Message[Any]:
        "The job's message as `RedisBroker.enqueue` sends it: with a `redis_message_id` of its own, hooks told."
        m = self.message(job, {"redis_message_id": str(uuid.uuid4())})
        self.broker.emit_before("enqueue", m, None)
        return m

    def _enqueue_args(self, m: dramatiq.Message[Any]) -> list[Any]:
        "The arguments of Dramatiq's Redis `dispatch` script enqueueing `m`, as `RedisBroker.do_enqueue` passes them."
        from dramatiq.common import current_millis
        b: Any = self.broker
        return ["enqueue", current_millis(), m.queue_name, b.broker_id, b.heartbeat_timeout, b.dead_message_ttl,
                b._should_do_maintenance("enqueue"), b._max_unpack_size(), m.options["redis_message_id"], m.encode()]

    def message(self, job: Message, options: dict[str, Any] | None = None) -> dramatiq.Message[Any]:
        """The Dramatiq message of one attempt of `job`. Built directly rather than by the actor's
        `message_with_options`: a call's `with_options(queue=...)` can differ from the actor's queue, and a pump may
        publish a task this process never registered."""
        args, kwargs = decode_args(job.args)
        return dramatiq.Message(queue_name=self.queue_name(job.queue), actor_name=job.task, args=tuple(args),
                                kwargs=kwargs, options=options or {}, message_id=job.id)

    def call(self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any], timeout: float | None) -> Any:
        "Sync: in this worker thread, under Dramatiq's time limit. Async: on the AsyncIO middleware's event loop."
        if task.is_async:
            loop = get_event_loop_thread()
            if loop is None: return super().call(task, args, kwargs, timeout)  # eager mode: no worker booted
            return loop.run_coroutine(_bounded(_current.get(), task, args, kwargs, timeout))
        if not timeout: return task.fn(*args, **kwargs)
        self._start_time_limits()
        manager, me = self.time_limit.manager, threading.get_ident()
        try:
            manager.add_timeout(me, timeout * 1000)
            try: return task.fn(*args, **kwargs)
            finally: manager.remove_timeout(me)
        except TimeLimitExceeded:
            raise TaskTimeout(f"{task.name} ran longer than its {timeout}s timeout") from None

    def timeout_error(self, error: BaseException) -> bool:
        return isinstance(error, TimeLimitExceeded)

    def worker(self, **options: Any) -> DramatiqWorker:
        return DramatiqWorker(self, **options)

    def close(self) -> None:
        if self.pump is not None: self.pump.stop()
        if self.heartbeat is not None: self.heartbeat.stop()
        super().close()
        with contextlib.suppress(Exception):
            self.broker.close()
            client = getattr(self.broker, "client", None)
            if client is not None: client.close()
        if dramatiq.broker.global_broker is self.broker: dramatiq.broker.global_broker = None

    # -- inside a worker ---------------------------------------------------------------------------------------------
    def _deliver(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        "An actor received a message: run it as the job's next attempt (or drop the copy, as the status store says)."
        message = CurrentMessage.get_current_message()
        if message is None: raise RuntimeError(f"{name}: an fh-tasks actor runs only from a Dramatiq worker")
        for wait in STATUS_RETRIES:  # a restarted Redis fails each pooled connection once
            if wait: time.sleep(wait)  # (never sleep(0) on the job path: it gives up the GIL to the other threads)
            try:
                # overlap: the success is confirmed while Dramatiq acks and the thread takes its next message
                outcome = self.run_job(message.message_id, name, args, kwargs, eager=self.eager_retries, overlap=True)
                break
            except QueueUnavailable as e: error = e
        else:
            # Acked, the message would be lost until the job's redelivery deadline: this process's outbox sends it
            # again once the status store is back (a copy of a job that started meanwhile is dropped then).
            log.warning("job %s (%s): the status store cannot be reached (%s); the job waits in this worker's "
                        "outbox", message.message_id, name, error)
            self.outbox.add([self._job_of(message, name, args, kwargs)])
            return
        if outcome in ("succeeded", "retrying", "failed", "lost"):
            with self._count: self.outcomes += 1

    def _job_of(self, message: dramatiq.Message[Any], name: str, args: list[Any], kwargs: dict[str, Any]) -> NewJob:
        "The job a message carries, as the outbox keeps it (its record, if Redis lost it, is made again from this)."
        task = self.hub.registry.get(name)
        at = message.message_timestamp / 1000
        text = encode_args(name, tuple(args), kwargs, self.hub.max_payload)
        return NewJob(id=message.message_id, task=name, args=text, run_at=at, created_at=at,
                      queue=message.queue_name.removeprefix(f"{self.namespace}."),
                      max_attempts=task.policy.max_attempts if task else 1,
                      timeout=task.options.timeout if task else None)

    def boot(self, worker: Any) -> None:
        "A Dramatiq worker of this broker starts (ours, or `dramatiq myapp`): actors, queues, time limits, a pump."
        _require_json()
        self.sync_tasks()
        for q in self.hub.all_queues(): self.broker.declare_queue(self.queue_name(q))
        self._start_time_limits()
        if self.pump is None:
            self.pump = Pump(self, max(0.01, self.settings.poll_interval))
            self.pump.start()
        if self.heartbeat is None:
            started, prefix = time.time(), f"{self.namespace}."
            names = getattr(worker, "queues", None) or {self.queue_name(q) for q in self.hub.all_queues()}
            queues = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]
            threads = int(getattr(worker, "worker_threads", 0) or 1)
            self.heartbeat = Heartbeat(self, lambda: (self.worker_info(worker_name(), queues, threads, started), []))
            self.heartbeat.start()

    def shutdown(self) -> None:
        "The worker stopped: so do the pump and the heartbeat; the outcomes and acks held back are written."
        try: self.settle()
        except Exception as e: log.warning("could not write the last outcomes or acks (%s); those jobs run again", e)
        pump, self.pump = self.pump, None
        if pump is not None: pump.stop()
        beat, self.heartbeat = self.heartbeat, None
        if beat is not None: beat.stop()

    def _start_time_limits(self) -> None:
        "Start Dramatiq's time-limit thread (Dramatiq's CLI starts it at `process_boot`; our worker at its boot)."
        with self._booted:
            m = self.time_limit.manager
            if isinstance(m, threading.Thread) and m.ident is None: self.time_limit.after_process_boot(self.broker)

    def running(self) -> list[tuple[str, int]]:
        "The attempts running in this process (id, attempt)."
        keeper = self._keeper
        with keeper._lock: return list(keeper._running)


class _Jobs(Middleware):
    "Boots the engine with each Dramatiq worker of its broker and stops its pump with it."

    def __init__(self, engine: DramatiqEngine) -> None:
        self.engine = engine

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.engine.boot(worker)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.engine.shutdown()


class DramatiqWorker:
    """A `dramatiq.Worker` in this process (`fh-tasks worker`; `burst=True` for `testing.drain`): `concurrency`
    threads on the hub's queues. `stop()` lets running jobs finish within `grace` seconds; `stop(now=True)` gives
    them back at once (their leases end, so a pump publishes them again)."""

    def __init__(self, engine: DramatiqEngine, *, burst: bool = False, eager: bool = False,
                 concurrency: int | None = None, queues: Sequence[str] | None = None, grace: float | None = None,
                 lease: float | None = None, poll_interval: float | None = None) -> None:
        s = engine.settings
        self.engine, self.burst, self.eager = engine, burst, eager
        self.concurrency = concurrency or s.concurrency
        self.queues = tuple(queues or engine.hub.queues)
        self.grace = s.grace if grace is None else grace
        self.lease = engine.lease if lease is None else lease
        self.poll_interval = s.poll_interval if poll_interval is None else poll_interval
        if self.concurrency < 1: raise ValueError(f"concurrency must be >= 1, not {self.concurrency}")
        if self.lease <= 0: raise ValueError(f"lease must be > 0 seconds, not {self.lease}")
        self.dramatiq_queues = {engine.queue_name(q) for q in self.queues}
        self.id = worker_name()
        self.processed = 0
        self._stopping = threading.Event()
        self._now = False
        self._wake: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return f"<DramatiqWorker {self.id} queues={','.join(self.queues)} concurrency={self.concurrency}>"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()

        def wake() -> None: loop.call_soon_threadsafe(stopped.set)

        self._wake = wake
        if self._stopping.is_set(): return
        e = self.engine
        e.lease = self.lease
        e.eager_retries = self.eager
        before = e.outcomes
        worker = await loop.run_in_executor(None, self._start)
        try:
            if self.burst: await self._until_idle(stopped)
            else: await stopped.wait()
        finally:
            await loop.run_in_executor(None, self._finish, worker)
            self.processed = e.outcomes - before
            e.eager_retries = False

    def _start(self) -> dramatiq.Worker:
        e = self.engine
        _require_json()
        e.sync_tasks()  # here, not in the boot hook (whose errors Dramatiq only logs): a bad task stops the worker
        if self.burst and e.outbox.exists(): e.outbox.drain()  # jobs requests left in the outbox go first
        ms = int(min(1000, max(50, self.poll_interval * 1000)))  # idle consumers poll at most this often (ms)
        w = dramatiq.Worker(e.broker, queues=self.dramatiq_queues, worker_threads=self.concurrency, worker_timeout=ms)
        w.start()
        return w

    def _finish(self, w: dramatiq.Worker) -> None:
        "Take no more messages; running jobs get the grace period (cut short by `stop(now=True)`), the rest go back."
        e = self.engine
        for c in w.consumers.values(): c.pause()  # fetch nothing more
        for t in w.workers: t.stop()
        deadline = time.monotonic() + self.grace
        while not self._now and time.monotonic() < deadline and any(t.is_alive() for t in w.workers):
            time.sleep(0.02)
        for id, attempt in e.running():  # still running: their leases end now, so a pump publishes them again
            log.warning("job %s (attempt %d) is given back: the worker stops before it finished", id, attempt)
            e._keeper.remove(id, attempt)
            with contextlib.suppress(QueueUnavailable): e.status.lost(id)
        # Consumers stop (within their poll interval); prefetched messages go back. Its `after_worker_shutdown` writes
        # what the threads held back (`shutdown`).
        w.stop(timeout=1000)
        # Dramatiq's Worker leaves its middleware on the broker: a later worker in this process would add another.
        e.broker.middleware[:] = [m for m in e.broker.middleware if getattr(m, "worker", None) is not w]

    async def _until_idle(self, stopped: asyncio.Event) -> None:
        "Burst: return once no job is queued or running and no scheduled job or retry is due."
        status, quiet = self.engine.status, 0
        while not stopped.is_set():
            await asyncio.sleep(0.01)
            c = status.counts()
            now = self.engine.clock()
            queued = c.get("queued", 0) and c["queued"] - status.held_queued()  # held: their queue is paused
            busy = queued > 0 or c.get("running") or any(
                r.run_at <= now for s in ("retrying", "scheduled") if c.get(s)
                for r in status.jobs(state=s, limit=1000))
            quiet = 0 if busy else quiet + 1
            if quiet >= 2: return  # twice in a row: a job between two states is not missed

    def stop(self, now: bool = False) -> None:
        self._now = self._now or now
        self._stopping.set()
        self._wake()


async def _bounded(ctx: Any, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any],
                   timeout: float | None) -> Any:
    "Run an async task on the worker's event loop, as `ctx` (`current_job()`), cancelled at `timeout`."
    _current.set(ctx)  # this coroutine runs in the loop thread's context, not the worker thread's
    coro: Coroutine[Any, Any, Any] = task.fn(*args, **kwargs)
    if not timeout: return await coro
    fut = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({fut}, timeout=timeout)
    if not done:
        fut.cancel()
        with contextlib.suppress(BaseException): await fut
        raise TaskTimeout(f"{task.name} ran longer than its {timeout}s timeout")
    return fut.result()


@functools.cache
def _redis_broker() -> type:
    """Dramatiq's Redis broker, its consumers' ack left to the engine (`DramatiqEngine._ack_later`); made at the first
    Redis broker, as Dramatiq's Redis module needs the redis package."""
    from dramatiq.brokers.redis import RedisBroker, _RedisConsumer

    class Consumer(_RedisConsumer):  # type: ignore[misc]
        def ack(self, message: dramatiq.MessageProxy) -> None:
            later = self.broker.ack_later
            if later is not None and later(self.queue_name, message):
                self.queued_message_ids.discard(message.message_id)  # as Dramatiq's ack does, sent or not
                return
            super().ack(message)

    class Broker(RedisBroker):  # type: ignore[misc]
        """Dramatiq's Redis broker; `ack_later(queue, message)`, when set, may take a message's ack (True: it acks
        it later; False: acked now, as Dramatiq does)."""
        ack_later: Callable[[str, dramatiq.MessageProxy], bool] | None = None

        @property
        def consumer_class(self) -> type:
            return Consumer

    return Broker


def _broker(url: str, middleware: list[Middleware], *, heartbeat_timeout: float, maintenance_chance: float,
            confirm_delivery: bool) -> dramatiq.Broker:
    "The Dramatiq broker for `url`, with exactly `middleware`."
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        import redis
        client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=30.0)
        return _redis_broker()(client=client, middleware=middleware,  # type: ignore[no-any-return]
                               heartbeat_timeout=int(heartbeat_timeout * 1000),
                               maintenance_chance=round(maintenance_chance * 1_000_000))
    if scheme in ("amqp", "amqps"):
        try:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker
        except ModuleNotFoundError as e:
            raise FhTasksError(f"Dramatiq's RabbitMQ broker needs {e.name!r}: pip install 'fh-tasks[dramatiq]'") from e
        return RabbitmqBroker(url=url, middleware=middleware, confirm_delivery=confirm_delivery)
    raise ValueError(f"the dramatiq engine needs a redis:// or amqp:// broker URL, not {_safe(url)!r}")


def _watches_enqueue(mw: Middleware) -> bool:
    "True when a middleware has an enqueue hook (the hook needs the message as a `dramatiq.Message`)."
    t = type(mw)
    return t.before_enqueue is not Middleware.before_enqueue or t.after_enqueue is not Middleware.after_enqueue


def _require_json() -> None:
    "Dramatiq's encoder is process-wide: job messages must be JSON (a JSONEncoder), never pickles."
    enc = dramatiq.get_encoder()
    if not isinstance(enc, dramatiq.JSONEncoder):
        raise FhTasksError(f"fh-tasks on Dramatiq needs Dramatiq's JSONEncoder, but this process set "
                           f"{type(enc).__name__} (dramatiq.set_encoder)")


def _down(e: BaseException) -> bool:
    "True when `e` says the broker cannot be reached (as opposed to a message it refused)."
    if isinstance(e, (BrokerConnectionError, OSError, TimeoutError)): return True
    names = {f"{c.__module__}.{c.__name__}" for c in type(e).__mro__}
    return bool(names & {"redis.exceptions.ConnectionError", "redis.exceptions.TimeoutError",
                         "redis.exceptions.BusyLoadingError", "pika.exceptions.AMQPConnectionError",
                         "pika.exceptions.AMQPChannelError"})
