"""Retention, as a hook: finished jobs are deleted `after` seconds after they finished, and job events are
kept only for a while, by the workers' periodic upkeep (`Tasks(retention=...)`; None keeps jobs forever)."""
from __future__ import annotations

import logging
import time
from typing import Any

from .hooks import Hook

__all__ = ["Retention", "DEFAULT_RETENTION"]

log = logging.getLogger("fh_tasks.retention")

#: Finished jobs are deleted this many seconds after they finish (None keeps them).
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: Seconds between two prunes, whatever the number of workers ticking in this process.
EVERY = 60.0


class Retention(Hook):
    "Prunes finished jobs older than `after` seconds (and old job events) at most once a minute per process."

    def __init__(self, after: float | None = DEFAULT_RETENTION, every: float = EVERY) -> None:
        if after is not None and not after >= 0: raise ValueError(f"retention must be >= 0 seconds, not {after!r}")
        self.after, self.every = after, every
        self._next = 0.0

    def on_tick(self, worker: Any) -> None:
        now = time.monotonic()
        if now < self._next: return
        self._next = now + self.every
        engine = worker.engine
        if self.after is not None:
            n = engine.prune(engine.clock() - self.after)
            if n: log.info("deleted %d finished job(s) older than %ss", n, self.after)
        engine.prune_events()
