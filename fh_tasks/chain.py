"""Ordered jobs: a durable drop-in for Starlette's `BackgroundTasks`."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from starlette.background import BackgroundTasks as _StarletteTasks

from .job import Job
from .task import Task

__all__ = ["BackgroundTasks"]


class BackgroundTasks(_StarletteTasks):
    """Jobs that run one after another, like Starlette's `BackgroundTasks`, but durable.

    Each job starts only after the previous one succeeded (retries included); if one ends failed or
    cancelled, the rest are cancelled. Only registered tasks can be added.
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
