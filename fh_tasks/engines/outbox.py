"""The outbox of the broker engines: a request's jobs are committed to the local SQLite file before its response
starts, whatever the state of the broker, and a relay thread hands them over afterwards.

Publishing to Celery's or Dramatiq's broker from a request handler would make every request fail (or hang for
seconds: Celery retries a publish) while the broker is down, and nothing buffers it (engines.md §4). So the jobs
go to `fh_outbox` (migration 004) in one transaction, the request answers, and the relay:

- claims the oldest pending rows (a stamp, so that the relays of several processes sharing the file do not send a
  row together; a stamp outliving a crashed relay runs out), hands them to `send` in order, and marks them sent;
- stops at the first row it could not send and tries again from that row after a backoff (0.05 s doubling to
  5 s), so a later job never overtakes an earlier one and the broker is not hammered while it is down;
- gives a row up (`dead`, logged as an error) after `MAX_TRIES` failures that were not a broker being down.

A crash between sending a row and marking it sends it again: the status store's `insert` and `start` absorb the
copy (one record per job id, one run per attempt). While a row is pending, `pending(id)` answers for it (the engine
shows the job as stored).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

from ..errors import QueueUnavailable, StoreError
from ..pid import pid
from ..records import NewJob

__all__ = ["Outbox", "Send"]

log = logging.getLogger("fh_tasks.outbox")

#: Rows one relay pass sends.
BATCH = 200
#: Seconds a relay's claim on rows lasts (a relay that died mid-batch leaves them to others after that).
CLAIM = 30.0
#: Relay backoff after a failure: from the first figure, doubling up to the second.
BACKOFF = (0.05, 5.0)
#: Failures (other than the broker being down) after which a row is given up.
MAX_TRIES = 5
#: Sent rows are deleted this long after they were sent.
KEEP_SENT = 3600.0

#: `send(jobs) -> (how many were sent, in order, the error that stopped it or None)`. A `QueueUnavailable` means the
#: broker (or status store) is down: the row waits; any other error counts against the row's `MAX_TRIES`.
Send = Callable[[list[NewJob]], tuple[int, BaseException | None]]


class Outbox:
    """The `fh_outbox` table of the SQLite file `path`, for one engine (`engine` names it, with its namespace: the
    file may hold the rows of several). `send` is called from the relay thread only."""

    def __init__(self, path: str, engine: str, send: Send, *, durability: Literal["normal", "full"] = "normal",
                 clock: Callable[[], float] = time.time, relay: bool = True) -> None:
        self.path, self.engine, self.send, self.durability, self.clock = path, engine, send, durability, clock
        self.relay = relay  # False: no relay thread; whoever calls `relay_once` or `drain` sends the rows
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._purge_at = 0.0
        self.backoff = 0.0
        self.last_error: str | None = None

    # -- the table -------------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == pid(): return self._conn
        from ..store.sqlite import SQLiteStore
        store = SQLiteStore(self.path, durability=self.durability)  # creates the file (0600) and runs migrations
        try: store.data_version()
        finally: store.close()
        c = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        c.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        self._conn, self._pid = c, os.getpid()
        return c

    def _write(self, sql: str, params: Sequence[object] | Sequence[Sequence[object]], many: bool = False) -> int:
        with self._lock:
            try:
                c = self._connect()
                c.execute("BEGIN IMMEDIATE")
                try:
                    n = (c.executemany(sql, params) if many else c.execute(sql, params)).rowcount  # type: ignore[arg-type]
                    c.execute("COMMIT")
                except BaseException:
                    if c.in_transaction: c.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise QueueUnavailable(f"cannot write the outbox in {self.path}: {e}") from e
            return n

    def _read(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        with self._lock:
            try: return self._connect().execute(sql, params).fetchall()
            except sqlite3.Error as e: raise StoreError(f"cannot read the outbox in {self.path}: {e}") from e

    def add(self, jobs: Sequence[NewJob]) -> None:
        "Commit `jobs` (all or none), then wake the relay."
        if not jobs: return
        now = self.clock()
        self._write("INSERT OR IGNORE INTO fh_outbox (id, engine, job, created_at) VALUES (?, ?, ?, ?)",
                    [(j.id, self.engine, _dump(j), now) for j in jobs], many=True)
        self.wake()

    def pending(self, id: str) -> NewJob | None:
        "The job with this id while it waits in the outbox (not sent, not given up), else None."
        rows = self._read("SELECT job FROM fh_outbox WHERE id = ? AND engine = ? AND sent_at IS NULL AND dead = 0",
                          (id, self.engine))
        return _load(str(rows[0][0])) if rows else None

    def pending_jobs(self, limit: int = 1000) -> list[NewJob]:
        "The jobs waiting in the outbox, oldest first."
        rows = self._read("SELECT job FROM fh_outbox WHERE engine = ? AND sent_at IS NULL AND dead = 0 ORDER BY seq "
                          "LIMIT ?", (self.engine, limit))
        return [_load(str(r[0])) for r in rows]

    def exists(self) -> bool:
        "True when the file exists (an outbox never written is never created just to be read)."
        return os.path.exists(self.path)

    # -- the relay -------------------------------------------------------------------------------------------------
    def relay_once(self) -> int:
        """Send the oldest pending rows, in order, stopping at the first that fails; returns how many were sent.
        Raises nothing: an error is logged, kept in `last_error`, and sets `backoff`."""
        now = self.clock()
        try:
            with self._lock:
                c = self._connect()
                if not c.execute("SELECT 1 FROM fh_outbox WHERE engine = ? AND sent_at IS NULL AND dead = 0 AND "
                                 "claimed_until < ? LIMIT 1", (self.engine, now)).fetchone(): return 0
                c.execute("BEGIN IMMEDIATE")
                try:
                    rows = c.execute(
                        "UPDATE fh_outbox SET claimed_until = ? WHERE seq IN (SELECT seq FROM fh_outbox "
                        "WHERE engine = ? AND sent_at IS NULL AND dead = 0 AND claimed_until < ? ORDER BY seq "
                        "LIMIT ?) RETURNING seq, job, tries", (now + CLAIM, self.engine, now, BATCH)).fetchall()
                    c.execute("COMMIT")
                except BaseException:
                    if c.in_transaction: c.execute("ROLLBACK")
                    raise
        except sqlite3.Error as e:
            self._failed(f"cannot read the outbox in {self.path}: {e}")
            return 0
        if not rows: return 0
        rows.sort(key=lambda r: int(r[0]))
        jobs = [_load(str(r[1])) for r in rows]
        sent, error = self.send(jobs)
        done = self.clock()
        try:
            if sent:
                self._write("UPDATE fh_outbox SET sent_at = ?, claimed_until = 0, error = NULL WHERE seq = ?",
                            [(done, r[0]) for r in rows[:sent]], many=True)
            if error is not None and sent < len(rows):
                seq, tries = rows[sent][0], int(rows[sent][2]) + 1  # type: ignore[call-overload]
                down = isinstance(error, QueueUnavailable)
                dead = not down and tries >= MAX_TRIES
                self._write("UPDATE fh_outbox SET tries = ?, error = ?, dead = ?, claimed_until = 0 WHERE seq = ?",
                            (tries, f"{type(error).__name__}: {error}"[:2000], int(dead), seq))
                self._write("UPDATE fh_outbox SET claimed_until = 0 WHERE seq > ? AND engine = ? AND claimed_until = ?",
                            (seq, self.engine, now + CLAIM))
                if dead: log.error("outbox %s: job %s given up after %d tries: %s", self.path, jobs[sent].id, tries,
                                   error)
                self._failed(f"{type(error).__name__}: {error}", quiet=not down or tries > 1)
            else:
                self.backoff, self.last_error = 0.0, None
            if done >= self._purge_at:
                self._purge_at = done + 60.0
                self._write("DELETE FROM fh_outbox WHERE sent_at IS NOT NULL AND sent_at < ?", (done - KEEP_SENT,))
        except QueueUnavailable as e:
            self._failed(str(e))
        return sent

    def _failed(self, why: str, quiet: bool = False) -> None:
        self.backoff = min(BACKOFF[1], max(BACKOFF[0], self.backoff * 2))
        if why != self.last_error and not quiet:
            log.warning("outbox %s: could not send jobs (%s); they wait, trying again in %.2fs", self.path, why,
                        self.backoff)
        self.last_error = why

    def drain(self, timeout: float = 10.0) -> bool:
        "Relay in the caller's thread until nothing is pending (True) or `timeout` runs out (False)."
        deadline = time.monotonic() + timeout
        while self.pending_jobs(1):
            if time.monotonic() > deadline: return False
            if not self.relay_once(): time.sleep(max(0.01, self.backoff))
        return True

    def start(self) -> None:
        "Start the relay thread (once per process; a forked child starts its own)."
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid(): return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fh-tasks-outbox", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        "New rows: relay them now."
        self._wake.set()
        if self.relay and (self._thread is None or not self._thread.is_alive()): self.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try: sent = self.relay_once() if self.exists() else 0
            except Exception:
                log.exception("outbox %s: the relay failed; trying again", self.path)
                sent, self.backoff = 0, BACKOFF[1]
            if self.backoff: self._stop.wait(self.backoff)  # new rows do not cut a backoff short
            elif not sent: self._wake.wait(1.0)  # rows another process left (it crashed) are found within a second

    def stop(self) -> None:
        th, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if th is not None and th is not threading.current_thread(): th.join(5)

    def close(self) -> None:
        self.stop()
        with self._lock:
            if self._conn is not None and self._pid == os.getpid(): self._conn.close()
            self._conn = None


def _dump(j: NewJob) -> str:
    return json.dumps({"id": j.id, "task": j.task, "args": j.args, "queue": j.queue, "max_attempts": j.max_attempts,
                       "timeout": j.timeout, "run_at": j.run_at, "created_at": j.created_at, "parent": j.parent,
                       "owner": j.owner})


def _load(text: str) -> NewJob:
    d = json.loads(text)
    return NewJob(id=d["id"], task=d["task"], args=d["args"], queue=d["queue"], max_attempts=d["max_attempts"],
                  timeout=d["timeout"], run_at=d["run_at"], created_at=d["created_at"], parent=d["parent"],
                  owner=d.get("owner"))
