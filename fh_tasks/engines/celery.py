"""CeleryEngine: fh-tasks jobs on Celery's workers and broker (Redis or RabbitMQ), records in the status store.

    tasks = Tasks(app, engine="celery", broker="redis://127.0.0.1:6379/0")   # or amqp://guest:guest@host//
    celery_app = tasks.engine.celery          # `celery -A myapp:celery_app worker` works too

    fh-tasks worker myapp:tasks --concurrency 4   # Celery's own worker (prefork) for the hub's Celery app

How fh-tasks maps onto Celery (engines.md §1 has the measurements behind each choice):

- Every hub task is a Celery task under its stored name (`bind=True`, `typing=False`: `defer()` checked the call
  already), on a Celery queue named after its queue (`<namespace>.<queue>` outside the default namespace). JSON
  only: `task_serializer`, `accept_content` and friends are "json"; nothing is ever pickled.
- A job is one message per attempt with `task_id` = the job id, `acks_late=True`, no result backend
  (`ignore_result`): results, errors and progress go to the status store.
- Prefetch ×1 by default (`worker_prefetch_multiplier=1`): a worker holds only the jobs it runs, so no job waits
  behind a long one. `prefetch=4` (Celery's own default) lets a worker fetch its next messages while it runs one:
  plain Celery's throughput on short jobs, at the price of parking jobs behind long ones and, on Redis, of a killed
  worker's prefetched messages waiting out the visibility timeout before they run elsewhere.
- A dead worker's job runs again under our own attempt count: the status store's lease runs out and a pump
  publishes the job again (`task_reject_on_worker_lost` stays off: it requeues without a count, forever).
  Celery's main process reports a pool child that died (`WorkerLostError`), which ends the lease at once.
- Retries are the hub's hooks' decision (`hooks.decide`), carried out by re-publishing the job with the same id:
  at once for an immediate retry, by a pump when its backoff ends; Celery's own retry machinery (`self.retry`,
  `autoretry_for`, ETA messages) is never used, so a delay never waits unacked in a worker.
- Timeouts are Celery time limits in the message: soft = the task's timeout (raises inside the task, recorded as
  `TaskTimeout`), hard = soft + max(1 s, half of it) (kills a stuck pool child; the main process records the
  timeout). Only the prefork pool enforces them: a worker on another pool warns at start for each task with a
  timeout. Async tasks run on an event loop of the pool child, cut at their timeout by asyncio.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import celery
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded

from ..encoding import decode_args
from ..engine import EngineSettings
from ..errors import JobFailed, QueueUnavailable
from .broker import BrokerEngine, Message
from .status import _safe
from .threads import Heartbeat, Pump

if TYPE_CHECKING:
    from ..task import Task

__all__ = ["CeleryEngine", "CeleryWorker", "BurstWorker"]

log = logging.getLogger("fh_tasks.engines.celery")


def hard_limit(timeout: float) -> float:
    "The hard time limit of an attempt with this timeout: the soft one plus max(1 s, half of it)."
    return timeout + max(1.0, timeout / 2)


class CeleryEngine(BrokerEngine):
    """The Celery engine; see the module docstring. `celery` is its Celery app.

    Args:
        settings: the hub's settings: `broker` (redis:// or amqp://; default redis://127.0.0.1:6379/0), `status`
            (default: the broker if Redis), `db` (the outbox), `lease`, `poll_interval`, `concurrency`, `queues`.
        namespace: prefix of the status store's keys, of the Celery queues and (Redis broker) of Kombu's keys.
        redeliver_after: seconds after which a queued job no worker started is published again.
        prefetch: messages a worker process holds (Celery's `worker_prefetch_multiplier`); see the module docstring.
    """

    name = "celery"

    def __init__(self, settings: EngineSettings | None = None, *, namespace: str = "fh",
                 redeliver_after: float = 3600.0, prefetch: int = 1) -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a whole number of messages >= 1, not {prefetch!r}")
        super().__init__(settings, namespace=namespace, redeliver_after=redeliver_after)
        self.prefetch = prefetch
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://", "amqp://", "amqps://", "pyamqp://")):
            raise ValueError(f"the celery engine needs a redis:// or amqp:// broker, not {_safe(self.broker_url)!r}")
        self.celery = self._make_app()
        self.pump: Pump | None = None
        self.heartbeat: Heartbeat | None = None
        self._receivers = [(signals.worker_init, self._on_worker_init), (signals.worker_ready, self._on_worker_ready),
                           (signals.worker_shutdown, self._on_worker_shutdown), (signals.task_failure, self._on_lost),
                           (signals.worker_process_shutdown, self._on_child_exit)]
        for sig, fn in self._receivers: sig.connect(fn, weak=False)

    def queue_name(self, queue: str) -> str:
        "The Celery queue of fh-tasks queue `queue`."
        return queue if self.namespace == "fh" else f"{self.namespace}.{queue}"

    def _make_app(self) -> celery.Celery:
        url = self.broker_url
        transport: dict[str, Any] = {}
        if url.startswith(("redis", "unix")):
            # Delays never wait in the broker, so the visibility timeout only bounds how long an unacked message of a
            # dead worker waits before Redis hands it out again (and the status store refuses the copy, if it ran).
            transport["visibility_timeout"] = 3600
            if self.namespace != "fh": transport["global_keyprefix"] = f"{self.namespace}:"
        else:
            transport["confirm_publish"] = True  # a published job is in RabbitMQ before `submit` returns
        app = celery.Celery(f"fh_tasks.{self.namespace}", broker=url, set_as_current=False)
        app.conf.update(
            task_serializer="json", result_serializer="json", event_serializer="json", accept_content=["json"],
            result_accept_content=["json"], task_ignore_result=True, task_store_errors_even_if_ignored=False,
            task_acks_late=True, task_acks_on_failure_or_timeout=True, task_reject_on_worker_lost=False,
            worker_prefetch_multiplier=self.prefetch, task_default_queue=self.queue_name("default"),
            task_create_missing_queues=True, broker_connection_retry_on_startup=True,
            broker_transport_options=transport, worker_send_task_events=False, task_send_sent_event=False,
            worker_hijack_root_logger=False, enable_utc=True, timezone="UTC")
        app.on_after_finalize.connect(lambda sender=None, **kw: self.sync_tasks(), weak=False)
        return app

    # -- BrokerEngine: tasks, publishing, timeouts -----------------------------------------------------------------
    def register(self, task: Task[Any, Any]) -> None:
        engine, name = self, task.name

        def run(self: celery.Task, *args: Any, **kwargs: Any) -> None:
            try: outcome = engine.run_job(self.request.id, name, list(args), kwargs, overlap=True)
            except QueueUnavailable as e:  # the status store is down: the message goes back, a second later
                log.warning("job %s (%s): %s; its message goes back to the queue", self.request.id, name, e)
                time.sleep(1.0)
                raise Reject(str(e), requeue=True) from e
            if outcome == "failed":  # Celery's own logs and events show the job failed
                raise JobFailed(f"job {self.request.id} ({name}) failed; its error is in the status store")

        run.__name__ = run.__qualname__ = "fh_" + "".join(c if c.isalnum() else "_" for c in name)
        self.celery.task(name=name, bind=True, base=_JobTask, lazy=False, typing=False, acks_late=True,
                         ignore_result=True, fh_engine=self)(run)

    def publish(self, jobs: Sequence[Message]) -> tuple[int, BaseException | None]:
        if not jobs: return 0, None
        self.sync_tasks()
        app, n = self.celery, 0
        try:
            with app.producer_or_acquire() as producer:
                for j in jobs:
                    args, kwargs = decode_args(j.args)
                    task = self.hub.registry.get(j.task)
                    soft = None if j.timeout is None or (task is not None and task.is_async) else j.timeout
                    hard = None if j.timeout is None else hard_limit(j.timeout)
                    app.send_task(j.task, args, kwargs, task_id=j.id, queue=self.queue_name(j.queue),
                                  producer=producer, soft_time_limit=soft, time_limit=hard, ignore_result=True,
                                  add_to_parent=False, retry=False, argsrepr=_repr(j.args), kwargsrepr="")
                    n += 1
        except Exception as e:
            if _unreachable(e):
                return n, QueueUnavailable(f"the Celery broker at {_safe(self.broker_url)} cannot be reached: {e}")
            return n, e
        return n, None

    def timeout_error(self, error: BaseException) -> bool:
        return isinstance(error, (SoftTimeLimitExceeded, TimeLimitExceeded))

    # -- Celery's worker signals (every process of a worker of this app) -------------------------------------------
    def _on_worker_init(self, sender: Any = None, **kw: Any) -> None:
        if getattr(sender, "app", None) is not self.celery: return
        self.sync_tasks()
        pool = str(getattr(sender, "pool_cls", "") or "")
        if "prefork" in pool or pool in ("", "processes"): return
        timed = sorted(t.name for t in self.hub.registry.values() if t.options.timeout and not t.is_async)
        if timed:
            log.warning("this Celery worker's pool (%s) does not enforce time limits: the timeouts of %s will not stop "
                        "them (use the prefork pool)", pool, ", ".join(timed))

    def _on_worker_ready(self, sender: Any = None, **kw: Any) -> None:
        if getattr(sender, "app", None) is not self.celery: return
        if self.pump is None:
            self.pump = Pump(self, self.settings.poll_interval)
            self.pump.start()
        if self.heartbeat is None:
            started = time.time()
            self.heartbeat = Heartbeat(self, lambda: self._describe(sender, started))
            self.heartbeat.start()

    def _describe(self, consumer: Any, started: float) -> tuple[Any, list[int]]:
        """This worker for the dashboard (its heartbeat): Celery's node name, the fh-tasks queues it consumes, its pool
        size, and the processes that run its jobs (the prefork pool's children, or itself)."""
        prefix = "" if self.namespace == "fh" else f"{self.namespace}."
        try: names = [q.name for q in consumer.task_consumer.queues]
        except Exception: names = [self.queue_name(q) for q in self.hub.queues]
        queues = [n.removeprefix(prefix) for n in names if n.startswith(prefix)]
        try: info = consumer.pool.info
        except Exception: info = {}
        pids = [p for p in info.get("processes", []) if isinstance(p, int)]
        concurrency = int(info.get("max-concurrency") or getattr(consumer.pool, "limit", 0) or 1)
        return self.worker_info(str(consumer.hostname), queues, concurrency, started), pids

    def _on_worker_shutdown(self, sender: Any = None, **kw: Any) -> None:
        if getattr(sender, "app", None) is not self.celery: return
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.pump is None: return
        self.pump.stop()
        self.pump = None

    def _on_child_exit(self, **kw: Any) -> None:
        "A pool process is exiting: read the answers to the successes it sent (see `BrokerEngine.settle`)."
        try: self.settle()
        except Exception: log.warning("could not read the last outcomes' answers", exc_info=True)

    def _on_lost(self, sender: Any = None, task_id: str | None = None, exception: Any = None, **kw: Any) -> None:
        "A pool child died running a job (seen by the worker's main process): the job's lease ends now."
        if getattr(sender, "app", None) is self.celery and task_id and isinstance(exception, WorkerLostError):
            try: self.status.lost(task_id)
            except QueueUnavailable: log.warning("job %s: its worker died; it runs again once its lease ends", task_id)

    # -- workers ---------------------------------------------------------------------------------------------------
    def worker(self, **options: Any) -> CeleryWorker | BurstWorker:  # type: ignore[override]
        """`burst=True`: a `BurstWorker` (runs due jobs in this process, then returns: `fh_tasks.testing.drain`);
        otherwise a `CeleryWorker`: Celery's own worker, prefork pool, for `fh-tasks worker`."""
        s = self.settings
        opts: dict[str, Any] = dict(concurrency=s.concurrency, queues=self.hub.queues, lease=s.lease, grace=s.grace,
                                    poll_interval=s.poll_interval)
        opts.update(options)
        if opts.pop("burst", False): return BurstWorker(self, **opts)
        opts.pop("eager", None)
        return CeleryWorker(self, **opts)

    def close(self) -> None:
        for sig, fn in self._receivers: sig.disconnect(fn)
        if self.pump is not None: self.pump.stop()
        if self.heartbeat is not None: self.heartbeat.stop()
        super().close()
        try: self.celery.close()
        except Exception: pass


class _JobTask(celery.Task):  # type: ignore[misc]
    "Base of the Celery tasks of a hub: a hard time limit (seen by the worker's main process) is a failed attempt."
    fh_engine: CeleryEngine
    acks_late = True
    ignore_result = True

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded):
            try: self.fh_engine.attempt_failed_elsewhere(task_id, exc)
            except Exception: log.exception("job %s: could not record its time limit", task_id)


class CeleryWorker:
    """Celery's own worker for a hub's Celery app, run by `fh-tasks worker`: `run()` blocks the calling (main) thread
    in `WorkController.start()`; Celery handles SIGTERM/SIGINT itself (warm shutdown, then cold on a second one)."""

    def __init__(self, engine: CeleryEngine, *, concurrency: int, queues: Sequence[str], lease: float, grace: float,
                 poll_interval: float = 0.1, pool: str = "prefork", name: str | None = None, **celery_options: Any):
        self.engine, self.concurrency, self.queues = engine, concurrency, tuple(queues)
        self.lease, self.grace = lease, grace
        self.pool, self.options = pool, celery_options
        self.id = name or f"fh-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.processed = 0
        self._worker: Any = None
        engine.lease = lease  # the pool children inherit it

    async def run(self) -> None:
        e = self.engine
        e.sync_tasks()
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._worker = w = e.celery.Worker(
            hostname=self.id, pool_cls=self.pool, concurrency=self.concurrency, loglevel=level,
            queues=[e.queue_name(q) for q in self.queues], without_gossip=True, without_mingle=True,
            without_heartbeat=True, optimization="fair", quiet=True, **self.options)
        w.start()
        from celery.worker import state
        self.processed = sum(getattr(state, "total_count", {}).values())
        await asyncio.sleep(0)

    def stop(self, now: bool = False) -> None:
        w = self._worker
        if w is None: return
        if now: w.terminate()
        else: w.stop()


class BurstWorker:
    """Runs the jobs due in the engine's queues in this process, then returns (`fh_tasks.testing.drain`): consumes the
    broker's messages with Kombu (no Celery worker), and runs the pump (delays, retries) between them. Stops once no
    message came for `idle` seconds and nothing is due. `eager`: retries without their backoff."""

    def __init__(self, engine: CeleryEngine, *, queues: Sequence[str], eager: bool = True, idle: float = 0.3,
                 poll_interval: float = 0.01, **_: Any) -> None:
        self.engine, self.queues, self.eager, self.idle = engine, tuple(queues), eager, idle
        self.poll_interval = max(0.005, poll_interval)
        self.id = f"burst-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.concurrency, self.lease, self.grace = 1, engine.lease, 0.0
        self.processed = 0
        self._stop = threading.Event()

    async def run(self) -> None:
        try: await asyncio.get_running_loop().run_in_executor(None, self._run)
        except asyncio.CancelledError:  # `drain(timeout=...)` gave up: the thread stops after its current job
            self._stop.set()
            raise

    def _run(self) -> None:
        e = self.engine
        e.sync_tasks()
        pump, app, got = Pump(e), e.celery, []
        queues = [app.amqp.queues[e.queue_name(q)] for q in self.queues]
        # Redis: block in BRPOP for a short while only (closing the connection waits for a pending BRPOP to end).
        transport = {**app.conf.broker_transport_options, "polling_interval": 0.05}
        conn = app.connection_for_read(transport_options=transport)
        try:
            consumer = conn.Consumer(queues, callbacks=[lambda body, message: got.append((body, message))],
                                     accept=["json"], prefetch_count=1)
            consumer.consume()
            quiet_since = time.monotonic()
            while not self._stop.is_set():
                sent = pump.run_once()
                try: conn.drain_events(timeout=self.poll_interval)
                except TimeoutError: pass
                while got:
                    body, message = got.pop(0)
                    self._handle(body, message)
                    quiet_since = time.monotonic()
                if sent: quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > self.idle and not self._due_now(): break
            consumer.cancel()  # unacked prefetched messages (none: prefetch 1, each acked) go back to the queue
        finally:
            conn.release()

    def _due_now(self) -> bool:
        t = self.engine.status.next_due()
        return t is not None and t <= self.engine.clock()

    def _handle(self, body: Any, message: Any) -> None:
        try:
            args, kwargs = body[0], body[1]
            outcome = self.engine.run_job(message.headers["id"], message.headers["task"], list(args), dict(kwargs),
                                          eager=self.eager)
            if outcome in ("succeeded", "retrying", "failed"): self.processed += 1
        finally:
            message.ack()

    def stop(self, now: bool = False) -> None:
        self._stop.set()


def _repr(args: str) -> str:
    "What Celery shows of a job's arguments (its `argsrepr`): their JSON text, cut (Celery's own repr is slower)."
    return args if len(args) <= 200 else args[:197] + "..."


def _unreachable(e: BaseException) -> bool:
    "A broker that cannot be reached (refused, reset, timed out), as Kombu or the client libraries say it."
    from kombu.exceptions import OperationalError
    return isinstance(e, (OperationalError, ConnectionError, OSError, TimeoutError)) or \
        type(e).__name__ in ("ConnectionError", "TimeoutError", "RecoverableConnectionError")
