"""Workflows: chains that pass each job's result to the next, and groups of jobs that run in parallel with a callback.

    from fh_tasks import chain, group

    flow = chain(fetch.s(url), parse.s(), store.s(user=1)).defer()    # store(parse(fetch(url)), user=1)
    flow = group(resize.s(a), resize.s(b)).then(report.s()).defer()   # report([resize(a), resize(b)])

**What a step gets.** A step after another gets that step's result as its *first positional argument*, before the
arguments given to `.s(...)`; a step after a group gets the list of the group's results, in the order of its members.
A step's own arguments are checked when the workflow is deferred (with a stand-in for the result it will get).

**When a step runs.** A step runs once the step before it succeeded (retries included); a group's callback once every
member succeeded. If a step ends failed or cancelled, every later step is cancelled; if a member of a group does,
the callback and what follows it are cancelled (the other members still run).

**Durability.** Every job of a workflow is stored up front, in one transaction (inside a request: when the response
starts, or not at all if the handler fails), with its link to the step before (`parent`, or the group's callback
`grp`). The next step is released in the transaction that records the success of the one before, and a job reads
the result(s) it takes when a worker claims it: a worker that dies mid-workflow loses nothing.

It needs an engine with capability `workflows` (the SQLite engine). `BackgroundTasks`, here too, is the simplest case:
a chain whose jobs get nothing from each other, a drop-in for Starlette's, on every engine with `chains` (it lives in
this module rather than in one named `chain`, which would shadow `fh_tasks.chain`). See docs/workflows.md.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Union

from starlette.background import BackgroundTask
from starlette.background import BackgroundTasks as _StarletteTasks

from .job import Job
from .records import JobRecord, JobState, NewJob
from .task import Task

if TYPE_CHECKING:
    from .hub import Tasks
    from .task import TaskOptions

__all__ = ["Signature", "Chain", "Group", "Flow", "chain", "group", "BackgroundTasks"]

#: What a chain's step or a group's member can be.
Step = Union["Signature", "Chain", "Group"]


class Signature:
    """One call of a task as a workflow step, made by `task.s(*args, **kwargs)` (options: `task.with_options(...).s()`).

        chain(fetch.s("https://example.com"), parse.s(strict=True))  # parse(<fetch's result>, strict=True)
    """

    __slots__ = ("task", "args", "kwargs", "options")

    def __init__(self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: TaskOptions) -> None:
        self.task, self.args, self.kwargs, self.options = task, tuple(args), dict(kwargs), options

    def __repr__(self) -> str:
        parts = [*map(repr, self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())]
        return f"{self.task.name}.s({', '.join(parts)})"


class Chain:
    """Steps that run one after another, each getting the result of the one before as its first argument:
    `chain(fetch.s(url), parse.s())`. A step may be a `group` (the next step then gets the list of its results)."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps: list[Signature | Group] = []
        for s in steps: self.steps += s.steps if isinstance(s, Chain) else [_step(s, "chain")]
        if not self.steps: raise ValueError("chain() needs at least one step: chain(fetch.s(url), parse.s())")

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.steps))})"

    def then(self, step: Step) -> Chain:
        "This chain followed by `step` (which gets the last step's result)."
        return Chain([*self.steps, step])

    def defer(self) -> Flow:
        """Store every job of the chain, all or none, and return the `Flow` handle. Inside a request they are stored
        when the response starts (none if the handler fails); elsewhere at once, in one transaction. A step's
        arguments that do not fit its task raise `TypeError` here, naming the step, and nothing is stored."""
        return _defer(self.steps)


class Group:
    """Jobs that run in parallel: `group(resize.s(a), resize.s(b))`, or `group(resize.s(p) for p in paths)`.
    `.then(report.s())` adds a callback that runs once every member succeeded, with the list of their results (in
    member order) as its first argument. A member may be a chain: its last job's result is the member's result."""

    def __init__(self, members: Iterable[Signature | Chain]) -> None:
        self.members = [m if isinstance(m, Chain) else _step(m, "group") for m in members]
        if not self.members: raise ValueError("group() needs at least one member: group(resize.s(a), resize.s(b))")
        for i, m in enumerate(self.members):
            if isinstance(m, Group) or (isinstance(m, Chain) and isinstance(m.steps[-1], Group)):
                raise TypeError(f"group member {i} ends with a group: a member's result must be one job's result; end "
                                "it with a step that takes the inner group's results")

    def __repr__(self) -> str:
        return f"group({', '.join(map(repr, self.members))})"

    def then(self, callback: Step) -> Chain:
        "The group followed by `callback`, which gets the list of the members' results (a chord)."
        return Chain([self, callback])

    def defer(self) -> Flow:
        "Store the members (all or none, as `Chain.defer`) and return the `Flow` handle; they run in parallel."
        return _defer([self])


def chain(*steps: Step) -> Chain:
    """Steps that run in order, each getting the previous step's result as its first positional argument:

        flow = chain(fetch.s(url), parse.s(), store.s(user=1)).defer()
        return Titled("Started"), JobStatus(flow.job), flow
    """
    return Chain(steps)


def group(*members: Signature | Chain | Iterable[Signature | Chain]) -> Group:
    """Jobs that run in parallel; `.then(callback.s())` runs `callback` with the list of their results:

        flow = group(resize.s(a), resize.s(b)).then(report.s(title="Sizes")).defer()
        flow = group(resize.s(p) for p in paths).defer()
    """
    if len(members) == 1 and not isinstance(members[0], (Signature, Chain, Group)) and _iterable(members[0]):
        return Group(members[0])  # type: ignore[arg-type]
    return Group(members)  # type: ignore[arg-type]


class Flow(BackgroundTask):
    """The handle `.defer()` returns: the jobs of a workflow, stored together. Return it from a handler as you would a
    `Job` (`return Titled("Started"), flow`): FastHTML runs it as a background task, which only makes sure the jobs
    are stored. `jobs` lists them in the order they were declared; `job` is the last step's job (for `JobStatus`)."""

    def __init__(self, hub: Tasks, jobs: list[Job], tail: list[Job], single: bool) -> None:
        self.hub, self.jobs, self.tail, self._single = hub, jobs, tail, single
        self.func, self.args, self.kwargs = self._ensure_stored, (), {}  # type: ignore[assignment]
        self.is_async = True

    def __repr__(self) -> str:
        return f"Flow({len(self.jobs)} jobs, last={self.tail[-1].id if self._single else [j.id for j in self.tail]})"

    async def _ensure_stored(self) -> None:
        self.hub.store_jobs([j for j in self.jobs if not j.stored and not j.dropped])

    async def __call__(self) -> None:
        await self._ensure_stored()

    @property
    def ids(self) -> list[str]:
        "The ids of the jobs, in the order they were declared."
        return [j.id for j in self.jobs]

    @property
    def job(self) -> Job:
        "The job of the last step: `JobStatus(flow.job)`. A workflow that ends with a group has none (see `tail`)."
        if not self._single:
            raise ValueError(f"this workflow ends with a group of {len(self.tail)} jobs, so it has no last job: use "
                             "flow.tail (or flow.jobs), or end it with .then(callback.s())")
        return self.tail[0]

    @property
    def id(self) -> str:
        "The id of the last step's job."
        return self.job.id

    @property
    def state(self) -> JobState | None:
        "The last step's state (None until stored)."
        return self.job.state

    def get(self) -> JobRecord | None:
        "The last step's record."
        return self.job.get()

    def wait(self, timeout: float | None = 30.0) -> JobRecord:
        "Block until the last step is final (a failed step cancels it, so it never waits for nothing); its record."
        return self.job.wait(timeout)

    def result(self, timeout: float | None = 30.0) -> Any:
        """Wait and return the last step's result (for a workflow ending with a group: the list of its results);
        raises `JobFailed`/`JobCancelled` if it did not succeed."""
        if self._single: return self.job.result(timeout)
        return [j.result(timeout) for j in self.tail]


# -- building the jobs ------------------------------------------------------------------------------------------------
def _step(s: Any, where: str) -> Signature | Group:
    if isinstance(s, (Signature, Group)): return s
    from .task import Deferrer
    if isinstance(s, (Task, Deferrer)):
        name = s.name if isinstance(s, Task) else s.task.name
        raise TypeError(f"{where}() takes task calls, not the task {name} itself: write task.s(...) with its arguments")
    raise TypeError(f"{where}() takes task calls made with task.s(...), not {type(s).__name__} {s!r:.60}")


def _iterable(x: Any) -> bool:
    try: iter(x)
    except TypeError: return False
    return True


#: The end of what is built so far: None (nothing), one job (a step), or the last jobs of a group's members.
_Tail = NewJob | list[NewJob] | None


def _defer(steps: list[Signature | Group]) -> Flow:
    built: list[tuple[NewJob, Task[Any, Any]]] = []
    tail = _chain(steps, None, built, "")
    hubs = {id(t.hub): t.hub for _, t in built}
    if len(hubs) > 1: raise ValueError("the steps of one workflow must be tasks of one Tasks hub")
    hub = built[0][1].hub
    jobs = hub.enqueue_each(built)
    by_id = {j.id: j for j in jobs}
    ends = [tail] if isinstance(tail, NewJob) else tail or []
    return Flow(hub, jobs, [by_id[n.id] for n in ends], isinstance(tail, NewJob))


def _chain(steps: list[Signature | Group], after: _Tail, built: list[tuple[NewJob, Task[Any, Any]]],
           where: str) -> _Tail:
    for i, s in enumerate(steps):
        at = f"{where}step {i + 1}"
        after = _group(s, after, built, at) if isinstance(s, Group) else _call(s, after, built, at)
    return after


def _call(s: Signature, after: _Tail, built: list[tuple[NewJob, Task[Any, Any]]], at: str) -> NewJob:
    "One step's job, linked to what comes before it: a job (it takes that job's result) or a group (the results)."
    takes = None if after is None else "parent" if isinstance(after, NewJob) else "group"
    try: new = s.task.new_job(s.args, s.kwargs, s.options, parent=after.id if isinstance(after, NewJob) else None,
                              takes=takes)
    except (TypeError, ValueError) as e:
        got = {"parent": " (after the result of the step before)", "group": " (after the list of the group's results)"}
        raise type(e)(f"workflow {at}: {e}{got.get(takes or '', '')}") from None
    if new.key is not None:
        # A duplicate would be replaced by the live job holding the key, which the next step is not linked to.
        raise ValueError(f"workflow {at}: a step cannot have a uniqueness key (with_options(key={new.key!r})): a "
                         "duplicate would be replaced by the live job, which the steps after it do not wait for")
    if isinstance(after, list):
        for m in after: m.group = new.id  # the members release (or cancel) their callback
    built.append((new, s.task))
    return new


def _group(g: Group, after: _Tail, built: list[tuple[NewJob, Task[Any, Any]]], at: str) -> list[NewJob]:
    "The members' jobs; each member's first job takes `after`'s result. Returns the members' last jobs."
    if isinstance(after, list):
        raise TypeError(f"workflow {at}: a group cannot follow a group directly; put a step between them that takes "
                        "the first group's results")
    ends: list[NewJob] = []
    for i, m in enumerate(g.members):
        end = _chain(m.steps if isinstance(m, Chain) else [m], after, built, f"{at}, member {i + 1}, ")
        assert isinstance(end, NewJob)  # Group refuses members that end with a group
        ends.append(end)
    # The callback reads its members' results in the order of their ids (the `inputs` query): give the members' last
    # jobs, which nothing refers to yet, the same ids sorted in member order.
    for end, id in zip(ends, sorted(e.id for e in ends), strict=True): end.id = id
    return ends


# -- the simplest chain -----------------------------------------------------------------------------------------------
class BackgroundTasks(_StarletteTasks):
    """Jobs that run one after another, like Starlette's `BackgroundTasks`, but durable.

    Each job starts only after the previous one succeeded (retries included); if one ends failed or
    cancelled, the rest are cancelled. Only registered tasks can be added.

    It is the simplest workflow: a chain whose jobs get nothing from each other, on every engine with capability
    `chains`. When a job needs the result of the one before, use `chain(a.s(...), b.s(...))`; for jobs in parallel
    with a callback, `group(...)` (docs/workflows.md).
    """

    def __init__(self, tasks: Any = None) -> None:
        super().__init__()
        self.jobs: list[Job] = []
        for t in tasks or (): self.add_task(t)

    def add_task(self, func: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        "Queue `func(*args, **kwargs)` to run after the jobs added before it."
        if not isinstance(func, Task):
            name = getattr(func, "__qualname__", repr(func))
            raise TypeError(f"{name} is not a registered task: decorate it with @tasks.task to run it durably")
        prev = self.jobs[-1].id if self.jobs else None
        job = func.hub.enqueue(func.new_job(args, kwargs, replace(func.options), parent=prev), func)
        self.jobs.append(job)
        self.tasks.append(job)

    @property
    def ids(self) -> list[str]:
        "The ids of the jobs, in order."
        return [j.id for j in self.jobs]

    async def __call__(self) -> None:
        for j in self.jobs: await j()
