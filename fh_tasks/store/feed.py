"""SQLiteFeed: job events from any process sharing one SQLite store.

Triggers append every change of a job to `fh_events`; they exist while a listener is registered in
`fh_listeners` (migrations 003 and 011). The feed registers this process, then a thread watches
`PRAGMA data_version` on a connection of its own (it changes whenever any other connection commits) and reads
the new rows after the last `seq` it saw. One feed serves every subscriber of the process; nobody polls the job
table.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..events import JobEvent, ThreadFeed

if TYPE_CHECKING:
    from .sqlite import SQLiteStore

__all__ = ["SQLiteFeed"]

log = logging.getLogger("fh_tasks.events")

#: Seconds between two looks at the store's change counter.
POLL = 0.005
#: A listener's registration lasts this long; the feed renews it at a third of that.
LISTENER_TTL = 30.0
#: Most events read in one query.
BATCH = 1000


class SQLiteFeed(ThreadFeed):
    "An `EventFeed` over a `SQLiteStore` file; `start`/`stop` may be called again after a stop."

    def __init__(self, store: SQLiteStore, poll: float = POLL) -> None:
        super().__init__()
        self.store, self.poll = store, poll
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _prepare(self, publish: Callable[[list[JobEvent]], None]) -> Callable[[], None]:
        "Register this process as a listener (the triggers log events from now on); the thread reads from there."
        last = self.store.listen_events(self.id, LISTENER_TTL)
        return lambda: self._run(publish, last)

    def _stopped(self) -> None:
        "Unregister the listener: the triggers stop keeping events for this process."
        try: self.store.unlisten_events(self.id)
        except Exception: log.warning("could not unregister event listener %s", self.id, exc_info=True)

    def _run(self, publish: Callable[[list[JobEvent]], None], last: int) -> None:
        conn = sqlite3.connect(self.store.path, timeout=self.store.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        renew_at = time.monotonic() + LISTENER_TTL / 3
        seen = -1
        try:
            while not self._stop.is_set():
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if version != seen:
                        seen = version
                        while (events := _read(conn, last)):
                            last = events[-1].seq
                            publish(events)
                            if len(events) < BATCH: break
                    if time.monotonic() >= renew_at:
                        renew_at = time.monotonic() + LISTENER_TTL / 3
                        self.store.listen_events(self.id, LISTENER_TTL)
                except Exception:
                    log.exception("reading job events failed; trying again")
                    self._stop.wait(0.5)
                self._stop.wait(self.poll)
        finally:
            conn.close()


def _read(conn: sqlite3.Connection, after: int) -> list[JobEvent]:
    rows = conn.execute("SELECT seq, job, task, kind, state, attempt, progress, at FROM fh_events "
                        "WHERE seq > ? ORDER BY seq LIMIT ?", (after, BATCH)).fetchall()
    return [JobEvent(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), _int(r[5]), _json(r[6]), float(r[7]))
            for r in rows]


def _int(v: object) -> int:
    try: return int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError): return 0


def _json(text: object) -> object:
    if text is None: return None
    try: return json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError): return text
