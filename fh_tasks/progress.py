"""Coalesced progress: `current_job().progress()` keeps the latest value per attempt in memory; a flusher writes them.

A task may report progress in a tight loop: each call only checks the value and replaces the attempt's pending
value (latest wins). The worker writes every pending value in one transaction every `FLUSH_EVERY` seconds, from a
thread (never on the event loop), and a job's outcome is committed together with its last pending value, so the
final progress of a finished job is always stored. A pool process flushes from a thread of its own, and before it
hands the job's outcome back. A write is fenced like an outcome (job id, attempt, state running): once one finds
that the attempt no longer holds the job, the attempt is remembered as stale and its later values are refused.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ProgressBuffer", "FLUSH_EVERY", "start_flusher"]

#: Seconds between two writes of the pending progress values.
FLUSH_EVERY = 0.2
#: Stale attempts remembered (so that `progress()` answers False for them without a write).
STALE_KEPT = 4096

Key = tuple[str, int]


class ProgressBuffer:
    "The latest unwritten progress (JSON text) of each (job id, attempt); thread-safe."

    def __init__(self, stale_kept: int = STALE_KEPT) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Key, str] = {}
        self._stale: OrderedDict[Key, None] = OrderedDict()
        self._kept = stale_kept

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, key: Key, text: str) -> bool:
        "Keep `text` as the attempt's latest value; False (and nothing kept) when the attempt is known stale."
        with self._lock:
            if key in self._stale: return False
            self._pending[key] = text
            return True

    def take(self) -> dict[Key, str]:
        "Every pending value, removed from the buffer (give them back with `restore` if writing fails)."
        with self._lock:
            out, self._pending = self._pending, {}
        return out

    def peek(self, keys: Iterable[Key]) -> dict[Key, str]:
        "The pending values of these attempts, left in the buffer."
        with self._lock:
            return {k: v for k in keys if (v := self._pending.get(k)) is not None}

    def drop(self, key: Key) -> None:
        with self._lock: self._pending.pop(key, None)

    def restore(self, items: dict[Key, str]) -> None:
        "Give back values a failed write took; a newer value recorded meanwhile wins."
        with self._lock:
            for k, v in items.items():
                if k not in self._stale: self._pending.setdefault(k, v)

    def stale(self, keys: Iterable[Key]) -> None:
        "These attempts no longer hold their jobs: forget their values and refuse later ones."
        with self._lock:
            for k in keys:
                self._pending.pop(k, None)
                self._stale[k] = None
                self._stale.move_to_end(k)
            while len(self._stale) > self._kept: self._stale.popitem(last=False)


def start_flusher(pending: Callable[[], Any], flush: Callable[[], Any], every: float = FLUSH_EVERY) -> threading.Thread:
    "A daemon thread calling `flush()` every `every` seconds while `pending()` is truthy (for pool processes)."
    def loop() -> None:
        while True:
            time.sleep(every)
            if pending():
                try: flush()
                except Exception: pass  # the store is busy or gone: the values stay pending, tried again next time

    t = threading.Thread(target=loop, name="fh-tasks-progress", daemon=True)
    t.start()
    return t
