"""Concurrency and rate limits of a task, held across every worker process of a store.

    @tasks.task(concurrency=2)                 # at most 2 jobs of the task run at once, in all workers
    def render(doc_id): ...

    @tasks.task(rate="10/s")                   # at most 10 starts per second ("/m", "/h", or (n, seconds))
    def call_api(url): ...

    @tasks.task(concurrency=1, limit_by=lambda customer_id, **_: f"customer:{customer_id}")
    def sync(customer_id, full=False): ...     # one running job per customer; customers run side by side

    sync.with_options(limit_key="customer:42").defer(42)   # the key for one call

The options are declared by the built-in `Limits` hook; `before_enqueue` stores the key a job counts against in its
`limit_key` column (the task's name when the task has limits but no key). The SQLite store enforces them inside
its claim transaction: it counts the running jobs of each key, and keeps, per rate-limited key, the earliest time
the next job may start (GCRA without burst: starts of one key are at least `period / n` apart, so no window of
`period` seconds ever holds more than `n` starts). Limits live in code: every process that serves the store must
declare the same ones (a worker applies its own declaration to the jobs it claims).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .encoding import decode_args
from .hooks import Hook

if TYPE_CHECKING:
    from .records import NewJob
    from .task import Task

__all__ = ["Limits", "TaskLimits", "parse_rate", "task_limits", "check_limit_key", "worker_spec", "MAX_KEY"]

#: Longest limit key, in characters.
MAX_KEY = 500
_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0,
          "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([a-z]+)\s*")


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_rate(value: Any) -> tuple[int, float]:
    """A rate as (starts, seconds): `"10/s"`, `"30/m"`, `"100/h"`, `"5/d"`, `"3/10s"` (3 per 10 seconds), or a tuple
    `(n, seconds)`. Raises ValueError naming what is wrong.

        >>> parse_rate("10/m")
        (10, 60.0)
    """
    if isinstance(value, str):
        m = _RATE.fullmatch(value.lower())
        if m is None or m.group(3) not in _UNITS or m.group(2) in (".",):
            raise ValueError(f"rate must look like '10/s', '30/m', '100/h' or '3/10s' (or a tuple (n, seconds)), "
                             f"not {value!r}")
        n, per = int(m.group(1)), (float(m.group(2)) if m.group(2) else 1.0) * _UNITS[m.group(3)]
    elif isinstance(value, tuple) and len(value) == 2:
        n, per = value
        if not _whole(n) or isinstance(per, bool) or not isinstance(per, (int, float)):
            raise ValueError(f"rate as a tuple is (starts: int, seconds: number), not {value!r}")
        per = float(per)
    else:
        raise ValueError(f"rate must be a string like '10/s' or a tuple (n, seconds), not {value!r}")
    if n < 1 or not (0 < per < float("inf")):
        raise ValueError(f"rate needs at least 1 start per a positive number of seconds, not {value!r}")
    return n, per


def _concurrency(value: Any) -> int:
    if not _whole(value) or value < 1:
        raise ValueError(f"concurrency must be a whole number >= 1 (running jobs at once, across all workers), "
                         f"not {value!r}")
    return int(value)


def _limit_by(value: Any) -> Callable[..., Any]:
    if not callable(value):
        raise ValueError(f"limit_by must be a function of the call's arguments returning the key (a str), "
                         f"not {value!r}")
    return value


@dataclass(frozen=True)
class TaskLimits:
    "A task's declared limits: `concurrency` running jobs per key, `rate` = (n, seconds) starts per key."
    concurrency: int | None = None
    rate: tuple[int, float] | None = None
    limit_by: Callable[..., Any] | None = None

    @property
    def interval(self) -> float | None:
        "Least seconds between two starts of one key (None: no rate limit)."
        return None if self.rate is None else self.rate[1] / self.rate[0]

    def spec(self) -> tuple[int | None, float | None]:
        "What a worker hands to the store's claim: (concurrency, interval)."
        return self.concurrency, self.interval


def task_limits(task: Task[Any, Any]) -> TaskLimits | None:
    """The limits `task` declares (None: none). Raises ValueError naming the task when they do not make sense
    together (`limit_by` without a concurrency or rate to count)."""
    extra = task.options.extra
    conc, rate, by = extra.get("concurrency"), extra.get("rate"), extra.get("limit_by")
    if conc is None and rate is None:
        if by is not None:
            raise ValueError(f"task {task.name}: limit_by needs concurrency= or rate= (it names what they count "
                             "against)")
        return None
    return TaskLimits(conc, rate, by)


def check_limit_key(task: Task[Any, Any], key: Any) -> None:
    "A per-call `limit_key` (`with_options(limit_key=...)`): a non-empty str, for a task that declares limits."
    if key is None: return
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise ValueError(f"{task.name}: limit_key must be a non-empty str of at most {MAX_KEY} characters, "
                         f"not {key!r}")
    if task_limits(task) is None:
        raise ValueError(f"{task.name}: limit_key={key!r} given, but the task declares no limit to count against it; "
                         "declare @tasks.task(concurrency=...) or rate=...")


def _key_of(task: Task[Any, Any], limits: TaskLimits, job: NewJob) -> str:
    "The key `limit_by` gives for this call: it receives the call's arguments by name (defaults applied)."
    assert limits.limit_by is not None
    args, kwargs = decode_args(job.args)
    if job.takes: args = [None, *args]  # the result it gets at run time, unknown yet
    bound = task.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = task.signature.parameters[name].kind
        if kind is kind.VAR_KEYWORD: named.update(value)
        else: named[name] = value
    try: key = limits.limit_by(**named)
    except Exception as e:
        raise ValueError(f"{task.name}: limit_by failed on this call ({type(e).__name__}: {e}); it receives the "
                         f"call's arguments by name: {', '.join(named) or 'none'}") from e
    if isinstance(key, (int, float)) and not isinstance(key, bool): key = str(key)
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise ValueError(f"{task.name}: limit_by must return a non-empty str of at most {MAX_KEY} characters, "
                         f"not {key!r}")
    return key


class Limits(Hook):
    """The built-in hook that declares the limit options (`concurrency`, `rate`, `limit_by`) and gives every job of a
    limited task its `limit_key`; the store's claim enforces them (see the module docstring)."""

    options: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "concurrency": _concurrency, "rate": parse_rate, "limit_by": _limit_by}

    def before_enqueue(self, job: NewJob, task: Task[Any, Any]) -> None:
        limits = task_limits(task)
        if limits is None:
            if job.limit_key is not None: check_limit_key(task, job.limit_key)  # raises: nothing to count against
            return
        if job.limit_key is None:
            job.limit_key = _key_of(task, limits, job) if limits.limit_by is not None else task.name


def worker_spec(registry: Mapping[str, Task[Any, Any]]) -> dict[str, tuple[int | None, float | None]]:
    "The limits of the tasks in `registry` that declare some: {task name: (concurrency, interval)}, for the claim."
    out = {}
    for name, t in registry.items():
        try: lim = task_limits(t)
        except ValueError: continue  # refused at declaration already
        if lim is not None: out[name] = lim.spec()
    return out
