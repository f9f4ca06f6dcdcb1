"""Retries: how many attempts a job gets and how long it waits between them (`RetryPolicy`, pure), and the
hook that applies it to failed attempts (`Retries`)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import Retry
from .hooks import Decision, Hook

if TYPE_CHECKING:
    from .context import JobContext
    from .task import Task

__all__ = ["RetryPolicy", "Retries"]


@dataclass(frozen=True)
class RetryPolicy:
    "Exponential backoff with jitter: attempt n waits `delay * factor**(n-1)`, stretched by up to `jitter`."
    retries: int = 0
    delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.retries < 0: raise ValueError(f"retries must be >= 0, not {self.retries}")
        if not self.delay >= 0: raise ValueError(f"retry_delay must be >= 0, not {self.delay}")
        if self.factor < 1: raise ValueError(f"retry backoff factor must be >= 1, not {self.factor}")
        if not 0 <= self.jitter < 1: raise ValueError(f"jitter must be in [0, 1), not {self.jitter}")

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    def backoff(self, attempt: int, rnd: float | None = None) -> float:
        "Seconds to wait after failed attempt number `attempt` (1-based)."
        try: base = min(self.max_delay, self.delay * self.factor ** max(0, attempt - 1))
        except OverflowError: base = self.max_delay if self.delay else 0.0  # a very late attempt of a long retry run
        r = random.random() if rnd is None else rnd
        return min(self.max_delay, base * (1 + self.jitter * r))


class Retries(Hook):
    """The built-in retry rule, as a hook: a failed attempt runs again while the job has attempts left, after
    the task's backoff or the delay a `Retry(delay=...)` asked for. Add a hook before it to decide otherwise
    (e.g. never retry a `ValueError`). Eager mode and `testing.drain` skip the waits."""

    def on_failure(self, job: JobContext, task: Task[Any, Any], error: BaseException) -> Decision | None:
        if job.attempt >= job.max_attempts: return Decision(retry=False)
        if isinstance(error, Retry) and error.delay is not None: return Decision(retry=True, delay=error.delay)
        return Decision(retry=True, delay=task.policy.backoff(job.attempt))
