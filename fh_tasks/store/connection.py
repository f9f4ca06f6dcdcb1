"""The store's file and its one connection per process: opening it (path checks, WAL, migrations), write
transactions that wait for other processes' locks with short jittered retries, reads, WAL checkpoints. A mixin of
`SQLiteStore`.
"""
from __future__ import annotations

import logging
import os
import random
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import QueueBusy, QueueUnavailable, StoreError
from ..pid import pid
from ..records import JobRecord
from .migrations import SCHEMA_VERSION, apply, stored_version
from .queries import _lenient

__all__ = ["AUTOCHECKPOINT_PAGES", "BACKOFF_FIRST", "BACKOFF_MAX", "BUSY_TIMEOUT", "Connection", "decoding"]

log = logging.getLogger("fh_tasks.store")
T = TypeVar("T")

#: WAL size (in pages) at which a commit checkpoints by itself, when no worker has done it first.
AUTOCHECKPOINT_PAGES = 8000
#: Seconds a write waits for another process's lock before `QueueBusy` is raised.
BUSY_TIMEOUT = 5.0
#: Waiting for a lock another connection holds: sleeps start at BACKOFF_FIRST seconds and grow by half per try up to
#: BACKOFF_MAX, each jittered (×0.5–1.5), until `busy_timeout`. SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20,
#: 25... ms: far longer than a write transaction here holds the lock (~0.1 ms), so it is turned off after connecting.
BACKOFF_FIRST, BACKOFF_MAX = 20e-6, 2.5e-4
# Connections inherited across fork() must never be used or closed in the child (sqlite howtocorrupt §2.6).
_inherited: list[sqlite3.Connection] = []


class Connection:
    "The store's connection and transactions; mixed into `SQLiteStore` (which sets these attributes)."

    path: str
    durability: str
    busy_timeout: float
    memory: bool
    readonly: bool
    create: bool
    _lock: threading.RLock
    _conn: sqlite3.Connection | None
    _pid: int
    _waits_itself: bool  # the connection's busy handler is off: see `_own_waits`
    _ckpt: tuple[sqlite3.Connection, int] | None
    _ckpt_lock: threading.Lock

    def _check_path(self) -> None:
        p = Path(self.path)
        if not p.parent.is_dir():
            raise QueueUnavailable(f"cannot open job store {self.path}: directory {p.parent} does not exist")
        if p.exists() and not p.is_file():
            raise QueueUnavailable(f"cannot open job store {self.path}: it is not a file")
        if not p.exists() and not self.create:
            raise QueueUnavailable(f"no job store at {self.path}: the file does not exist")
        if self.readonly:
            if not os.access(p, os.R_OK):
                raise QueueUnavailable(f"cannot read job store {self.path}: the file is not readable by this user")
        elif p.exists():
            if not os.access(p, os.R_OK | os.W_OK):
                ro_fs = hasattr(os, "statvfs") and os.statvfs(p.parent).f_flag & os.ST_RDONLY
                why = "it is on a read-only file system" if ro_fs else "the file is read-only for this user"
                raise QueueUnavailable(f"cannot open job store {self.path}: {why}")
        elif not os.access(p.parent, os.W_OK):
            raise QueueUnavailable(f"cannot create job store {self.path}: directory {p.parent} is not writable")
        else:  # create it private before SQLite does (0600), whatever the umask
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR))

    def _readonly_uri(self) -> str:
        """A URI that opens the file read-only. SQLite may still create the `-shm` and `-wal` files a WAL database
        is read through (owned as the database is, when run as root); the database itself is never written."""
        return "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"

    def _connect(self) -> sqlite3.Connection:
        "The connection, with SQLite's own busy handler waiting up to `busy_timeout` for a lock."
        c = self._open()
        if self._waits_itself:
            c.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            self._waits_itself = False
        return c

    def _own_waits(self) -> sqlite3.Connection:
        """The connection with SQLite's busy handler off: the caller waits for locks itself (`_retrying`). SQLite's
        handler sleeps 1, 2, 5, 10, 15, 20, 25... ms, far longer than a write here holds the lock (~0.1 ms)."""
        c = self._open()
        if not self._waits_itself:
            c.execute("PRAGMA busy_timeout=0")
            self._waits_itself = True
        return c

    def _open(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == pid(): return self._conn
        if self._conn is not None: _inherited.append(self._conn)
        if not self.memory: self._check_path()
        c: sqlite3.Connection | None = None
        try:
            if self.readonly:  # SQLite itself refuses every write on this connection
                c = sqlite3.connect(self._readonly_uri(), uri=True, timeout=self.busy_timeout,
                                    isolation_level=None, check_same_thread=False)
            else:
                c = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                    check_same_thread=False)
            c.row_factory = sqlite3.Row
            # Before anything is changed: not SQLite, another app's database, or a newer store is refused here.
            version = stored_version(c, self.path)
            if not self.memory and not self.readonly:
                # Several connections switching a new file at once: SQLite answers busy at once to all but one
                # (it does not wait for a lock it could deadlock on), so the switch is tried again.
                mode = self._retrying(c.execute, "PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise QueueUnavailable(f"job store {self.path} could not switch to WAL (got {mode})")
            c.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
            c.execute("PRAGMA journal_size_limit=67108864")
            # Workers checkpoint from a thread of their own (`checkpoint`); commits only do it past ~32 MB of WAL.
            c.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            c.execute("PRAGMA temp_store=MEMORY")
            self._migrate(c, version)
        except BaseException as e:
            if c is not None: c.close()
            if isinstance(e, sqlite3.Error): raise self._wrap(e, "open") from e
            raise
        self._conn, self._pid, self._waits_itself = c, os.getpid(), False
        return c

    def _migrate(self, c: sqlite3.Connection, version: int) -> None:
        "Bring the store up to SCHEMA_VERSION (see store/migrations); a read-only store must be up to date already."
        if version == SCHEMA_VERSION: return
        if self.readonly:
            why = "it is empty" if version == 0 else f"it has schema {version}, this fh-tasks needs {SCHEMA_VERSION}"
            raise QueueUnavailable(f"cannot read job store {self.path} without writing to it: {why}; open it once "
                                   "read-write (start the app or a worker) to set it up")
        ran = apply(c, self.path)
        if ran: log.info("job store %s: ran migrations %s", self.path, ", ".join(m.name for m in ran))

    def _wrap(self, e: sqlite3.Error, doing: str) -> StoreError:
        msg = str(e)
        if self.readonly and "readonly" in msg:
            return StoreError(f"cannot {doing}: job store {self.path} was opened read-only")
        if "locked" in msg or "busy" in msg:
            return QueueBusy(f"job store {self.path} stayed locked for {self.busy_timeout}s while trying to {doing}")
        if "readonly" in msg or "read-only" in msg:
            return QueueUnavailable(f"cannot {doing} job store {self.path}: it is read-only ({msg})")
        if "full" in msg:
            return QueueUnavailable(f"cannot {doing} job store {self.path}: the disk is full ({msg})")
        if "unable to open" in msg or "disk I/O" in msg:
            return QueueUnavailable(f"cannot {doing} job store {self.path}: {msg}")
        return StoreError(f"job store {self.path} failed to {doing}: {msg}")

    @contextmanager
    def _tx(self, doing: str) -> Iterator[sqlite3.Connection]:
        "A write transaction (BEGIN IMMEDIATE), rolled back on any error; sqlite errors become StoreErrors."
        with self._lock:
            c = self._own_waits()
            try:
                self._retrying(c.execute, "BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._wrap(e, doing) from e
            try:
                yield c
                c.execute("COMMIT")
            except BaseException as e:
                if c.in_transaction: c.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error): raise self._wrap(e, doing) from e
                raise

    def _retrying(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`; while SQLite answers busy (another connection holds the lock), try again after short jittered
        sleeps (BACKOFF_FIRST growing to BACKOFF_MAX), up to `busy_timeout` seconds; then the busy error is raised."""
        try: return fn(*args)
        except sqlite3.OperationalError as e:
            if not _is_busy(e): raise
        deadline, delay = time.monotonic() + self.busy_timeout, BACKOFF_FIRST
        while True:
            left = deadline - time.monotonic()
            if left <= 0: return fn(*args)
            time.sleep(min(left, delay * (0.5 + random.random())))
            delay = min(delay * 1.5, BACKOFF_MAX)
            try: return fn(*args)
            except sqlite3.OperationalError as e:
                if not _is_busy(e): raise

    def _read(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        with self._lock:
            try: return self._retrying(lambda: self._own_waits().execute(sql, params).fetchall())
            except sqlite3.Error as e: raise self._wrap(e, "read") from e

    def data_version(self) -> int:
        "Changes whenever another connection commits: a cheap way to notice new jobs."
        return int(self._read("PRAGMA data_version")[0][0])

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy committed WAL frames into the database without blocking writers (PASSIVE), on a connection of
        its own, so that commits on the main connection do not pay for it. Returns (busy, frames, copied)."""
        if self.memory: return (0, 0, 0)
        with self._ckpt_lock:
            if self._ckpt is None or self._ckpt[1] != os.getpid():
                self._connect()  # the file exists, in WAL mode, with its schema
                self._ckpt = (sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                              check_same_thread=False), os.getpid())
            try: row = self._ckpt[0].execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as e: raise self._wrap(e, "checkpoint") from e
        return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid(): self._conn.close()
            self._conn = None
        with self._ckpt_lock:
            if self._ckpt is not None and self._ckpt[1] == os.getpid(): self._ckpt[0].close()
            self._ckpt = None


    # Rows may come from other versions of fh-tasks: `JobRecord.from_row` reads any row, and text that is not
    # valid UTF-8 is decoded with replacement characters, so one odd row never fails a read of many.
    def _records(self, sql: str, params: Any = ()) -> list[JobRecord]:
        with self._lock:
            c = self._own_waits()
            try:
                rows = decoding(c, _lenient, lambda: self._retrying(lambda: c.execute(sql, params).fetchall()))
            except sqlite3.Error as e: raise self._wrap(e, "read") from e
        return [JobRecord.from_row(dict(r)) for r in rows]

    def integrity(self) -> str:
        return str(self._read("PRAGMA quick_check")[0][0])


def decoding(c: sqlite3.Connection, factory: Callable[[bytes], str], run: Callable[[], T],
             undo: Callable[[], object] | None = None) -> T:
    """`run()`, reading text as `str`. Should a text value it reads not be UTF-8 (SQLite's "Could not decode"
    error), `undo()` (if given) and `run()` again reading text with `factory`; the connection reads `str` after."""
    try: return run()
    except sqlite3.OperationalError as e:
        if "decode" not in str(e): raise
    if undo is not None: undo()
    c.text_factory = factory
    try: return run()
    finally: c.text_factory = str


def _is_busy(e: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock, or changed the schema faster than SQLite re-prepares the statement (the job
    event triggers come and go with listeners: migration 011). Either way nothing was done, and trying again is safe."""
    msg = str(e)
    return "locked" in msg or "busy" in msg or "schema has changed" in msg
