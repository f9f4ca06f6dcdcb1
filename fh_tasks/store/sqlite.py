"""SQLiteStore: the embedded job store, one SQLite file in WAL mode shared by any number of processes."""
from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from ..errors import QueueBusy, QueueUnavailable, StoreError
from ..job import JobRecord
from . import Claim, NewJob, Outcome
from .doorbell import Doorbell

__all__ = ["SQLiteStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
#: Attempts a job gets in all when its workers keep dying under it (or its retries + 1, if more).
CRASH_ATTEMPTS = 3
#: WAL size (in pages) at which a commit checkpoints by itself, when no worker has done it first.
AUTOCHECKPOINT_PAGES = 8000
#: Seconds a write waits for another process's lock before `QueueBusy` is raised.
BUSY_TIMEOUT = 5.0
# Connections inherited across fork() must never be used or closed in the child (sqlite howtocorrupt §2.6).
_inherited: list[sqlite3.Connection] = []


def _load_queries() -> dict[str, str]:
    text = files(__package__).joinpath("queries.sql").read_text()
    out: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        out[name.strip()] = "\n".join(l for l in body.splitlines() if not l.lstrip().startswith("--")).strip()
    return out


Q = _load_queries()
SCHEMA = files(__package__).joinpath("schema.sql").read_text()


class SQLiteStore:
    """Jobs in one SQLite file (WAL). Thread-safe: one connection per process, one lock around it.

    `durability="normal"` (synchronous=NORMAL) survives any process crash; a power loss may drop the
    last commits. `durability="full"` fsyncs every commit; concurrent enqueues share one commit.
    """

    def __init__(self, path: str | os.PathLike[str] = "fh_tasks.db", *,
                 durability: Literal["normal", "full"] = "normal",
                 busy_timeout: float = BUSY_TIMEOUT, clock: Callable[[], float] = time.time) -> None:
        if durability not in ("normal", "full"):
            raise ValueError(f"durability must be 'normal' or 'full', not {durability!r}")
        self.path, self.durability, self.busy_timeout, self.clock = str(path), durability, busy_timeout, clock
        self.memory = self.path == ":memory:"
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._pending: list[tuple[Sequence[NewJob], threading.Event]] = []
        self._ckpt: tuple[sqlite3.Connection, int] | None = None
        self._ckpt_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self.on_commit: list[Callable[[], None]] = []
        self._bell = None if self.memory else Doorbell(self.path)

    # -- connection ------------------------------------------------------------------------------
    def _check_path(self) -> None:
        p = Path(self.path)
        if not p.parent.is_dir():
            raise QueueUnavailable(f"cannot open job store {self.path}: directory {p.parent} does not exist")
        if p.exists():
            if not os.access(p, os.R_OK | os.W_OK):
                ro_fs = hasattr(os, "statvfs") and os.statvfs(p.parent).f_flag & os.ST_RDONLY
                why = "it is on a read-only file system" if ro_fs else "the file is read-only for this user"
                raise QueueUnavailable(f"cannot open job store {self.path}: {why}")
        elif not os.access(p.parent, os.W_OK):
            raise QueueUnavailable(f"cannot create job store {self.path}: directory {p.parent} is not writable")
        else:  # create it private before SQLite does (0600), whatever the umask
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR))

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid(): return self._conn
        if self._conn is not None: _inherited.append(self._conn)
        if not self.memory: self._check_path()
        try:
            c = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            if not self.memory:
                mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise QueueUnavailable(f"job store {self.path} could not switch to WAL (got {mode})")
            c.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
            c.execute("PRAGMA journal_size_limit=67108864")
            # Workers checkpoint from a thread of their own (`checkpoint`); commits only do it past ~32 MB of WAL.
            c.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            c.execute("PRAGMA temp_store=MEMORY")
            self._migrate(c)
        except sqlite3.Error as e:
            raise self._wrap(e, "open") from e
        self._conn, self._pid = c, os.getpid()
        return c

    def _migrate(self, c: sqlite3.Connection) -> None:
        have = c.execute("SELECT name FROM sqlite_master WHERE name='fh_meta'").fetchone()
        if have:
            v = int(c.execute("SELECT value FROM fh_meta WHERE key='schema_version'").fetchone()[0])
            if v != SCHEMA_VERSION:
                raise StoreError(f"job store {self.path} has schema version {v}; "
                                 f"this fh-tasks expects {SCHEMA_VERSION}")
            return
        c.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(SCHEMA): c.execute(stmt)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _wrap(self, e: sqlite3.Error, doing: str) -> StoreError:
        msg = str(e)
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
            c = self._connect()
            try:
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._wrap(e, doing) from e
            try:
                yield c
                c.execute("COMMIT")
            except BaseException as e:
                if c.in_transaction: c.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error): raise self._wrap(e, doing) from e
                raise

    def _read(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        with self._lock:
            try: return self._connect().execute(sql, params).fetchall()
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

    # -- writes ----------------------------------------------------------------------------------
    def enqueue(self, jobs: Sequence[NewJob]) -> None:
        if not jobs: return
        if self.durability == "full": return self._group_enqueue(jobs)
        with self._tx("enqueue") as c:
            self._insert(c, jobs)
        self._committed()

    def _insert(self, c: sqlite3.Connection, jobs: Sequence[NewJob]) -> None:
        c.executemany(Q["insert"], [(j.id, j.task, j.queue, j.args, j.state, j.max_attempts, j.timeout,
                                     j.run_at, j.created_at, j.parent) for j in jobs])
        for j in jobs:
            if j.parent: self._settle_child(c, j)

    def _settle_child(self, c: sqlite3.Connection, j: NewJob) -> None:
        "A chained job stored after its parent already ended starts (or is cancelled) at once."
        row = c.execute(Q["parent_state"], {"id": j.parent}).fetchone()
        state = row[0] if row else "missing"
        if state == "succeeded": c.execute(Q["unwait"], {"id": j.id, "now": self.clock()})
        elif state in ("failed", "cancelled", "missing"):
            c.execute(Q["cancel"], {"id": j.id, "now": self.clock()})
            self._cancel_chain(c, j.id, self.clock())

    def enqueue_claimed(self, jobs: Sequence[NewJob], claimed: int, worker: str, lease: float,
                        outcomes: Sequence[Outcome] = ()) -> tuple[int, list[Claim]]:
        """Store `jobs`, the first `claimed` of them already claimed by `worker`, and record `outcomes`,
        in one transaction: an in-process worker with free slots takes new jobs without a claim round trip."""
        now = self.clock()
        with self._tx("enqueue") as c:
            accepted = self._finish(c, list(outcomes), now) if outcomes else 0
            if claimed:
                c.executemany(Q["insert_claimed"], [(j.id, j.task, j.queue, j.args, j.max_attempts, j.timeout, j.run_at,
                                                     j.created_at, worker, now + lease, now) for j in jobs[:claimed]])
            if claimed < len(jobs): self._insert(c, jobs[claimed:])
        if claimed < len(jobs): self._committed()
        return accepted, [Claim(j.id, j.task, j.queue, j.args, 1, j.max_attempts, j.timeout, j.created_at, now)
                          for j in jobs[:claimed]]

    def _group_enqueue(self, jobs: Sequence[NewJob]) -> None:
        # Group commit: whoever holds the lock commits every batch that queued up behind it in one fsync.
        done = threading.Event()
        with self._pending_lock: self._pending.append((jobs, done))
        with self._lock:
            if done.is_set(): return
            with self._pending_lock: batch, self._pending = self._pending, []
            try:
                with self._tx("enqueue") as c:
                    for js, _ in batch: self._insert(c, js)
            except BaseException:
                with self._pending_lock: self._pending = [b for b in batch if b[1] is not done] + self._pending
                raise
            for _, ev in batch: ev.set()
        self._committed()

    def _committed(self) -> None:
        "New due jobs are stored: wake the workers of this process, and ring those of the others."
        for f in self.on_commit: f()
        if self._bell is not None:
            try: self._bell.ring()
            except OSError: pass  # they will poll

    def listen(self) -> Doorbell | None:
        "A doorbell a worker can watch: other processes ring it when they store jobs (None for ':memory:')."
        if self.memory: return None
        bell = Doorbell(self.path)
        try: bell.listen()
        except OSError: return None
        return bell

    def claim(self, worker: str, queues: Sequence[str], limit: int, lease: float) -> list[Claim]:
        return self.finish_and_claim((), worker, queues, limit, lease)[1]

    def finish(self, outcomes: Iterable[Outcome]) -> int:
        return self.finish_and_claim(outcomes, "", (), 0, 0.0)[0]

    def finish_and_claim(self, outcomes: Iterable[Outcome], worker: str, queues: Sequence[str], limit: int,
                         lease: float) -> tuple[int, list[Claim]]:
        "Record outcomes and claim the next batch in one transaction: one commit per worker round trip."
        outcomes, now = list(outcomes), self.clock()
        with self._tx("record results and claim jobs") as c:
            accepted = self._finish(c, outcomes, now) if outcomes else 0
            rows = c.execute(_per_queue("claim", "due", len(queues)),
                             {"worker": worker, "lease_until": now + lease, "now": now, "limit": limit,
                              **{f"q{i}": q for i, q in enumerate(queues)}}).fetchall() if limit > 0 and queues else []
        # RETURNING gives rows in no set order: hand them out in the order they were due.
        rows.sort(key=lambda r: (r[8], r[9]))
        claims = [Claim(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], now) for r in rows]
        return accepted, claims

    def _finish(self, c: sqlite3.Connection, outcomes: list[Outcome], now: float) -> int:
        by_kind: dict[str, list[Outcome]] = {}
        for o in outcomes: by_kind.setdefault(o.kind, []).append(o)
        accepted = 0
        if (ok := by_kind.get("succeed")):
            accepted += c.executemany(Q["succeed"], [{"id": o.id, "attempt": o.attempt, "now": now, "result": o.result}
                                                     for o in ok]).rowcount
            c.execute(Q["release_children_of"], {"ids": json.dumps([o.id for o in ok]), "now": now})
        if (rt := by_kind.get("retry")):
            accepted += c.executemany(Q["retry"], [{"id": o.id, "attempt": o.attempt, "error": o.error,
                                                    "run_at": o.run_at}
                                                   for o in rt]).rowcount
        if (rl := by_kind.get("release")):
            accepted += c.executemany(Q["release"], [{"id": o.id, "attempt": o.attempt} for o in rl]).rowcount
        for o in by_kind.get("fail", ()):
            if c.execute(Q["fail"], {"id": o.id, "attempt": o.attempt, "now": now, "error": o.error}).rowcount:
                accepted += 1
                self._cancel_chain(c, o.id, now)
        return accepted

    def _cancel_chain(self, c: sqlite3.Connection, id: str, now: float) -> None:
        todo = [id]
        while todo:
            parent = todo.pop()
            msg = f"an earlier job in its chain ({parent}) did not succeed"
            err = json.dumps({"type": "Cancelled", "message": msg})
            todo += [r[0] for r in c.execute(Q["cancel_children"], {"id": parent, "now": now, "error": err})]

    def heartbeat(self, worker: str, lease: float) -> int:
        with self._tx("renew leases") as c:
            return c.execute(Q["heartbeat"], {"worker": worker, "lease_until": self.clock() + lease}).rowcount

    def expire(self) -> list[tuple[str, str]]:
        now = self.clock()
        err = json.dumps({"type": "WorkerLost", "message": "the worker running this job stopped (its lease expired)"})
        with self._tx("requeue expired jobs") as c:
            rows = [(r[0], r[1]) for r in c.execute(Q["expire"], {"now": now, "error": err,
                                                                  "crash_attempts": CRASH_ATTEMPTS}).fetchall()]
            for id, state in rows:
                if state == "failed": self._cancel_chain(c, id, now)
        if rows: self._committed()
        return rows

    def set_progress(self, id: str, attempt: int, progress: str) -> bool:
        with self._tx("record progress") as c:
            return c.execute(Q["progress"], {"id": id, "attempt": attempt, "progress": progress}).rowcount > 0

    def cancel(self, id: str) -> bool:
        now = self.clock()
        with self._tx("cancel a job") as c:
            ok = c.execute(Q["cancel"], {"id": id, "now": now}).rowcount > 0
            if ok: self._cancel_chain(c, id, now)
        return ok

    def requeue(self, id: str) -> bool:
        with self._tx("requeue a job") as c:
            ok = c.execute(Q["requeue"], {"id": id, "now": self.clock()}).rowcount > 0
        if ok: self._committed()
        return ok

    def prune(self, before: float, limit: int = 10_000) -> int:
        with self._tx("prune finished jobs") as c:
            return c.execute(Q["prune"], {"before": before, "limit": limit}).rowcount

    # -- reads -----------------------------------------------------------------------------------
    def get(self, id: str) -> JobRecord | None:
        rows = self._read(Q["get"], {"id": id})
        return JobRecord.from_row(dict(rows[0])) if rows else None

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        where, params = [], []
        if state: where.append("state = ?"); params.append(str(state))
        if task: where.append("task = ?"); params.append(task)
        cond = "WHERE " + " AND ".join(where) if where else ""
        sql = f"SELECT * FROM fh_jobs {cond} ORDER BY seq DESC LIMIT ? OFFSET ?"
        return [JobRecord.from_row(dict(r)) for r in self._read(sql, [*params, max(0, limit), max(0, offset)])]

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._read(Q["counts"])}

    def next_due(self, queues: Sequence[str]) -> float | None:
        "When the next waiting job of these queues is due (None: nothing waits)."
        if not queues: return None
        row = self._read(_per_queue("next_due", "next_due_one", len(queues)),
                         {f"q{i}": q for i, q in enumerate(queues)})
        return None if not row or row[0][0] is None else float(row[0][0])

    def finished_since(self, since: float) -> int:
        return int(self._read(Q["finished_since"], {"since": since})[0][0])

    def integrity(self) -> str:
        return str(self._read("PRAGMA quick_check")[0][0])


@functools.lru_cache(maxsize=64)
def _per_queue(outer: str, inner: str, n: int) -> str:
    "Expand `{due}` in query `outer` into a UNION ALL of query `inner`, once per queue (:q0, :q1, ...)."
    return Q[outer].replace("{due}", " UNION ALL ".join(Q[inner].replace("{i}", str(i)) for i in range(n)))


def _statements(script: str) -> list[str]:
    body = "\n".join(l for l in script.splitlines() if not l.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
