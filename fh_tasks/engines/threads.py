"""The threads a broker engine runs in a worker process beside the broker library's own: the `Pump` publishes what
the status store says is due, the `Heartbeat` keeps the worker on the dashboard's list, and the `Keeper` writes
progress and held-back successes, renews leases and stops attempts cancelled while they run.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import QueueUnavailable
from ..pid import pid
from ..progress import FLUSH_EVERY
from ..records import WorkerInfo
from .status import HEARTBEAT_EVERY, worker_name

if TYPE_CHECKING:
    from .broker import BrokerEngine

__all__ = ["Pump", "Heartbeat", "Keeper", "HOLD_AT_MOST"]

log = logging.getLogger("fh_tasks.engines")

#: Seconds between two `on_tick` hook calls (retention) of a pump.
TICK_EVERY = 5.0
#: Seconds between two checks, in a worker process running jobs, for jobs cancelled while they run.
CANCEL_CHECK_EVERY = 0.5
#: While a worker process runs jobs, a success held back for its thread's next `start` is written within this long.
HOLD_AT_MOST = 0.02


class Pump:
    """Publishes what the status store says is due (delays, retries, jobs of dead workers, lost messages) and calls
    the hooks' `on_tick` (retention), from a thread of a worker process. Several pumps share the work safely: each
    job is taken by one (`take_due` is atomic)."""

    def __init__(self, engine: BrokerEngine, poll_interval: float = 0.1) -> None:
        self.engine, self.poll_interval = engine, max(0.001, poll_interval)
        self.id = f"pump-{worker_name()}"  # what hooks' on_worker_start/on_tick see of the worker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_at = 0.0
        self.backoff = 0.0

    def run_once(self) -> int:
        "Publish the jobs due now; returns how many were sent."
        e = self.engine
        due = e.status.take_due()
        n, error = e.publish(due) if due else (0, None)
        if error is not None:
            self.backoff = min(5.0, max(0.1, self.backoff * 2))
            log.warning("could not publish %d due job(s) (%s); trying again in %.1fs", len(due) - n, error,
                        self.backoff)
            e.status.due_at([d.id for d in due[n:]], e.clock() + self.backoff)
        else: self.backoff = 0.0
        if time.monotonic() >= self._tick_at:
            self._tick_at = time.monotonic() + TICK_EVERY
            e.hooks.emit("on_tick", self)
        return n

    def start(self) -> None:
        if self._thread is not None: return
        self._stop.clear()
        self.engine.hooks.emit("on_worker_start", self)
        self._thread = threading.Thread(target=self._run, name="fh-tasks-pump", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try: sent = self.run_once()
            except QueueUnavailable as e:
                self.backoff = min(5.0, max(0.1, self.backoff * 2))
                log.warning("the pump cannot reach the status store (%s); trying again in %.1fs", e, self.backoff)
                sent = 0
            except Exception:
                log.exception("the pump failed; trying again")
                sent, self.backoff = 0, 1.0
            if not sent or self.backoff: self._stop.wait(self.backoff or self.poll_interval)

    def stop(self) -> None:
        th, self._thread = self._thread, None
        if th is None: return
        self._stop.set()
        if th is not threading.current_thread(): th.join(5)
        self.engine.hooks.emit("on_worker_stop", self)


class Heartbeat:
    """A thread of a worker process: every `HEARTBEAT_EVERY` seconds it writes what `describe()` returns (the worker,
    and the processes that run its jobs) to the status store, where the dashboard lists workers; every minute it trims
    the dashboard's figures. `stop()` takes the worker off the list at once."""

    TRIM_EVERY = 60.0

    def __init__(self, engine: BrokerEngine, describe: Callable[[], tuple[WorkerInfo, Sequence[int]]]) -> None:
        self.engine, self.describe = engine, describe
        self.id = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None: return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fh-tasks-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        trim_at = 0.0
        while True:
            try:
                info, pids = self.describe()
                self.id = info.id
                self.engine.status.heartbeat(info, pids)
                if time.monotonic() >= trim_at:
                    trim_at = time.monotonic() + self.TRIM_EVERY
                    self.engine.status.trim_stats()
            except Exception as e:
                log.debug("heartbeat failed (%s); trying again", e)
            if self._stop.wait(HEARTBEAT_EVERY): return

    def stop(self) -> None:
        th, self._thread = self._thread, None
        if th is None: return
        self._stop.set()
        if th is not threading.current_thread(): th.join(5)
        if self.id:
            try: self.engine.status.forget_worker(self.id)
            except Exception: pass


class Keeper:
    """A thread per process: writes buffered progress every `FLUSH_EVERY` seconds and renews the leases of the
    attempts running in the process every third of a lease. While jobs run, it writes the successes held back for
    their thread's next `start` within `HOLD_AT_MOST` seconds (within `FLUSH_EVERY` after a second of no job)."""

    def __init__(self, engine: BrokerEngine) -> None:
        self.engine = engine
        self._running: dict[tuple[str, int], None] = {}
        self._lock = threading.Lock()
        self._pid = 0
        self._stop = threading.Event()
        self._busy_until = 0.0

    def add(self, id: str, attempt: int) -> None:
        with self._lock:
            self._running[(id, attempt)] = None
            if self._pid != pid():  # first job of this process (a forked pool child starts its own thread)
                self._pid = pid()
                self._stop = threading.Event()
                threading.Thread(target=self._run, args=(self._stop,), name="fh-tasks-keeper", daemon=True).start()

    @property
    def here(self) -> bool:
        "True when this process's keeper thread runs (it did since this process's first job): it flushes held writes."
        return self._pid == pid()

    def remove(self, id: str, attempt: int) -> None:
        with self._lock: self._running.pop((id, attempt), None)
        self._busy_until = time.monotonic() + 1.0

    def _run(self, stop: threading.Event) -> None:
        status, renew_at, check_at, tick_at = self.engine.status, 0.0, 0.0, 0.0
        while not stop.wait(HOLD_AT_MOST if time.monotonic() < self._busy_until else FLUSH_EVERY):
            try:
                status.flush_held()
                if time.monotonic() < tick_at: continue
                tick_at = time.monotonic() + FLUSH_EVERY - HOLD_AT_MOST
                self.engine.settle()
                if status.progress_pending(): status.flush_progress()
                if self._running and time.monotonic() >= check_at:  # jobs cancelled while they run
                    check_at = time.monotonic() + CANCEL_CHECK_EVERY
                    with self._lock: running = list(self._running)
                    for id, attempt in status.cancelled_among(running): self.engine.stop_attempt(id, attempt)
                if time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + self.engine.lease / 3
                    with self._lock: running = list(self._running)
                    for id, attempt in status.renew(running, self.engine.lease):
                        log.warning("job %s: attempt %d no longer holds the job (its lease ran out and it was taken "
                                    "back); its outcome will be refused", id, attempt)
            except Exception as e:
                log.warning("could not write progress or renew leases (%s); trying again", e)

    def stop(self) -> None:
        self._stop.set()
