"""Periodic tasks: `@tasks.cron(expr, tz=...)` registers a task and fires it once per slot of its schedule.

    @tasks.cron("*/5 * * * *", tz="Europe/Paris", retries=2)
    def refresh_rates():
        slot = cron_slot()          # the slot this run is for: an aware datetime in Europe/Paris
        ...

A slot fires exactly once however many web and worker processes share the store: every process whose workers serve
the task's queue runs a scheduler (`CronScheduler`, a hook started with its workers), and the store decides. The
row of the task in `fh_cron` holds the next slot not handled yet; a scheduler advances it with a compare-and-set, and
the job of the slot is inserted in that same transaction under an id made from (task, slot), so two schedulers can
never both fire a slot. A scheduler sleeps until the next slot of the tasks it serves (waking at least every `NAP`
seconds, without touching the store, so a clock that jumps or an injected clock is followed) and then reads the
store once; it takes the write lock only when the slot is still to be fired.

Expressions are parsed by croniter (`pip install fh-tasks[cron]`): five fields, or six with seconds first
(`"*/10 * * * * *"`: every ten seconds), or `@hourly`, `@daily`... Times are computed in the task's `tz` (a
zoneinfo name; UTC by default) with croniter's DST rules: a time the clocks skip in spring runs once, at the first
time after the gap (a daily `30 2 * * *` runs at 03:00 that day); a time that happens twice in autumn runs twice
(each is its own slot); schedules of every N minutes or seconds follow real time.

Slots missed while no scheduler ran (everything was down, or every worker of the queue) are caught up on the next
start: `missed="run_once"` (the default) fires one job, for the latest missed slot, however many were missed;
`missed="skip"` fires none. A slot is missed once it is more than `GRACE` seconds old when a scheduler sees it.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .context import current_job
from .hooks import Hook
from .task import Task, task_name

if TYPE_CHECKING:
    from .hub import Tasks
    from .records import NewJob

__all__ = ["CronSpec", "CronScheduler", "cron_slot", "slot_of", "slot_job_id", "declare", "schedules", "GRACE", "NAP",
           "MISSED"]

log = logging.getLogger("fh_tasks.cron")

#: Seconds after its time at which a slot no scheduler has fired counts as missed (see `missed=`).
GRACE = 1.0
#: Longest sleep of a scheduler between two looks at the clock (no store access when nothing is due).
NAP = 1.0
#: Seconds a scheduler waits before trying again after the store failed (busy, unavailable).
RETRY = 0.5
#: What to do with slots missed while no scheduler ran: fire one job for the latest of them, or none.
MISSED = ("run_once", "skip")
#: The cron specs declared in this process, by task name (how `cron_slot()` finds a task's time zone).
_specs: dict[str, CronSpec] = {}


def _croniter() -> Any:
    "The croniter class, imported only when periodic tasks are used."
    try:
        from croniter import croniter
    except ImportError:
        raise ImportError("@tasks.cron needs the croniter package: pip install 'fh-tasks[cron]'") from None
    return croniter


@dataclass(frozen=True)
class CronSpec:
    "A periodic task's schedule: its expression, time zone, queue and what to do with missed slots."
    task: str
    expr: str
    tz: str = "UTC"
    queue: str = "default"
    missed: str = "run_once"
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"@tasks.cron for task {self.task!r}"
        if not isinstance(self.expr, str) or not self.expr.strip():
            raise ValueError(f"{where}: the schedule must be a cron expression like '*/5 * * * *', not {self.expr!r}")
        if self.missed not in MISSED:
            raise ValueError(f"{where}: missed must be 'run_once' or 'skip', not {self.missed!r}")
        try: zone = ZoneInfo(self.tz) if isinstance(self.tz, str) and self.tz else None
        except (ZoneInfoNotFoundError, ValueError): zone = None
        if zone is None:
            raise ValueError(f"{where}: unknown time zone {self.tz!r} (give a zoneinfo name like 'Europe/Paris' "
                             "or 'UTC')")
        object.__setattr__(self, "zone", zone)
        fields_ = self.expr.split()
        if not fields_[0].startswith("@") and len(fields_) not in (5, 6):
            raise ValueError(f"{where}: bad cron expression {self.expr!r}: it has {len(fields_)} fields; give 5 "
                             "(minute hour day month weekday) or 6 (seconds first)")
        try: self.next_after(0.0)
        except ImportError: raise
        except Exception as e:
            raise ValueError(f"{where}: bad cron expression {self.expr!r}: {e}") from None

    @property
    def seconds(self) -> bool:
        "True for a six-field expression: its first field is the second."
        return len(self.expr.split()) == 6

    def _iter(self, start: float) -> Any:
        return _croniter()(self.expr, datetime.fromtimestamp(start, self.zone), second_at_beginning=self.seconds)

    def next_after(self, t: float) -> float:
        "The first slot strictly after `t` (Unix seconds)."
        return float(self._iter(t).get_next(float))

    def upcoming(self, t: float, n: int) -> list[float]:
        "The next `n` slots after `t`."
        it = self._iter(t)
        return [float(it.get_next(float)) for _ in range(n)]

    def latest_at(self, t: float) -> float:
        "The latest slot at or before `t` (slots are whole seconds)."
        return float(self._iter(math.floor(t) + 1.0).get_prev(float))

    def local(self, t: float) -> datetime:
        "`t` as an aware datetime in the task's time zone."
        return datetime.fromtimestamp(t, self.zone)


def _tag(task: str) -> str:
    "The last 20 hex digits of the job ids of `task`'s slots: 80 bits of a hash of its name."
    return hashlib.sha256(task.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def slot_job_id(task: str, slot: float) -> str:
    """The id of the job of `task` fired for `slot`: the slot in milliseconds, then a hash of the task's name (as
    `new_id()`, time first). Deterministic, so a slot's job can be stored once only."""
    return f"{round(slot * 1000):012x}{_tag(task)}"


def slot_of(id: str, task: str) -> datetime | None:
    "The slot a job id was made for by the scheduler (see `slot_job_id`), in the task's time zone; else None."
    if not isinstance(id, str) or len(id) != 32 or id[12:] != _tag(task): return None
    spec = _specs.get(task)
    return datetime.fromtimestamp(int(id[:12], 16) / 1000, spec.zone if spec else timezone.utc)


def cron_slot() -> datetime | None:
    """The slot the running job was fired for, as an aware datetime in its task's time zone: the time it was due,
    whenever it runs (late, or retried). None for a job of the task that was deferred by hand. Use it to make a
    periodic job idempotent, or to know which period it covers:

        @tasks.cron("0 * * * *", tz="Europe/Paris")
        def hourly_report():
            hour = cron_slot()                   # e.g. 2025-03-30 04:00:00+02:00
            build_report(since=hour - timedelta(hours=1), until=hour)

    Raises RuntimeError outside a task run by a worker (as `current_job()`)."""
    job = current_job()
    return slot_of(job.id, job.task)


def schedules(hub: Tasks) -> list[CronSpec]:
    "The periodic tasks declared on `hub`, by name."
    s = next((h for h in hub.hooks if isinstance(h, CronScheduler)), None)
    return [] if s is None else [s.specs[k] for k in sorted(s.specs)]


def declare(hub: Tasks, expr: str, *, tz: str = "UTC", missed: str = "run_once",
            options: dict[str, Any]) -> Callable[[Callable[..., Any]], Task[Any, Any]]:
    """What `Tasks.cron` returns: a decorator that checks the schedule (naming the task), registers the function as
    a task with `options` (those of `Tasks.task`) and hands its schedule to the hub's scheduler hook."""
    def register(fn: Callable[..., Any]) -> Task[Any, Any]:
        if isinstance(fn, Task): raise TypeError(f"{fn.name} is already a registered task; put @tasks.cron on the "
                                                 "function instead of @tasks.task")
        if not callable(fn): raise TypeError(f"@tasks.cron needs a function, not {type(fn).__name__}")
        name = options.get("name") or task_name(fn)
        hub.engine.capabilities.require(
            "cron", hub.engine.name, f"run the periodic task {name} (@tasks.cron); declare it with @tasks.task and "
            "have one scheduler call its .defer() on schedule instead (a system cron job, or APScheduler in one "
            "process)")
        spec = CronSpec(name, expr, tz, options.get("queue", "default"), missed)
        try: inspect.signature(fn).bind()
        except TypeError as e:
            raise TypeError(f"@tasks.cron for task {name!r}: the scheduler calls it without arguments, so every "
                            f"parameter needs a default ({e})") from None
        except ValueError: pass  # no signature to check (a builtin)
        task = hub.task(**options)(fn)
        scheduler = next((h for h in hub.hooks if isinstance(h, CronScheduler)), None)
        if scheduler is None: hub.hooks.add(scheduler := CronScheduler(hub))
        scheduler.add(spec)
        return task
    return register


@dataclass(eq=False)
class _Timer:
    "The scheduler of one event loop: the workers running on it and the asyncio task that fires their slots."
    workers: list[Any] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class CronScheduler(Hook):
    """Fires the periodic tasks of a hub (added by the first `@tasks.cron`). It runs on the event loop of the workers
    it is started with, one timer per loop whatever the number of workers on it, and fires only the tasks of the
    queues those workers serve. Burst and eager workers start none. See the module docstring."""

    def __init__(self, hub: Tasks) -> None:
        self.hub = hub
        self.specs: dict[str, CronSpec] = {}
        self._timers: dict[asyncio.AbstractEventLoop, _Timer] = {}
        self._lock = threading.Lock()

    def add(self, spec: CronSpec) -> None:
        "Schedule `spec` (a running timer picks it up within `NAP` seconds)."
        self.specs[spec.task] = spec
        _specs[spec.task] = spec

    # -- the hook: a timer per event loop, while workers run on it ---------------------------------
    def on_worker_start(self, worker: Any) -> None:
        if getattr(worker, "burst", False) or getattr(worker, "eager", False) or not self.specs: return
        try: loop = asyncio.get_running_loop()
        except RuntimeError: return
        with self._lock:
            timer = self._timers.setdefault(loop, _Timer())
            timer.workers.append(worker)
            if timer.task is None: timer.task = loop.create_task(self._serve(timer), name="fh-tasks-cron")

    def on_worker_stop(self, worker: Any) -> None:
        with self._lock:
            for loop, timer in list(self._timers.items()):
                if worker not in timer.workers: continue
                timer.workers.remove(worker)
                if not timer.workers:
                    if timer.task is not None: timer.task.cancel()
                    del self._timers[loop]

    def served(self, workers: Sequence[Any]) -> list[CronSpec]:
        "The specs whose queue one of `workers` serves."
        queues = {q for w in workers for q in getattr(w, "queues", ())}
        return [s for s in list(self.specs.values()) if s.queue in queues]

    async def _serve(self, timer: _Timer) -> None:
        "Sleep until the next slot of the served tasks, fire what is due, and so on (the first round catches up)."
        upcoming: dict[str, float] = {}  # task -> its next slot, as computed here (no store read needed for it)
        while timer.workers:
            store = timer.workers[0].store
            specs, now = self.served(timer.workers), store.clock()
            due = [s for s in specs if upcoming.get(s.task, -math.inf) <= now]
            if due:
                try: self.fire_due(store, due, now)
                except Exception:
                    log.exception("could not fire periodic tasks %s; trying again", ", ".join(s.task for s in due))
                    await asyncio.sleep(RETRY)
                    continue
                for s in due: upcoming[s.task] = s.next_after(now)
            wake = min((upcoming[s.task] for s in specs if s.task in upcoming), default=math.inf)
            await asyncio.sleep(max(0.0, min(wake - store.clock(), NAP)) + 0.001)

    # -- firing: one read, then one transaction if a slot is still to be fired ----------------------------------
    def fire_due(self, store: Any, specs: Sequence[CronSpec], now: float | None = None) -> list[NewJob]:
        """Fire the slots of `specs` due at `now` (default: the store's clock) that no scheduler fired yet, and
        record the next slots; returns the jobs this call stored. Safe to run in any number of processes at once."""
        now = store.clock() if now is None else now
        rows = {r["name"]: r for r in store.cron_rows([s.task for s in specs])}
        plans = [p for s in specs if (p := self.plan(s, rows.get(s.task), now)) is not None]
        if not plans: return []
        jobs = store.cron_advance(plans, lambda name, slot: self._job(name, slot, now))
        if jobs: self.hub.hooks.emit("after_enqueue", jobs)
        return list(jobs)

    @staticmethod
    def plan(spec: CronSpec, row: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
        """What to write for `spec` given its stored `row` (None: none yet) at `now`: None when nothing is due, else
        the compare-and-set the store runs (`seen`: the row as read; `next`: the new next slot; `slot`: the slot to
        fire, or None). A new or changed schedule starts at its next slot: nothing is caught up for it."""
        base = {"name": spec.task, "expr": spec.expr, "tz": spec.tz}
        if row is None: return {**base, "seen": None, "next": spec.next_after(now), "slot": None}
        seen = {"expr": row["expr"], "tz": row["tz"], "next": row["next_slot"]}
        if (row["expr"], row["tz"]) != (spec.expr, spec.tz):
            return {**base, "seen": seen, "next": spec.next_after(now), "slot": None}
        nxt = row["next_slot"]
        if isinstance(nxt, (int, float)) and nxt > now: return None
        due = spec.latest_at(now)
        if isinstance(nxt, (int, float)) and due < nxt: return None  # a clock behind the one that wrote the row
        fire = spec.missed == "run_once" or now - due <= GRACE
        if fire and now - due > GRACE:
            log.info("periodic task %s: slot %s was missed; running it once now", spec.task, spec.local(due))
        elif not fire:
            log.info("periodic task %s: skipping missed slot(s) up to %s", spec.task, spec.local(due))
        return {**base, "seen": seen, "next": spec.next_after(max(now, due)), "slot": due if fire else None}

    def _job(self, name: str, slot: float, now: float) -> NewJob | None:
        """The job of `name` for `slot`, built like `defer()` builds one (hooks' `before_enqueue` may refuse it: the
        slot then passes unfired). Called by the store inside the transaction that won the slot."""
        task = self.hub.registry.get(name)
        if task is None: return None
        try:
            new = task.new_job((), {}, task.options)
            new.id, new.run_at, new.created_at = slot_job_id(name, slot), now, now
            self.hub.hooks.before_enqueue(new, task)
        except Exception as e:
            log.warning("periodic task %s: the job of slot %s was not stored: %s: %s", name,
                        _specs[name].local(slot) if name in _specs else slot, type(e).__name__, e)
            return None
        return new
