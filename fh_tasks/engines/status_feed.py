"""RedisFeed: the `EventFeed` of the broker engines, job events from the status store's stream (`{ns}:events`).

One thread per process reads the stream with XREAD BLOCK from the last entry it saw; an entry's id (Redis' clock in
ms, then a counter) is the event's order and time.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..events import JobEvent, ThreadFeed
from .status_scripts import _safe, connect

if TYPE_CHECKING:
    from .status import StatusStore

__all__ = ["RedisFeed"]

log = logging.getLogger("fh_tasks.status")


class RedisFeed(ThreadFeed):
    """The `EventFeed` of a status store: a thread reads the events stream with XREAD BLOCK from the last entry it
    saw, so a connection that drops and comes back misses nothing (within the stream's cap)."""

    BLOCK_MS = 500

    def __init__(self, store: StatusStore) -> None:
        super().__init__()
        self.store = store

    def _prepare(self, publish: Callable[[list[JobEvent]], None]) -> Callable[[], None]:
        "The thread reads the events after the stream's last entry (now)."
        key = self.store.key("events")
        try: last = next(iter(self.store.redis.xrevrange(key, count=1)), (f"{int(time.time() * 1000)}-0",))[0]
        except Exception: last = f"{int(time.time() * 1000)}-0"  # Redis down: events from now on, once it is back
        return lambda: self._run(publish, key, last)

    def _run(self, publish: Callable[[list[JobEvent]], None], key: str, last: str) -> None:
        r: Any = connect(self.store.url, socket_timeout=self.BLOCK_MS / 1000 + 5,
                         client_name=f"fh-tasks-events-{self.store.namespace}")
        try:
            while not self._stop.is_set():
                try: got = r.xread({key: last}, count=1000, block=self.BLOCK_MS)
                except Exception:
                    log.warning("reading job events from %s failed; trying again", _safe(self.store.url), exc_info=True)
                    self._stop.wait(0.5)
                    continue
                for _, entries in got or ():
                    if not entries: continue
                    last = entries[-1][0]
                    publish([_event(eid, f) for eid, f in entries])
        finally:
            r.close()


def _event(eid: str, f: dict[str, str]) -> JobEvent:
    "An event from a stream entry: its id (Redis' milliseconds, then a counter) gives its order and its time."
    ms, _, n = eid.partition("-")
    return JobEvent(int(ms) << 20 | int(n or 0), f.get("id", ""), f.get("task", ""), f.get("kind", ""),
                    f.get("state", ""), int(f.get("attempt") or 0), _json(f.get("progress")), int(ms) / 1000)


def _json(text: str | None) -> Any:
    if text is None: return None
    try: return json.loads(text)
    except ValueError: return text
