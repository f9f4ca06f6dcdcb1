"""The worker's upkeep while it runs, each a coroutine on its loop: lease renewal and the sweep of lost jobs, progress
writes, checks for running jobs cancelled from elsewhere, WAL checkpoints. A mixin of `Worker` (`worker/loop.py`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import JobCancelled
from ..progress import FLUSH_EVERY
from ..records import WorkerInfo

if TYPE_CHECKING:
    from ..hooks import Hooks
    from ..store.sqlite import SQLiteStore
    from .runs import _Run

__all__ = ["CANCEL_CHECK_EVERY", "CHECKPOINT_EVERY", "Upkeep"]

#: Seconds between the worker's WAL checkpoints.
CHECKPOINT_EVERY = 0.5
#: Seconds between two checks for running jobs cancelled by `tasks.cancel(id, running=True)` (only while jobs run).
CANCEL_CHECK_EVERY = 0.5


class Upkeep:
    "The worker's periodic duties; mixed into `Worker`."

    if TYPE_CHECKING:  # what the mixin uses of `Worker`
        id: str
        lease: float
        store: SQLiteStore
        hooks: Hooks
        log: logging.Logger
        running: dict[tuple[str, int], _Run]
        info: Callable[[], WorkerInfo]
        def wake(self) -> None: ...

    async def _heartbeats(self) -> None:
        every = max(0.05, self.lease / 3)
        sweep_at = 0.0
        while True:
            await asyncio.sleep(every)
            try:
                self.store.heartbeat(self.id, self.lease, self.info())  # also tells the store this worker is alive
                now = time.monotonic()
                if now >= sweep_at:
                    sweep_at = now + max(1.0, self.lease / 2)
                    if self.store.expire(): self.wake()
                self.hooks.emit("on_tick", self)
            except Exception:
                self.log.exception("lease upkeep failed; will retry")

    async def _progress_flushes(self) -> None:
        "Write the progress tasks recorded (`current_job().progress`) in one transaction per interval, from a thread."
        store, loop = self.store, asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            if not store.progress_pending(): continue
            try: await loop.run_in_executor(None, store.flush_progress)
            except Exception: self.log.warning("could not record progress; will retry", exc_info=True)

    async def _cancel_checks(self) -> None:
        """Cancelling running jobs (`tasks.cancel(id, running=True)`): every `CANCEL_CHECK_EVERY` seconds, from a
        thread, ask the store which running attempts were cancelled; an async or process job is stopped, a sync one
        sees `current_job().cancelled` (and `progress()` raises `JobCancelled`); no outcome is recorded (`_cancelled`).
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CANCEL_CHECK_EVERY)
            if not self.running: continue
            try: found = await loop.run_in_executor(None, self.store.cancelled_among, list(self.running))
            except Exception:
                self.log.warning("could not check for cancelled jobs; will retry", exc_info=True)
                continue
            for key in found:
                if (run := self.running.get(key)) is not None and not run.settled: self._cancelled(run)

    def _cancelled(self, run: _Run) -> None:
        """A running job was found cancelled. The store holds it cancelled already (the rest of its workflow too), so
        no outcome is recorded: an async job is cancelled and a process job's pool child killed (and replaced) now; a
        sync one runs until it sees the flag (`current_job().cancelled`, or `progress()` raises). Its slot frees as it
        ends."""
        run.settled = True
        c = run.claim
        self.log.info("job %s (%s) cancelled while running", c.id, c.task,
                      extra={"action": "cancel", "job_id": c.id, "task": c.task})
        if run.timer: run.timer.cancel()
        if run.future is not None and run.task is not None and (run.task.is_async or run.task.options.process):
            run.future.cancel()
        if run.ctx is not None and run.task is not None:
            self.hooks.emit("after_run", run.ctx, run.task, None, JobCancelled(f"job {c.id} ({c.task}) was cancelled"))

    async def _checkpoints(self) -> None:
        "Checkpoint the WAL from a thread, off the commit path, so it stays small and commits stay cheap."
        checkpoint, loop = self.store.checkpoint, asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            try: await loop.run_in_executor(None, checkpoint)
            except Exception: self.log.warning("WAL checkpoint failed; commits will checkpoint instead", exc_info=True)

