"""Tasks: the hub users create. It holds the registry and the store, binds to a FastHTML app and runs workers."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextvars import ContextVar
from typing import Any, Literal, ParamSpec, TypeVar, overload

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .context import _current
from .encoding import MAX_PAYLOAD, MAX_RESULT
from .errors import QueueBusy, QueueUnavailable
from .events import EventBus, JobEvent
from .job import Job, JobRecord, JobState
from .store import NewJob, Store
from .store.sqlite import SQLiteStore
from .task import Task, TaskOptions, _registry, task_name
from .ui.status import PREFIX, mount_routes
from .worker import Worker

__all__ = ["Tasks"]

log = logging.getLogger("fh_tasks")
P = ParamSpec("P")
R = TypeVar("R")

#: Default database file, relative to the working directory.
DEFAULT_DB = "fh_tasks.db"
#: Finished jobs are deleted this many seconds after they finish (None keeps them).
DEFAULT_RETENTION = 7 * 24 * 3600.0


class _Batch:
    "The jobs deferred during one request, stored together when the response starts."
    __slots__ = ("jobs", "open")

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.open = True


_batch: ContextVar[_Batch | None] = ContextVar("fh_tasks_batch", default=None)


class Tasks:
    """Durable background tasks for a FastHTML (or Starlette) app.

    Args:
        app: the app to bind to (or call `init_app` later). Workers start and stop with its lifespan.
        db: SQLite file of the embedded store (ignored when `store` is given).
        store: any `fh_tasks.store.Store`.
        workers: in-process workers started with the app (0: none; run `fh-tasks worker` beside it).
        concurrency: jobs one worker runs at once.
        queues: queues the workers serve (default: `default` and every registered task's queue).
        eager: run each job inline when it is stored (for tests).
        durability: "normal" (survives process crashes) or "full" (fsync every commit, group commit).
        lease: seconds a claimed job stays leased without a heartbeat before another worker may take it.
        retention: seconds finished jobs are kept (None: forever).
        max_payload: limit on a job's encoded arguments, in bytes (`defer()` raises `PayloadTooLarge` above it).
        max_result: limit on a job's encoded result, in bytes (a larger result fails the job with `ResultError`).
        prefix: where the app serves the hub's routes (`{prefix}/jobs/{id}/status`); None adds no routes.
    """

    def __init__(self, app: Any = None, *, db: str = DEFAULT_DB, store: Store | None = None, workers: int = 1,
                 concurrency: int = 8, queues: Sequence[str] | None = None, eager: bool = False,
                 durability: Literal["normal", "full"] = "normal", lease: float = 30.0, poll_interval: float = 0.1,
                 grace: float = 10.0, retention: float | None = DEFAULT_RETENTION, max_payload: int = MAX_PAYLOAD,
                 max_result: int = MAX_RESULT, clock: Callable[[], float] = time.time,
                 prefix: str | None = PREFIX) -> None:
        if workers < 0: raise ValueError(f"workers must be >= 0, not {workers}")
        if isinstance(max_result, bool) or not isinstance(max_result, int) or max_result < 1:
            raise ValueError(f"max_result must be a whole number of bytes >= 1, not {max_result!r}")
        self.store: Any = store if store is not None else SQLiteStore(db, durability=durability, clock=clock)
        self.clock = clock
        self.registry: dict[str, Task[Any, Any]] = {}
        self.workers, self.concurrency = workers, concurrency
        self._queues = tuple(queues) if queues else None
        self.eager, self.lease, self.poll_interval, self.grace = eager, lease, poll_interval, grace
        self.retention, self.max_payload, self.max_result = retention, max_payload, max_result
        self._attached: list[Worker] = []
        self._attached_lock = threading.Lock()
        # The workers started with the app run on its loop: a worker thread would contend for the GIL
        # with the loop and slow every request down (measured: p50 +40 % under load).
        self._own: list[tuple[Worker, asyncio.Future[None]]] = []
        self._prune_at = 0.0
        self._eager_lock = threading.Lock()
        self.bus = EventBus(self.store.feed() if isinstance(self.store, SQLiteStore) else None)
        if hasattr(self.store, "on_commit"): self.store.on_commit.append(self._wake)
        if prefix is not None and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(f"prefix must start with '/' and not end with one, not {prefix!r}")
        self.prefix = prefix
        self.app = None
        if app is not None: self.init_app(app)

    # -- registry --------------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: None = None, /, *, name: str | None = None, queue: str = "default", retries: int = 0,
             retry_delay: float = 1.0, timeout: float | None = None,
             process: bool = False) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn: Callable[P, R] | None = None, /, *, name: str | None = None, queue: str = "default",
             retries: int = 0, retry_delay: float = 1.0, timeout: float | None = None,
             process: bool = False) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a task: `@tasks.task` or `@tasks.task(retries=3, timeout=30)`.

        Args:
            name: stored name (default `module:qualname`); keep it stable while jobs are queued.
            queue: queue its jobs go to.
            retries: further attempts after a failure, with exponential backoff from `retry_delay` seconds.
            timeout: seconds an attempt may run before it counts as failed.
            process: run in a process pool (CPU-bound sync functions).
        """
        opts = TaskOptions(queue=queue, retries=retries, retry_delay=retry_delay, timeout=timeout, process=process)

        def register(f: Callable[P, R]) -> Task[P, R]:
            if isinstance(f, Task): raise TypeError(f"{f.name} is already a registered task")
            if not callable(f): raise TypeError(f"@tasks.task needs a function, not {type(f).__name__}")
            t: Task[P, R] = Task(self, f, name or task_name(f), opts)
            old = self.registry.get(t.name)
            same = old is None or old.fn is f or getattr(old.fn, "__code__", None) is getattr(f, "__code__", 0)
            if not same:
                raise ValueError(f"two different functions are registered as task {t.name!r}; pass name=")
            self.registry[t.name] = t
            _registry[t.name] = t
            return t

        return register(fn) if fn is not None else register

    @property
    def queues(self) -> tuple[str, ...]:
        "The queues workers serve: the ones given to `Tasks(queues=...)`, else `default` and every task's queue."
        if self._queues: return self._queues
        return tuple(sorted({"default"} | {t.options.queue for t in self.registry.values()}))

    def _every_queue(self) -> tuple[str, ...]:
        "The served queues and every registered task's queue (eager mode and `testing.drain` run them all)."
        return tuple(sorted({t.options.queue for t in self.registry.values()} | set(self.queues)))

    # -- deferring -------------------------------------------------------------------------------
    def _defer(self, new: NewJob) -> Job:
        job = Job(self, new)
        batch = _batch.get()
        if batch is not None and batch.open: batch.jobs.append(job)
        else: self._store_now([job])
        return job

    def _is_pending(self, job: Job) -> bool:
        "True while `job` waits in the current request's batch for the response to start."
        batch = _batch.get()
        return batch is not None and batch.open and any(j is job for j in batch.jobs)

    def _store_now(self, jobs: Sequence[Job]) -> None:
        rows = [j.new for j in jobs if not j.stored]
        if not rows: return
        w = self._local_worker()
        if w is None: self.store.enqueue(rows)
        else: self._store_handing_off(w, rows)
        for j in jobs: j.stored = True
        if self.eager and _current.get() is None: self._run_eager()  # a task deferring runs in the drain already

    def _local_worker(self) -> Worker | None:
        "An in-process worker on the current loop with free slots (new jobs can skip the claim round trip)."
        if self.eager or not self._own or not hasattr(self.store, "enqueue_claimed"): return None
        for w, _ in self._own:
            if w.handoff_slots(): return w
        return None

    def _store_handing_off(self, w: Worker, rows: list[NewJob]) -> None:
        now = self.clock()
        due = [r for r in rows if r.parent is None and r.run_at <= now and r.queue in w.queues][:w.handoff_slots()]
        taken = {r.id for r in due}
        rest = [r for r in rows if r.id not in taken]
        outcomes = w.take_outcomes()
        try:
            accepted, claims = self.store.enqueue_claimed(due + rest, len(due), w.id, w.lease, [o for _, o in outcomes])
        except BaseException as e:
            w.restore_outcomes(outcomes)
            # The worker's outcomes ride along to save it a commit: they must never fail the request. Unless the store
            # is busy or unavailable (the jobs could not be stored either), store the jobs without them.
            if not outcomes or not isinstance(e, Exception) or isinstance(e, (QueueBusy, QueueUnavailable)): raise
            log.warning("could not store jobs with %d outcome(s) of worker %s (%s: %s); storing them alone",
                        len(outcomes), w.id, type(e).__name__, e)
            accepted, claims = self.store.enqueue_claimed(due + rest, len(due), w.id, w.lease, [])
            outcomes = []
        w.recorded(outcomes, accepted)
        w.handoff(claims)

    async def _store_request(self, jobs: Sequence[Job]) -> None:
        if getattr(self.store, "durability", "normal") == "full" and not self.eager:
            # An fsync must not stall the event loop; concurrent requests share one commit.
            await asyncio.get_running_loop().run_in_executor(None, self._store_now, jobs)
        else:
            self._store_now(jobs)

    def _run_eager(self) -> None:
        "Eager mode: drain due jobs now, in a helper thread with its own loop, and wait for it."
        with self._eager_lock:
            queues = self._every_queue()
            w = Worker(self, concurrency=1, queues=queues,
                       lease=self.lease, burst=True, eager=True, poll_interval=0.001)
            th = threading.Thread(target=asyncio.run, args=(w.run(),), name="fh-tasks-eager")
            th.start()
            th.join()

    # -- reading and managing jobs ---------------------------------------------------------------
    def get(self, id: str) -> JobRecord | None:
        "The stored job with this id, or None."
        return self.store.get(id)

    def jobs(self, state: str | JobState | None = None, task: str | Task[Any, Any] | None = None,
             limit: int = 100, offset: int = 0) -> list[JobRecord]:
        "Stored jobs, newest first, optionally of one state and one task."
        if isinstance(task, Task): task = task.name
        if state is not None: state = JobState(state).value
        return self.store.jobs(state=state, task=task, limit=limit, offset=offset)

    def counts(self) -> dict[str, int]:
        "Number of jobs in each state."
        return self.store.counts()

    def cancel(self, id: str) -> bool:
        "Cancel a job that has not started (and the rest of its chain); True when it was cancelled."
        return self.store.cancel(id)

    def retry(self, id: str) -> bool:
        "Queue a failed or cancelled job again, with fresh attempts; True when it was requeued."
        return self.store.requeue(id)

    def prune(self, older_than: float) -> int:
        "Delete finished jobs that finished more than `older_than` seconds ago; returns how many."
        total, before = 0, self.clock() - older_than
        while (n := self.store.prune(before)): total += n
        return total

    def _maybe_prune(self) -> None:
        if self.retention is None: return
        now = time.monotonic()
        if now < self._prune_at: return
        self._prune_at = now + 60
        self.prune(self.retention)

    # -- job events ------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[JobEvent], Any], *,
                  jobs: Collection[str] | None = None) -> Callable[[], None]:
        """Call `callback(event)` for every job change from now on, made by any process on this store (of `jobs`
        only, if given). Returns a function that unsubscribes. Callbacks run in the event thread: keep them short."""
        return self.bus.subscribe(callback, jobs=jobs)

    async def events(self, jobs: Collection[str] | None = None, *,
                     until_final: bool = False) -> AsyncIterator[JobEvent]:
        """Stream job events as they happen: `async for ev in tasks.events([job.id], until_final=True)`.

        With `until_final` the stream ends once every job in `jobs` is final, including jobs that already were."""
        def final_now(ids: Collection[str]) -> set[str]:
            return {i for i in ids if (r := self.get(i)) is not None and r.done}

        async for ev in self.bus.stream(jobs, until_final=until_final, final_now=final_now): yield ev

    # -- workers ---------------------------------------------------------------------------------
    def worker(self, **kw: Any) -> Worker:
        "A worker for this hub, with the hub's settings unless overridden."
        opts = dict(concurrency=self.concurrency, queues=self.queues, lease=self.lease,
                    poll_interval=self.poll_interval, grace=self.grace)
        return Worker(self, **{**opts, **kw})

    async def start(self) -> None:
        "Start the in-process workers on the running loop (done by the app's lifespan)."
        if self.eager or self._own: return
        self.store.expire()  # opens the store: a missing directory or read-only file fails startup, not a request
        for _ in range(self.workers):
            w = self.worker()
            self._own.append((w, asyncio.ensure_future(w.run())))
        await asyncio.sleep(0)

    async def stop(self) -> None:
        "Stop the in-process workers: running jobs get the grace period, the rest go back to the queue."
        for w, _ in self._own: w.stop()
        if self._own: await asyncio.gather(*(t for _, t in self._own), return_exceptions=True)
        self._own = []

    def _attach(self, w: Worker) -> None:
        with self._attached_lock: self._attached.append(w)

    def _detach(self, w: Worker) -> None:
        with self._attached_lock:
            if w in self._attached: self._attached.remove(w)

    def _wake(self) -> None:
        for w in list(self._attached): w.wake()

    def _worker_loop_is_current(self) -> bool:
        try: loop = asyncio.get_running_loop()
        except RuntimeError: return False
        return any(w._loop is loop for w in self._attached)

    # -- binding to an app -----------------------------------------------------------------------
    def init_app(self, app: Any) -> None:
        "Bind to a FastHTML/Starlette app: request-scoped job batches, and workers in the lifespan."
        if self.app is not None: raise RuntimeError("this Tasks hub is already bound to an app")
        # Through the app's own routing: on a FastHTML app its Beforeware (auth) runs before the hub's routes.
        # First, so that a clash with another hub's routes leaves the app as it was.
        if self.prefix is not None: mount_routes(self, app, self.prefix)
        self.app = app
        state = app.state
        if not getattr(state, "fh_tasks_middleware", False):
            app.add_middleware(JobsMiddleware)
            state.fh_tasks_middleware = True
        ls = getattr(app, "lifespan", None)
        if ls is not None and hasattr(ls, "startup") and hasattr(ls, "shutdown"):
            ls.startup.append(self.start)
            ls.shutdown.append(self.stop)
        else:
            _wrap_lifespan(app, self)


class JobsMiddleware:
    """Stores the jobs deferred while handling a request in one transaction, just before the response starts.

    A failed request stores none of them: a handler that raised (its 500 is sent past this middleware) or a
    response with an error status (4xx/5xx, e.g. from `HTTPException`). Later `defer()` calls store at once.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http": return await self.app(scope, receive, send)
        batch = _Batch()
        token = _batch.set(batch)

        async def send_jobs_first(message: Message) -> None:
            if message["type"] == "http.response.start" and batch.open:
                batch.open = False
                if batch.jobs and message["status"] < 400:
                    by_hub: dict[int, list[Job]] = {}
                    for j in batch.jobs: by_hub.setdefault(id(j.hub), []).append(j)
                    for jobs in by_hub.values(): await jobs[0].hub._store_request(jobs)
            await send(message)

        try:
            await self.app(scope, receive, send_jobs_first)
        finally:
            batch.open = False
            _batch.reset(token)


def _wrap_lifespan(app: Any, hub: Tasks) -> None:
    from contextlib import asynccontextmanager
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> Any:
        await hub.start()
        try:
            async with inner(a) as state: yield state
        finally:
            await hub.stop()

    app.router.lifespan_context = lifespan
