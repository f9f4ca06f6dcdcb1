"""SQLiteEngine: the embedded engine. One SQLite file holds the jobs; workers run inside the web app's process
(started by its lifespan) and in `fh-tasks worker` processes, all sharing the file.

What makes it fast lives here and in the store, behind the engine interface: a request's jobs are committed in
one transaction together with the outcomes the in-process worker gathered, and handed to that worker as already
claimed (no claim round trip); other processes' workers are woken by the store's doorbell; `durability="full"`
commits off the event loop with group commit.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..context import _current
from ..engine import RUN_TIME_BUCKETS, Capabilities, EngineSettings, Overview
from ..errors import QueueBusy, QueueUnavailable
from ..events import EventBus
from ..records import JobRecord, NewJob
from ..store.sqlite import SQLiteStore
from ..worker import Worker

if TYPE_CHECKING:
    from ..hooks import Hooks
    from ..hub import Tasks
    from ..task import Task

__all__ = ["SQLiteEngine"]

log = logging.getLogger("fh_tasks.engines.sqlite")


class SQLiteEngine:
    "The embedded engine: a `SQLiteStore` and the built-in `Worker` (see the module docstring)."

    name = "sqlite"
    capabilities = Capabilities(listing=True, progress=True, events=True, cancel_queued=True, cancel_running=True,
                                retry=True, delay=True, chains=True, async_tasks=True, process_pool=True,
                                in_process_workers=True, burst=True, stats=True, admin=True, cron=True,
                                priorities=True, schedule_at=True, unique=True, queue_order=True,
                                workflows=True, cancel_process=True, limits=True)

    def __init__(self, settings: EngineSettings | None = None, *, store: SQLiteStore | None = None) -> None:
        s = self.settings = settings or EngineSettings()
        if s.workers < 0: raise ValueError(f"workers must be >= 0, not {s.workers}")
        self.store = store if store is not None else SQLiteStore(s.db, durability=s.durability, clock=s.clock)
        self.bus = EventBus(self.store.feed())
        self.clock = s.clock
        self._hub: Tasks | None = None
        self._attached: list[Worker] = []
        self._attached_lock = threading.Lock()
        # The workers started with the app run on its loop: a worker thread would contend for the GIL
        # with the loop and slow every request down (measured: p50 +40 % under load).
        self._own: list[tuple[Worker, asyncio.Future[None]]] = []
        self._eager_lock = threading.Lock()
        self.store.on_commit.append(self.wake)

    # -- the hub ---------------------------------------------------------------------------------
    def bind(self, hub: Tasks) -> None:
        if self._hub is not None and self._hub is not hub: raise RuntimeError("this engine belongs to another hub")
        self._hub = hub

    @property
    def hub(self) -> Tasks:
        if self._hub is None: raise RuntimeError("this engine is not bound to a Tasks hub yet")
        return self._hub

    @property
    def registry(self) -> dict[str, Task[Any, Any]]:
        "The tasks workers may run: the hub's registry."
        return self.hub.registry

    @property
    def hooks(self) -> Hooks:
        return self.hub.hooks

    @property
    def max_result(self) -> int:
        return self.hub.max_result

    def use_store(self, store: SQLiteStore) -> None:
        "Serve another store file (the CLI's `--db`); only before workers start."
        if self._own or self._attached: raise RuntimeError("cannot change the store while workers run")
        self.bus.close()
        self.store = store
        self.bus = EventBus(store.feed())
        store.on_commit.append(self.wake)

    # -- storing jobs ----------------------------------------------------------------------------
    def submit(self, jobs: Sequence[NewJob]) -> None:
        "Store `jobs` in one transaction; new due jobs go straight to a free in-process worker on this loop."
        if not jobs: return
        w = self._local_worker()
        if w is None: self.store.enqueue(jobs)
        else: self._store_handing_off(w, list(jobs))
        if self.settings.eager and _current.get() is None: self._run_eager()  # a task deferring is drained already

    async def submit_request(self, jobs: Sequence[NewJob]) -> None:
        if self.store.durability == "full" and not self.settings.eager:
            # An fsync must not stall the event loop; concurrent requests share one commit.
            await asyncio.get_running_loop().run_in_executor(None, self.submit, jobs)
        else:
            self.submit(jobs)

    def _local_worker(self) -> Worker | None:
        "An in-process worker on the current loop with free slots (new jobs can skip the claim round trip)."
        if self.settings.eager or not self._own: return None
        for w, _ in self._own:
            if w.handoff_slots(): return w
        return None

    def _store_handing_off(self, w: Worker, rows: list[NewJob]) -> None:
        now, paused = self.clock(), self.store.paused_queues()  # a paused queue's jobs are not handed off
        due = [r for r in rows if r.parent is None and r.takes is None and r.run_at <= now and r.queue in w.queues
               and r.queue not in paused and r.task in self.registry
               and r.limit_key is None]  # a limited job waits for the claim, which counts it
        # In due order (priority first); the store hands off only those no stored due job would be claimed before.
        due = sorted(due, key=lambda r: r.rank)[:w.handoff_slots()]
        order: dict[str, Any] = dict(queues=w.queues, tasks=w.task_names(), ordered=w.queue_order.mode != "merged")
        taken = {r.id for r in due}
        rest = [r for r in rows if r.id not in taken]
        outcomes = w.take_outcomes()
        try:
            accepted, claims = self.store.enqueue_claimed(due + rest, len(due), w.id, w.lease, [o for _, o in outcomes],
                                                          **order)
        except BaseException as e:
            w.restore_outcomes(outcomes)
            # The worker's outcomes ride along to save it a commit: they must never fail the request. Unless the store
            # is busy or unavailable (the jobs could not be stored either), store the jobs without them.
            if not outcomes or not isinstance(e, Exception) or isinstance(e, (QueueBusy, QueueUnavailable)): raise
            log.warning("could not store jobs with %d outcome(s) of worker %s (%s: %s); storing them alone",
                        len(outcomes), w.id, type(e).__name__, e)
            accepted, claims = self.store.enqueue_claimed(due + rest, len(due), w.id, w.lease, [], **order)
            outcomes = []
        w.recorded(outcomes, accepted)
        w.handoff(claims)

    def _run_eager(self) -> None:
        "Eager mode: drain due jobs now, in a helper thread with its own loop, and wait for it."
        with self._eager_lock:
            w = self.worker(concurrency=1, queues=self.hub.all_queues(), burst=True, eager=True, poll_interval=0.001)
            th = threading.Thread(target=asyncio.run, args=(w.run(),), name="fh-tasks-eager")
            th.start()
            th.join()

    # -- reading and managing jobs ---------------------------------------------------------------
    def get(self, id: str) -> JobRecord | None:
        return self.store.get(id)

    def summary(self, id: str) -> JobRecord | None:
        return self.store.summary(id)

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        return self.store.jobs(state=state, task=task, limit=limit, offset=offset)

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def cancel(self, id: str) -> bool:
        return self.store.cancel(id)

    def live_job(self, key: str) -> str | None:
        "The id of the live job holding uniqueness key `key` (capability `unique`), or None."
        return self.store.live_job(key)

    def cancel_running(self, id: str) -> bool:
        "Cancel a running job: its worker stops an async or process attempt; a sync one sees the flag."
        return self.store.cancel_running(id)

    def retry(self, id: str) -> bool:
        return self.store.requeue(id)

    def prune(self, before: float) -> int:
        total = 0
        while (n := self.store.prune(before)): total += n
        return total

    def prune_events(self) -> int:
        "Forget old job events and listeners that died (the `Retention` hook calls this)."
        return self.store.prune_events()

    # -- workers ---------------------------------------------------------------------------------
    def worker(self, **options: Any) -> Worker:
        "A worker with the hub's settings unless overridden (`burst=True`: until nothing is due)."
        s = self.settings
        opts: dict[str, Any] = dict(concurrency=s.concurrency, queues=self.hub.queue_order, lease=s.lease,
                                    poll_interval=s.poll_interval, grace=s.grace)
        return Worker(self, **{**opts, **options})

    async def start(self) -> None:
        if self.settings.eager or self._own: return
        self.store.expire()  # opens the store: a missing directory or read-only file fails startup, not a request
        for _ in range(self.settings.workers):
            w = self.worker()
            self._own.append((w, asyncio.ensure_future(w.run())))
        await asyncio.sleep(0)

    async def stop(self) -> None:
        for w, _ in self._own: w.stop()
        if self._own: await asyncio.gather(*(t for _, t in self._own), return_exceptions=True)
        self._own = []

    def attach(self, w: Worker) -> None:
        "A worker of this engine started: `wake` reaches it when this process stores jobs."
        with self._attached_lock: self._attached.append(w)

    def detach(self, w: Worker) -> None:
        with self._attached_lock:
            if w in self._attached: self._attached.remove(w)

    def wake(self) -> None:
        "New jobs may be due: wake this process's workers (the store's doorbell wakes the other processes')."
        for w in list(self._attached): w.wake()

    def runs_on_current_loop(self) -> bool:
        "True when one of this process's workers runs on the running event loop (blocking it would stall them)."
        try: loop = asyncio.get_running_loop()
        except RuntimeError: return False
        return any(w.loop is loop for w in self._attached)

    def close(self) -> None:
        self.bus.close()
        self.store.close()

    # -- the jobs dashboard (capabilities `stats` and `admin`) ----------------------------------------------------
    def page(self, *, state: str | None = None, task: str | None = None, queue: str | None = None,
             since: float | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[JobRecord], str | None]:
        key = int(before) if before and before.isdigit() else None
        rows = self.store.page(state=state, task=task, queue=queue, since=since, before=key, limit=limit + 1)
        more = len(rows) > limit
        return rows[:limit], str(rows[limit - 1].raw["seq"]) if more else None

    def overview(self, window: float = 3600.0) -> Overview:
        s, now = self.store, self.clock()
        since = now - window
        ok, bad = s.per_minute(since)
        minutes = int(window // 60)
        running = s.running_by_worker()
        workers = [(w, running.get(w.id, 0)) for w in s.workers()]
        le, n, total = s.run_times(since, RUN_TIME_BUCKETS)
        gone, failed = s.run_totals()
        return Overview(at=now, window=window, counts=s.counts_by(), queues=s.queue_depths(),
                        paused=s.paused_queues(fresh=True), succeeded=[ok.get(m, 0) for m in range(minutes)],
                        failed=[bad.get(m, 0) for m in range(minutes)], workers=workers,
                        run_times=list(zip(RUN_TIME_BUCKETS, le, strict=True)), run_count=n, run_sum=total,
                        gone_succeeded=gone, failed_attempts=failed)

    def attempts(self, id: str) -> list[dict[str, Any]]:
        return self.store.attempts(id)

    def delete(self, id: str) -> bool:
        return self.store.delete(id)

    def retry_failed(self, task: str) -> int:
        return self.store.requeue_failed(task)

    def pause(self, queue: str) -> None:
        self.store.pause(queue)

    def resume(self, queue: str) -> None:
        self.store.resume(queue)


if TYPE_CHECKING:
    from ..engine import Engine

    def _is_an_engine(e: SQLiteEngine) -> Engine: return e  # mypy checks the class against the protocol
