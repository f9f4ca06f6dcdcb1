"""Task: a registered function with its options; `defer()` turns a call into a durable `Job`."""
from __future__ import annotations

import inspect
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from .encoding import encode_args
from .job import Job
from .limits import check_limit_key
from .records import NewJob
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .flow import Signature
    from .hub import Tasks

__all__ = ["Task", "TaskOptions", "Call", "registered", "task_name", "new_id"]

P = ParamSpec("P")
R = TypeVar("R")

#: How many call shapes a task remembers as binding (see `Task.new_job`).
MAX_SHAPES = 64
# Every task registered in this process, by name: how a process-pool child finds the function.
_registry: dict[str, Task[Any, Any]] = {}


def new_id() -> str:
    """A job id: 32 hex digits, a millisecond timestamp then 80 random bits (like UUIDv7).

    Time-ordered ids keep inserts at the end of the id index, however many finished jobs it holds; the random
    part keeps ids unguessable, so a status URL holding one is a capability.
    """
    return ((time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")).to_bytes(16, "big").hex()


def registered(name: str) -> Task[Any, Any] | None:
    "The task registered under `name` in this process, if any."
    return _registry.get(name)


def task_name(fn: Callable[..., Any]) -> str:
    "The default name: `module:qualname`, with a script's module named after its file."
    mod = fn.__module__
    if mod in ("__main__", "__mp_main__"):
        main = sys.modules.get(mod)
        mod = os.path.splitext(os.path.basename(getattr(main, "__file__", "") or "main"))[0]
    return f"{mod}:{fn.__qualname__}"


@dataclass(frozen=True)
class TaskOptions:
    "Per-task options; a call can override them with `task.with_options(...)`."
    queue: str = "default"
    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    delay: float = 0.0
    process: bool = False
    #: higher runs first within its queue, from -100 to 100 (docs/flow.md: a job ages by a minute per point)
    priority: int = 0
    #: one call only: run at this time (a timezone-aware datetime), instead of after `delay`
    at: datetime | None = None
    #: one call only: uniqueness key; while a job with this key is live, `defer()` returns that job
    key: str | None = None
    #: one call only: the key the task's concurrency and rate limits count against (default: `limit_by`'s, or the
    #: task's name; see fh_tasks/limits.py)
    limit_key: str | None = None
    #: options declared by the hub's hooks (`Hook.options`), already converted
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not self.queue:
            raise ValueError(f"queue must be a non-empty string, not {self.queue!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {self.retries!r}")
        if self.timeout is not None and not (_number(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be > 0 seconds, not {self.timeout!r}")
        if not (_number(self.delay) and self.delay >= 0):
            raise ValueError(f"delay must be >= 0 seconds, not {self.delay!r}")
        if not (_number(self.retry_delay) and self.retry_delay >= 0):
            raise ValueError(f"retry_delay must be >= 0 seconds, not {self.retry_delay!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not -100 <= self.priority <= 100:
            raise ValueError(f"priority must be an int from -100 to 100, not {self.priority!r}")
        if self.at is not None:
            if not isinstance(self.at, datetime):
                raise ValueError(f"at must be a timezone-aware datetime, not {self.at!r}")
            if self.at.tzinfo is None or self.at.utcoffset() is None:
                raise ValueError(f"at must be a timezone-aware datetime, not the naive {self.at.isoformat()} (give "
                                 "its zone: datetime(..., tzinfo=ZoneInfo('Europe/Paris')), or datetime.now(UTC) + …)")
            if self.delay: raise ValueError("give at= or delay=, not both")
        if self.key is not None and (not isinstance(self.key, str) or not 1 <= len(self.key) <= 200):
            raise ValueError(f"key must be a non-empty string of at most 200 characters, not {self.key!r:.60}")


class Call:
    """One call of a task with both positional and keyword arguments, for `defer_many`: `Call(1, 2, cc=True)`."""

    __slots__ = ("args", "kwargs")

    def __init__(self, /, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __repr__(self) -> str:
        return f"Call(*{self.args!r}, **{self.kwargs!r})"


#: An item of `defer_many`: a tuple of positional arguments, a dict of keyword arguments, or a `Call` (both).
CallItem = tuple[Any, ...] | dict[str, Any] | Call


def _defer_many(task: Task[Any, Any], calls: Iterable[CallItem], opts: TaskOptions) -> list[Job]:
    "Validate every call (an error names the item's index, and nothing is stored), then store them in one batch."
    news = []
    for i, c in enumerate(calls):
        if isinstance(c, Call): args, kwargs = c.args, c.kwargs
        elif isinstance(c, tuple): args, kwargs = c, {}
        elif isinstance(c, dict) and all(isinstance(k, str) for k in c): args, kwargs = (), c
        else:
            what = "a dict whose keys are not all strings" if isinstance(c, dict) else f"a {type(c).__name__}"
            raise TypeError(f"{task.name}.defer_many: item {i} is {what}; give a tuple of positional arguments, a dict "
                            "of keyword arguments, or fh_tasks.Call(*args, **kwargs)")
        try: news.append(task.new_job(args, kwargs, opts))
        except (TypeError, ValueError) as e:
            try: err = type(e)(f"{task.name}.defer_many: item {i}: {e}")
            except Exception: raise e from None
            raise err from None
    return task.hub.enqueue_many(news, task)


def _number(x: Any) -> bool:
    "A real number (bools are ints to Python, but `timeout=True` is a mistake)."
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Task(Generic[P, R]):
    """A function registered with a `Tasks` hub. Calling it runs it inline; `defer()` queues it."""

    def __init__(self, hub: Tasks, fn: Callable[P, R], name: str, options: TaskOptions) -> None:
        self.hub, self.fn, self.name, self.options = hub, fn, name, options
        self.is_async = inspect.iscoroutinefunction(fn)
        if options.process and self.is_async:
            raise ValueError(f"task {name}: process=True needs a plain (sync) function")
        self.policy = RetryPolicy(options.retries, options.retry_delay)
        self.signature = inspect.signature(fn)
        self._names = [p.name for p in self.signature.parameters.values()
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # Call shapes (how many positional arguments, which keywords) known to bind: whether a call binds depends
        # on its shape alone, so `defer()` checks each shape once (`signature.bind` costs more than the rest).
        self._shapes: set[tuple[int, tuple[str, ...]]] = set()
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        self.__module__, self.__wrapped__ = fn.__module__, fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        "Run the function now, in the caller (no job, no retries)."
        return self.fn(*args, **kwargs)

    def defer(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Queue a call and return its `Job`.

        Inside a request the job is stored when the response starts (not at all if the handler raises);
        elsewhere it is stored at once. Raises `ArgumentError` (a TypeError) naming a non-JSON argument.
        """
        return self.hub.enqueue(self.new_job(args, kwargs, self.options), self)

    def defer_many(self, calls: Iterable[CallItem]) -> list[Job]:
        """Queue many calls at once and return their `Job`s, in order: stored in one transaction.

        Each item is a tuple of positional arguments (`("a.png",)`), a dict of keyword arguments (`{"path": "a.png"}`)
        or a `Call` for both (`Call("a.png", size=2)`). Every call is checked first: a wrong item raises a `TypeError`
        (or `ValueError`) naming its index, and then no job is stored. Inside a request the jobs join the request's
        batch (stored when the response starts, as `defer()`); elsewhere they are stored at once.
        """
        return _defer_many(self, calls, self.options)

    def option(self, name: str, default: Any = None) -> Any:
        "The value of a task option declared by a hook (`@tasks.task(name=value)`), or `default`."
        return self.options.extra.get(name, default)

    def with_options(self, **options: Any) -> Deferrer[P]:
        """Options for one call: `task.with_options(delay=60, retries=5).defer(...)`.

        Besides the task's options: `at=` a timezone-aware datetime to run at (not with `delay`), `priority=` from
        -100 to 100 (higher first), `key=` a uniqueness key (while a job with that key is live, `defer()` returns it):

            send_digest.with_options(at=datetime(2030, 1, 1, 8, tzinfo=ZoneInfo("Europe/Paris"))).defer(user.id)
            rebuild_index.with_options(key=f"index:{site.id}", priority=10).defer(site.id)

        `limit_key=` is the key a task with limits counts this call against (`sync.with_options(limit_key="c:42")`).
        A wrong value raises a `ValueError` naming the task and the option; an option the engine cannot honour
        raises `Unsupported` (`at`: capability `schedule_at`, `priority`: `priorities`, `key`: `unique`)."""
        allowed = {f.name for f in fields(TaskOptions)} - {"extra", "process"}
        if (bad := sorted(set(options) - allowed)):
            raise TypeError(f"{self.name}: unknown option(s) {', '.join(bad)} for one call; "
                            f"with_options takes {', '.join(sorted(allowed))}")
        if "at" in options and options["at"] is not None and options.get("delay"):
            raise ValueError(f"give at= or delay=, not both (task {self.name}, with_options)")
        if options.get("at") is not None: options.setdefault("delay", 0.0)
        try: opts = replace(self.options, **options)
        except ValueError as e: raise ValueError(f"{e} (task {self.name}, with_options)") from None
        caps, engine = self.hub.engine.capabilities, self.hub.engine.name
        if opts.at is not None: caps.require("schedule_at", engine, f"run {self.name} at a given time (at=)")
        if opts.priority: caps.require("priorities", engine, f"give {self.name} a priority")
        if opts.key is not None: caps.require("unique", engine, f"keep {self.name}'s jobs unique by key (key=)")
        if opts.limit_key is not None: check_limit_key(self, opts.limit_key)
        return Deferrer(self, opts)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A call of this task to run as a step of a workflow (`fh_tasks.chain`, `fh_tasks.group`): `fetch.s(url)`.
        A step after another gets that step's result (a group's: the list of results) as its first argument."""
        from .flow import Signature
        return Signature(self, args, kwargs, self.options)

    def new_job(self, args: tuple[Any, ...], kwargs: dict[str, Any], opts: TaskOptions,
                parent: str | None = None, takes: str | None = None) -> NewJob:
        """Validate a call and build the row to store. `takes` ("parent", "group"): the job gets a result first, at
        run time, so the call is checked with a stand-in for it."""
        first = (None,) if takes else ()
        shape = (len(first) + len(args), tuple(kwargs))
        if shape not in self._shapes:
            try: self.signature.bind(*first, *args, **kwargs)
            except TypeError as e: raise TypeError(f"{self.name}: {e}") from None
            if len(self._shapes) < MAX_SHAPES: self._shapes.add(shape)
        text = encode_args(self.name, args, kwargs, self.hub.max_payload, self._names[len(first):])
        now = self.hub.clock()
        return NewJob(id=new_id(), task=self.name, args=text, queue=opts.queue,
                      max_attempts=opts.retries + 1, timeout=opts.timeout,
                      run_at=now + opts.delay if opts.at is None else opts.at.timestamp(),
                      created_at=now, parent=parent, takes=takes, priority=opts.priority, key=opts.key,
                      limit_key=opts.limit_key)


class Deferrer(Generic[P]):
    "A task bound to per-call options."

    def __init__(self, task: Task[P, Any], options: TaskOptions) -> None:
        self.task, self.options = task, options

    def defer(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        "Queue a call with these options; see `Task.defer`."
        return self.task.hub.enqueue(self.task.new_job(args, kwargs, self.options), self.task)

    def defer_many(self, calls: Iterable[CallItem]) -> list[Job]:
        "Queue many calls with these options, in one transaction; see `Task.defer_many`."
        return _defer_many(self.task, calls, self.options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        "A workflow step with these options; see `Task.s`."
        from .flow import Signature
        return Signature(self.task, args, kwargs, self.options)
