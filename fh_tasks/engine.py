"""The engine boundary: what the `Tasks` hub needs from whatever stores and runs its jobs.

An engine stores the jobs a request deferred (all or none, before the response), reads and manages them,
announces their changes as events and runs their workers. It declares what it can do in `Capabilities`,
typed and explicit: the hub and the UI check a capability and say clearly when it is missing, they never
probe an engine with `hasattr`. The embedded engine is `fh_tasks.engines.sqlite.SQLiteEngine`;
docs/architecture.md maps Celery and Dramatiq onto the same interface.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import Unsupported

if TYPE_CHECKING:
    from .events import EventBus
    from .hub import Tasks
    from .records import JobRecord, NewJob, WorkerInfo

__all__ = ["Capabilities", "Engine", "EngineWorker", "EngineSettings", "DEFAULT_DB", "Overview", "RUN_TIME_BUCKETS"]

#: Default database file of the SQLite engine (and the broker engines' outbox), relative to the working directory.
DEFAULT_DB = "fh_tasks.db"


@dataclass(frozen=True)
class Capabilities:
    "What an engine can do. Each flag is a promise the contract suite (tests/engines) checks."
    listing: bool = False            #: `tasks.jobs()` and `tasks.counts()` list and count every stored job
    progress: bool = False           #: `current_job().progress(...)` is stored and shown
    events: bool = False             #: job events reach subscribers in every process (`tasks.subscribe`)
    cancel_queued: bool = False      #: `tasks.cancel(id)` on a job that has not started
    cancel_running: bool = False     #: `tasks.cancel(id)` on a running job
    retry: bool = False              #: `tasks.retry(id)` runs a failed or cancelled job again
    delay: bool = False              #: `with_options(delay=...)` runs a job later
    chains: bool = False             #: `fh_tasks.BackgroundTasks` runs jobs in order
    priorities: bool = False         #: a job's priority decides which queued job runs first
    cron: bool = False               #: periodic tasks fire once per slot (`@tasks.cron`)
    schedule_at: bool = False        #: `with_options(at=datetime)` runs a job at a given time
    unique: bool = False             #: `with_options(key=...)` returns the live job with that key instead of a second
    limits: bool = False             #: a task's concurrency and rate limits hold across every worker
    queue_order: bool = False        #: workers take their queues in strict order or by weight
    workflows: bool = False          #: chains that pass results, and groups with a callback (`fh_tasks.flow`)
    cancel_process: bool = False     #: cancelling a running process-pool job terminates it
    async_tasks: bool = False        #: `async def` tasks
    process_pool: bool = False       #: `@tasks.task(process=True)`
    in_process_workers: bool = False  #: workers can run inside the web app's process (`Tasks(workers=N)`)
    burst: bool = False              #: a worker can run until nothing is due (`fh_tasks.testing.drain`)
    stats: bool = False              #: `page` (filtered keyset pages), `overview` (figures), `attempts` (history)
    admin: bool = False              #: `delete`, `retry_failed` (every failed job of a task), `pause`/`resume` a queue

    def require(self, name: str, engine: str, doing: str) -> None:
        "Raise `Unsupported` naming the engine and what was asked unless capability `name` is there."
        if name not in {f.name for f in fields(self)}: raise ValueError(f"no engine capability named {name!r}")
        if not getattr(self, name):
            raise Unsupported(f"the {engine} engine cannot {doing} (capability {name!r} is missing)")

    def admit(self, new: NewJob, engine: str) -> None:
        "Raise `Unsupported` when job `new` asks for what the engine cannot do: a delay, a chain, a workflow step."
        if new.run_at > new.created_at: self.require("delay", engine, "delay a job")
        if new.parent is not None: self.require("chains", engine, "chain jobs")
        if new.takes is not None or new.group is not None:
            self.require("workflows", engine, "pass results from job to job (fh_tasks.chain, fh_tasks.group)")


@dataclass
class EngineSettings:
    """The `Tasks(...)` settings an engine is made with (`fh_tasks.engines.make`); each engine uses what applies.
    The hub and its engine share one object (`fh_tasks.testing.eager` switches `eager` on for both)."""
    db: str = DEFAULT_DB                  #: the SQLite file (the store, or a broker engine's outbox)
    broker: str | None = None             #: a broker engine's broker URL (redis://, amqp://)
    status: str | None = None             #: a broker engine's status store URL (Redis)
    durability: Literal["normal", "full"] = "normal"
    workers: int = 1                      #: in-process workers started with the app
    concurrency: int = 8                  #: jobs one worker runs at once
    queues: tuple[str, ...] | None = None  #: queues workers serve (None: every registered task's queue)
    lease: float = 30.0
    poll_interval: float = 0.1
    grace: float = 10.0
    eager: bool = False                   #: run each job inline when it is stored (tests)
    clock: Callable[[], float] = time.time


class EngineWorker(Protocol):
    "A worker an engine starts for `fh-tasks worker`: run until stopped."

    processed: int

    async def run(self) -> None:
        "Serve jobs until `stop()` (or, for a burst worker, until nothing is due)."

    def stop(self, now: bool = False) -> None:
        "Stop claiming; running jobs get the grace period (`now`: give them back at once). Safe from a signal."


class Engine(Protocol):
    """Stores and runs a hub's jobs. Every method may raise `StoreError` subclasses when storage fails.

    Delivery is at-least-once: a job whose worker dies runs again, under the same id.
    """

    #: Short name shown in errors and in the UI ("sqlite", "celery", "dramatiq").
    name: str
    capabilities: Capabilities
    #: The engine's job events; `bus.available` is False when it announces none.
    bus: EventBus

    def bind(self, hub: Tasks) -> None:
        "Called once by the hub that owns this engine: its registry names the tasks workers may run."

    def submit(self, jobs: Sequence[NewJob]) -> None:
        "Store `jobs` in one transaction (all or none): `defer()` outside a request."

    async def submit_request(self, jobs: Sequence[NewJob]) -> None:
        "Store the jobs one request deferred, all or none, before its response starts."

    def get(self, id: str) -> JobRecord | None:
        "The job with this id, or None."

    def summary(self, id: str) -> JobRecord | None:
        "The job without its arguments and result (what a status page shows), or None."

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        "Jobs, newest first, filtered by state and task (capability `listing`)."

    def counts(self) -> dict[str, int]:
        "Number of jobs per state (capability `listing`)."

    def cancel(self, id: str) -> bool:
        "Cancel a job (and the rest of its chain); True when it was cancelled."

    def cancel_running(self, id: str) -> bool:
        """Cancel a running job (and the rest of its chain), capability `cancel_running`; True when it was cancelled.
        Its worker stops the attempt when it next checks, and records no outcome for it."""

    def retry(self, id: str) -> bool:
        """Queue a failed or cancelled job again with a fresh budget of attempts; True when it was requeued. The
        attempt number goes on (it fences late outcomes of earlier runs); those runs are excused."""

    def prune(self, before: float) -> int:
        "Delete finished jobs that finished before `before` (Unix seconds); returns how many."

    async def start(self) -> None:
        "Start the in-process workers on the running loop (the app's lifespan calls this)."

    async def stop(self) -> None:
        "Stop them: running jobs get the grace period, the rest go back to the queue."

    def runs_on_current_loop(self) -> bool:
        "True when one of this process's workers runs on the running event loop (a blocking wait would stall it)."

    def worker(self, **options: Any) -> EngineWorker:
        "A worker for `fh-tasks worker` (or a burst worker with `burst=True`), with the hub's settings by default."

    def close(self) -> None:
        "Release connections and threads."

    # -- the jobs dashboard: capability `stats` ---------------------------------------------------------------------
    def page(self, *, state: str | None = None, task: str | None = None, queue: str | None = None,
             since: float | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[JobRecord], str | None]:
        """One page of jobs, newest first, without arguments or result, filtered by state, task, queue and creation
        time (`since`, Unix seconds), after the key `before`; returns the jobs and the next page's key (None: last)."""

    def overview(self, window: float = 3600.0) -> Overview:
        "The dashboard's figures: counts per task/queue/state, queue depths, runs per minute over `window`, workers."

    def attempts(self, id: str) -> list[dict[str, Any]]:
        "The failed attempts of a job, oldest first (attempt, state, worker, started_at, ended_at, error)."

    # -- capability `admin` -----------------------------------------------------------------------------------------
    def delete(self, id: str) -> bool:
        "Delete a finished job; True when it was deleted."

    def retry_failed(self, task: str) -> int:
        "Queue every failed job of `task` again (as `retry`); returns how many."

    def pause(self, queue: str) -> None:
        "Workers take no job from `queue` until `resume` (jobs can still be deferred to it)."

    def resume(self, queue: str) -> None:
        "Workers take jobs from `queue` again."


#: Upper bounds (seconds) of the run-time histogram of `Overview` and the metrics.
RUN_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class Overview:
    "What the dashboard's overview and the metrics show, read at `at` (Unix seconds)."
    at: float
    window: float                                   #: seconds covered by `succeeded`/`failed`/`run_times`
    counts: list[tuple[str, str, int]]              #: (task, state, jobs)
    queues: list[tuple[str, int, float | None]]     #: (queue, due jobs, since when the oldest has been due)
    paused: frozenset[str]
    succeeded: list[int]                            #: jobs succeeded per minute, oldest minute first
    failed: list[int]                               #: attempts failed per minute
    workers: list[tuple[WorkerInfo, int]]           #: registered workers and the jobs each runs now
    run_times: list[tuple[float, int]] = field(default_factory=list)  #: (bucket bound, runs at most that long)
    run_count: int = 0
    run_sum: float = 0.0
    gone_succeeded: dict[str, int] = field(default_factory=dict)  #: succeeded runs of jobs pruned or deleted, per task
    failed_attempts: dict[str, int] = field(default_factory=dict)  #: failed attempts in all, per task
