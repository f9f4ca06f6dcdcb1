"""Tasks: the hub users create. It holds what the user declared (tasks, hooks, settings) and is the one place that
knows the other parts: every call goes through it to the engine, which stores and runs the jobs."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, cast, overload

from . import web
from .encoding import MAX_PAYLOAD, MAX_RESULT
from .engine import DEFAULT_DB, Engine, EngineSettings
from .engines import make
from .events import EventBus, JobEvent
from .hooks import Hook, Hooks
from .job import Job
from .limits import Limits, task_limits
from .owner import same_owner, session_owner
from .records import JobRecord, JobState, NewJob, QueueOrder
from .retention import DEFAULT_RETENTION, Retention
from .retry import Retries
from .store.sqlite import SQLiteStore
from .task import Task, TaskOptions, _registry, task_name
from .ui.status import PREFIX

__all__ = ["Tasks", "DEFAULT_DB", "DEFAULT_RETENTION"]

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger("fh_tasks")


class _UniqueEngine(Protocol):
    "An engine with capability `unique`: it finds the live job holding a key."
    def live_job(self, key: str) -> str | None: ...


class Tasks:
    """Durable background tasks for a FastHTML (or Starlette) app.

    Args:
        app: the app to bind to (or call `init_app` later). Workers start and stop with its lifespan.
        engine: "sqlite" (embedded, the default), "celery", "dramatiq", or an `Engine`.
        broker: a broker engine's broker URL (`redis://...`, `amqp://...`).
        status: a broker engine's status store URL (Redis; default: the broker's, if Redis).
        db: the SQLite file (the store; a broker engine's outbox).
        store: a `SQLiteStore` to use instead of `db`.
        workers: in-process workers started with the app (0: none; run `fh-tasks worker` beside it).
        concurrency: jobs one worker runs at once.
        queues: queues the workers serve (default: `default` and every registered task's queue), taken together in
            due order: `["high", "default"]` or `"high,default"`; with weights, each claim draws the order of the
            queues: `{"high": 3, "default": 1}` or `"high=3,default=1"` (docs/flow.md).
        strict_queues: take the queues in the order given: a queue's due jobs all go before the next queue's.
        eager: run each job inline when it is stored (for tests).
        durability: "normal" (survives process crashes) or "full" (fsync every commit, group commit).
        lease: seconds a claimed job stays leased without a heartbeat before another worker may take it.
        grace: seconds running jobs get to finish at shutdown before they go back to the queue.
        retention: seconds finished jobs are kept (None: forever).
        max_payload: limit on a job's encoded arguments, in bytes (`defer()` raises `PayloadTooLarge` above it).
        max_result: limit on a job's encoded result, in bytes (a larger result fails the job with `ResultError`).
        hooks: `Hook`s run around enqueueing and running jobs (before the built-in retries and retention).
        prefix: where the app serves the hub's routes (`{prefix}/jobs/{id}/status`); None adds no routes.
        access: `access(request, record) -> bool` decides who sees a job through the hub's routes (status, streams,
            cancel); by default only the session that deferred it (`Tasks.owns`). Others get 404.
    """

    def __init__(self, app: Any = None, *, engine: str | Engine = "sqlite", broker: str | None = None,
                 status: str | None = None, db: str = DEFAULT_DB, store: SQLiteStore | None = None, workers: int = 1,
                 concurrency: int = 8, queues: Sequence[str] | Mapping[str, float] | str | None = None,
                 strict_queues: bool = False, eager: bool = False,
                 durability: Literal["normal", "full"] = "normal", lease: float = 30.0, poll_interval: float = 0.1,
                 grace: float = 10.0, retention: float | None = DEFAULT_RETENTION, max_payload: int = MAX_PAYLOAD,
                 max_result: int = MAX_RESULT, hooks: Iterable[Hook] = (), clock: Callable[[], float] = time.time,
                 prefix: str | None = PREFIX, access: Callable[[Any, JobRecord], bool] | None = None) -> None:
        if isinstance(max_result, bool) or not isinstance(max_result, int) or max_result < 1:
            raise ValueError(f"max_result must be a whole number of bytes >= 1, not {max_result!r}")
        if prefix is not None and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(f"prefix must start with '/' and not end with one, not {prefix!r}")
        order = QueueOrder.of(queues, strict=strict_queues) if queues else None
        if strict_queues and order is None: raise ValueError("strict_queues=True needs the queues in order: queues=")
        self._queue_order = order
        self.settings = EngineSettings(db=db, broker=broker, status=status, durability=durability, workers=workers,
                                       concurrency=concurrency, queues=order.names if order else None, lease=lease,
                                       poll_interval=poll_interval, grace=grace, eager=eager, clock=clock)
        if store is not None:
            if engine != "sqlite": raise ValueError("store= is a SQLiteStore: it needs engine='sqlite'")
            from .engines.sqlite import SQLiteEngine
            engine = SQLiteEngine(self.settings, store=store)
        self.engine: Engine = make(engine, self.settings) if isinstance(engine, str) else engine
        if order is not None and order.mode != "merged":
            self.engine.capabilities.require("queue_order", self.engine.name, f"take queues by {order.mode} order")
        self.clock = clock
        self.registry: dict[str, Task[Any, Any]] = {}
        self.max_payload, self.max_result, self.prefix = max_payload, max_result, prefix
        self.access = access
        # User hooks first: their `on_failure` decides before the built-in retry rule.
        self.hooks = Hooks([*hooks, Retries(), Retention(retention), Limits()])
        self.app: Any = None
        self._unhook: Callable[[], None] | None = None  # the `on_event` hooks' subscription, while started
        self.engine.bind(self)
        if app is not None: self.init_app(app)

    @property
    def bus(self) -> EventBus:
        "The engine's job events (see `subscribe` and `events`)."
        return self.engine.bus

    @property
    def store(self) -> SQLiteStore:
        "The SQLite engine's store (other engines have none)."
        store = getattr(self.engine, "store", None)
        if not isinstance(store, SQLiteStore): raise AttributeError(f"the {self.engine.name} engine has no SQLiteStore")
        return store

    # -- registry --------------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: None = None, /, *, name: str | None = None, queue: str = "default", retries: int = 0,
             retry_delay: float = 1.0, timeout: float | None = None, process: bool = False, priority: int = 0,
             **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn: Callable[P, R] | None = None, /, *, name: str | None = None, queue: str = "default",
             retries: int = 0, retry_delay: float = 1.0, timeout: float | None = None, process: bool = False,
             priority: int = 0, **options: Any) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a task: `@tasks.task` or `@tasks.task(retries=3, timeout=30)`.

        Args:
            name: stored name (default `module:qualname`); keep it stable while jobs are queued.
            queue: queue its jobs go to.
            retries: further attempts after a failure, with exponential backoff from `retry_delay` seconds.
            timeout: seconds an attempt may run before it counts as failed.
            process: run in a process pool (CPU-bound sync functions).
            priority: from -100 to 100: higher runs first within its queue (docs/flow.md; per call: `with_options`).
            **options: options declared by the hub's hooks (`Hook.options`); any other name is refused. The built-in
                `Limits` hook declares limits across every worker (docs/flow.md): `concurrency=2`, `rate="10/s"`,
                `limit_by=lambda customer_id, **_: f"customer:{customer_id}"`.
        """
        if (once := sorted({"at", "key"} & set(options) - set(self.hooks.options))):
            raise TypeError(f"{once[0]}= is given per call, not per task: task.with_options({once[0]}=...).defer()")
        opts = TaskOptions(queue=queue, retries=retries, retry_delay=retry_delay, timeout=timeout, process=process,
                           priority=priority, extra=self._hook_options(options))
        caps = self.engine.capabilities
        if process: caps.require("process_pool", self.engine.name, "run process=True tasks")
        if priority: caps.require("priorities", self.engine.name, f"give tasks a priority (priority={priority!r})")

        def register(f: Callable[P, R]) -> Task[P, R]:
            if isinstance(f, Task): raise TypeError(f"{f.name} is already a registered task")
            if not callable(f): raise TypeError(f"@tasks.task needs a function, not {type(f).__name__}")
            t: Task[P, R] = Task(self, f, name or task_name(f), opts)
            if t.is_async: caps.require("async_tasks", self.engine.name, f"run async task {t.name}")
            if task_limits(t) is not None:  # also refuses limit_by without a limit
                caps.require("limits", self.engine.name, f"limit the concurrency or rate of task {t.name}")
            old = self.registry.get(t.name)
            same = old is None or old.fn is f or getattr(old.fn, "__code__", None) is getattr(f, "__code__", 0)
            if not same:
                raise ValueError(f"two different functions are registered as task {t.name!r}; pass name=")
            self.registry[t.name] = t
            _registry[t.name] = t
            return t

        return register(fn) if fn is not None else register

    def cron(self, expr: str, /, *, tz: str = "UTC", missed: Literal["run_once", "skip"] = "run_once",
             **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a periodic task, fired once per slot of a cron schedule however many processes run workers:

            @tasks.cron("*/5 * * * *", tz="Europe/Paris", retries=2)
            def refresh_rates(): ...

        Args:
            expr: a cron expression: 5 fields, or 6 with seconds first (`"*/10 * * * * *"`), or `@hourly`...
            tz: the zoneinfo time zone the schedule is read in (DST: see `fh_tasks.cron`).
            missed: slots missed while no worker of the task's queue ran: `"run_once"` fires one job for the latest
                of them on start-up, `"skip"` none.
            **options: those of `task()` (name, queue, retries, retry_delay, timeout, process, hooks' options).

        The job knows its slot: `fh_tasks.cron_slot()`. A bad expression or time zone is refused here (ValueError
        naming the task). Needs `pip install fh-tasks[cron]` and an engine with capability `cron` (not Celery or
        Dramatiq). See fh_tasks/cron.py and docs/scheduling.md."""
        from .cron import declare
        return declare(self, expr, tz=tz, missed=missed, options=options)

    def _hook_options(self, options: dict[str, Any]) -> dict[str, Any]:
        "Task options the hooks declare, converted by their converters; an undeclared name is a TypeError."
        declared = self.hooks.options
        out = {}
        for k, v in options.items():
            if k not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise TypeError(f"unknown task option {k!r} (options declared by this hub's hooks: {known})")
            try: out[k] = declared[k](v)
            except (TypeError, ValueError) as e: raise ValueError(f"task option {k}={v!r}: {e}") from None
        return out

    @property
    def queues(self) -> tuple[str, ...]:
        "The queues workers serve: the ones given to `Tasks(queues=...)`, else `default` and every task's queue."
        if self.settings.queues: return self.settings.queues
        return tuple(sorted({"default"} | {t.options.queue for t in self.registry.values()}))

    @property
    def queue_order(self) -> QueueOrder:
        "The queues workers serve and the order they take them in (merged unless `Tasks(queues=...)` said otherwise)."
        if self._queue_order is not None and self.settings.queues == self._queue_order.names: return self._queue_order
        return QueueOrder(self.queues)

    def all_queues(self) -> tuple[str, ...]:
        "The served queues and every registered task's queue (eager mode and `testing.drain` run them all)."
        return tuple(sorted({t.options.queue for t in self.registry.values()} | set(self.queues)))

    # -- deferring -------------------------------------------------------------------------------
    def enqueue(self, new: NewJob, task: Task[Any, Any]) -> Job:
        """Store one job built by `task` (what `task.defer()` calls): in the current request's batch (stored when its
        response starts), else at once. Hooks' `before_enqueue` may refuse it."""
        self.engine.capabilities.admit(new, self.engine.name)
        if new.owner is None: new.owner = web.owner()
        self.hooks.before_enqueue(new, task)
        job = Job(self, new)
        if not web.hold(job): self.store_jobs([job])
        else: self._live_by_key([job])
        return job

    def enqueue_many(self, news: Sequence[NewJob], task: Task[Any, Any]) -> list[Job]:
        """Store many jobs built by `task` (what `task.defer_many()` calls) in one transaction: in the current request's
        batch, else at once. Hooks' `before_enqueue` runs for each job; one refused refuses them all (none stored)."""
        for new in news:
            self.engine.capabilities.admit(new, self.engine.name)
            self.hooks.before_enqueue(new, task)
        jobs = [Job(self, new) for new in news]
        if jobs and web.hold(jobs[0]):
            for j in jobs[1:]: web.hold(j)
            self._live_by_key(jobs)
        else: self.store_jobs(jobs)
        return jobs

    def _live_by_key(self, jobs: Sequence[Job]) -> None:
        """Jobs held for a request's commit whose key a live job holds now become that job: nothing is stored for
        them, and their handle (its `id`) is the live job's from the start. Should a job with the same key be stored
        between now and the commit (a race), the commit does not store this one either and points it at that job
        (`_stored`): the request never fails for it."""
        keys = {j.new.key for j in jobs if j.new.key is not None}
        if not keys: return
        engine = cast(_UniqueEngine, self.engine)  # `with_options(key=)` required capability `unique`
        live = {k: id for k in keys if (id := engine.live_job(k)) is not None}
        for j in jobs:
            if j.new.key in live: j.id = j.new.id = live[j.new.key]; j.stored = True

    def enqueue_each(self, items: Sequence[tuple[NewJob, Task[Any, Any]]]) -> list[Job]:
        """Store jobs of several tasks together (a workflow's: `fh_tasks.chain`, `fh_tasks.group`), all or none: in the
        current request's batch (stored when its response starts), else at once in one transaction. Hooks'
        `before_enqueue` runs for each job; one refused refuses them all (none stored)."""
        caps, engine, owner = self.engine.capabilities, self.engine.name, web.owner()
        for new, task in items:
            caps.admit(new, engine)
            if new.owner is None: new.owner = owner
            self.hooks.before_enqueue(new, task)
        jobs = [Job(self, new) for new, _ in items]
        if jobs and web.hold(jobs[0]):
            for j in jobs[1:]: web.hold(j)
        else: self.store_jobs(jobs)
        return jobs

    def is_pending(self, job: Job) -> bool:
        "True while `job` waits in the current request's batch for the response to start."
        return web.holds(job)

    def store_jobs(self, jobs: Sequence[Job]) -> None:
        "Store these jobs now (those not stored yet), in one transaction."
        rows = [j.new for j in jobs if not j.stored and not j.dropped]
        if not rows: return
        ids = [r.id for r in rows]
        self.engine.submit(rows)
        self._stored(jobs, rows, ids)

    async def store_request(self, jobs: Sequence[Job]) -> None:
        "Store the jobs a request deferred, all or none, before its response starts (the web binding calls this)."
        rows = [j.new for j in jobs if not j.stored and not j.dropped]
        if not rows: return
        ids = [r.id for r in rows]
        await self.engine.submit_request(rows)
        self._stored(jobs, rows, ids)

    def _stored(self, jobs: Sequence[Job], rows: list[NewJob], ids: list[str]) -> None:
        """`rows` were committed; a row whose id changed was not stored: a live job held its key (`with_options(key=)`),
        and its handle becomes that job."""
        for j in jobs:
            j.stored = True
            if j.id != j.new.id:
                log.info("job %s (%s) not stored: job %s holds its key", j.id, j.task, j.new.id,
                         extra={"action": "unique", "job_id": j.new.id, "task": j.task})
                j.id = j.new.id
        self.hooks.emit("after_enqueue", [r for r, id in zip(rows, ids, strict=True) if r.id == id])

    # -- reading and managing jobs ---------------------------------------------------------------
    def get(self, id: str) -> JobRecord | None:
        "The stored job with this id, or None."
        return self.engine.get(id)

    def summary(self, id: str) -> JobRecord | None:
        "The stored job without its arguments and result (cheap: what a status page shows), or None."
        return self.engine.summary(id)

    def jobs(self, state: str | JobState | None = None, task: str | Task[Any, Any] | None = None,
             limit: int = 100, offset: int = 0) -> list[JobRecord]:
        "Stored jobs, newest first, optionally of one state and one task."
        self.engine.capabilities.require("listing", self.engine.name, "list jobs")
        if isinstance(task, Task): task = task.name
        if state is not None: state = JobState(state).value
        return self.engine.jobs(state=state, task=task, limit=limit, offset=offset)

    def counts(self) -> dict[str, int]:
        "Number of jobs in each state."
        self.engine.capabilities.require("listing", self.engine.name, "count jobs")
        return self.engine.counts()

    def cancel(self, id: str, *, running: bool = False) -> bool:
        """Cancel a job that has not started (and the rest of its chain); True when it was cancelled. With
        `running=True` a running job is cancelled too, where the engine can (`Capabilities.cancel_running`)."""
        self.engine.capabilities.require("cancel_queued", self.engine.name, "cancel jobs")
        if self.engine.cancel(id): return True
        return running and self.engine.capabilities.cancel_running and self.engine.cancel_running(id)

    def retry(self, id: str) -> bool:
        "Queue a failed or cancelled job again, with fresh attempts; True when it was requeued."
        self.engine.capabilities.require("retry", self.engine.name, "retry finished jobs")
        return self.engine.retry(id)

    def prune(self, older_than: float) -> int:
        "Delete finished jobs that finished more than `older_than` seconds ago; returns how many."
        return self.engine.prune(self.clock() - older_than)

    def owner(self) -> str | None:
        "The owner token of the current request's session (made if it has none); None outside a request."
        return web.owner()

    def request_session(self) -> dict[str, Any] | None:
        "The current request's session, or None outside a request (or without sessions)."
        return web.session()

    def visible(self, request: Any, rec: JobRecord) -> bool:
        """May `request` (an HTTP request or a websocket) see this job through the hub's routes? The app's
        `access` callable decides if it gave one; by default only the session that deferred the job may, so a job
        deferred outside a request is seen by nobody."""
        if self.access is not None: return bool(self.access(request, rec))
        return self.owns(request, rec)

    def owns(self, request: Any, rec: JobRecord) -> bool:
        """The default access rule: True when `request`'s session deferred the job (for an `access` callable to
        extend: `access=lambda req, rec: is_admin(req) or tasks.owns(req, rec)`)."""
        return same_owner(rec.owner, session_owner(request.scope))

    def notify(self, **options: Any) -> Any:
        """Notify when a job of a task declared with `notify=True` ends (call before declaring those tasks):
        `toast=True` (a FastHTML toast for the deferring session), `sse=True` (an event on its live stream),
        `webhook=url, secret=...` (a signed POST, delivered as a job with `retries`). See `fh_tasks.ui.notify`."""
        from .ui.notify import Notify
        hook = Notify(self, **options)
        self.hooks.add(hook)
        if self.app is not None: hook.install(self.app)
        return hook

    # -- job events ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[JobEvent], Any], *,
                  jobs: Collection[str] | None = None) -> Callable[[], None]:
        """Call `callback(event)` for every job change from now on, made by any process on this store (of `jobs`
        only, if given). Returns a function that unsubscribes. Callbacks run in the event thread: keep them short."""
        self.engine.capabilities.require("events", self.engine.name, "announce job events")
        return self.bus.subscribe(callback, jobs=jobs)

    async def events(self, jobs: Collection[str] | None = None, *,
                     until_final: bool = False) -> AsyncIterator[JobEvent]:
        """Stream job events as they happen: `async for ev in tasks.events([job.id], until_final=True)`.

        With `until_final` the stream ends once every job in `jobs` is final, including jobs that already were."""
        self.engine.capabilities.require("events", self.engine.name, "announce job events")

        def final_now(ids: Collection[str]) -> set[str]:
            return {i for i in ids if (r := self.summary(i)) is not None and r.done}

        async for ev in self.bus.stream(jobs, until_final=until_final, final_now=final_now): yield ev

    # -- workers ---------------------------------------------------------------------------------
    def worker(self, **options: Any) -> Any:
        "A worker for this hub (`fh-tasks worker` runs one), with the hub's settings unless overridden."
        if isinstance(q := options.get("queues"), QueueOrder) and q.mode != "merged":
            self.engine.capabilities.require("queue_order", self.engine.name, f"take queues by {q.mode} order")
        return self.engine.worker(**options)

    async def start(self) -> None:
        "Start the in-process workers on the running loop (the app's lifespan does this)."
        await self.engine.start()
        if self.hooks.overriding("on_event") and self._unhook is None:
            self._unhook = self.subscribe(lambda ev: self.hooks.emit("on_event", ev))

    async def stop(self) -> None:
        "Stop the in-process workers: running jobs get the grace period, the rest go back to the queue."
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        await self.engine.stop()

    def close(self) -> None:
        "Release the engine's connections and threads."
        self.engine.close()

    # -- the jobs dashboard and metrics -----------------------------------------------------------
    def dashboard(self, path: str = "/tasks", *, auth: Callable[[Any], Any] | None = None, local_only: bool = False,
                  metrics: bool = True, app: Any = None, stream_seconds: float = 15.0) -> None:
        """Mount the jobs dashboard on the hub's FastHTML app (or `app`) at `path`, behind the app's own Beforeware.

        `auth(req)` (sync or async) decides who may use it: truthy lets the request through, a `Response` is sent
        as is (a redirect to a login page), anything else is answered 403. Without `auth` it refuses to mount,
        unless `local_only=True`, for local development: then it answers requests from loopback only. `metrics`
        serves `{path}/metrics` (Prometheus text, same auth). See fh_tasks/ui/dashboard.py."""
        from .ui.dashboard import mount
        mount(self, app if app is not None else self.app, path, auth=auth, local_only=local_only, metrics=metrics,
              stream_seconds=stream_seconds)

    def metrics(self) -> str:
        "The hub's figures in the Prometheus text format (jobs by state, runs, queue depth and age, run times)."
        from .ui.metrics import render
        return render(self)

    # -- binding to an app -----------------------------------------------------------------------
    def init_app(self, app: Any) -> None:
        "Bind to a FastHTML/Starlette app: request-scoped job batches, the hub's routes, workers in the lifespan."
        if self.app is not None: raise RuntimeError("this Tasks hub is already bound to an app")
        web.bind(self, app)
        self.app = app
