"""SQLiteStore: the embedded job store, one SQLite file in WAL mode shared by any number of processes."""
from __future__ import annotations

import collections
import functools
import json
import logging
import os
import random
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from ..encoding import storable_text
from ..errors import QueueBusy, QueueUnavailable, StoreError
from ..pid import pid
from ..progress import ProgressBuffer
from ..records import PRIORITY_STEP, JobRecord, JobState
from . import Claim, NewJob, Outcome, WorkerInfo
from .dashboard import DashboardQueries
from .doorbell import Doorbell
from .feed import SQLiteFeed
from .inputs import WorkflowInputs, _taking
from .limited import LimitedClaims, Limits
from .migrations import SCHEMA_VERSION, apply, stored_version
from .queries import _KNOWN, _STATES, Q, _lenient, _num

__all__ = ["SQLiteStore", "SCHEMA_VERSION"]

log = logging.getLogger("fh_tasks.store")

#: Attempts a job gets in all when its workers keep dying under it (or its retries + 1, if more).
CRASH_ATTEMPTS = 3
#: A registered worker not seen for this many of its lease periods is dead (not live; its row is then dropped).
WORKER_STALE_LEASES = 3
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


class SQLiteStore(WorkflowInputs, LimitedClaims, DashboardQueries):
    """Jobs in one SQLite file (WAL). Thread-safe: one connection per process, one lock around it.

    `durability="normal"` (synchronous=NORMAL) survives any process crash; a power loss may drop the
    last commits. `durability="full"` fsyncs every commit; concurrent enqueues share one commit.

    Opening brings an older store up to date (`store/migrations`), and refuses a file that is not an fh-tasks store
    (another SQLite database, or not SQLite) or that a newer fh-tasks made. `create=False` refuses a missing file
    instead of creating it. `readonly=True` opens an existing store without ever writing to it (no migration, no
    change of journal mode); a write then raises `StoreError`.
    """

    def __init__(self, path: str | os.PathLike[str] = "fh_tasks.db", *,
                 durability: Literal["normal", "full"] = "normal",
                 busy_timeout: float = BUSY_TIMEOUT, clock: Callable[[], float] = time.time,
                 readonly: bool = False, create: bool = True) -> None:
        if durability not in ("normal", "full"):
            raise ValueError(f"durability must be 'normal' or 'full', not {durability!r}")
        self.path, self.durability, self.busy_timeout, self.clock = str(path), durability, busy_timeout, clock
        self.memory = self.path == ":memory:"
        if readonly and self.memory: raise ValueError("a read-only store needs a file, not ':memory:'")
        self.readonly, self.create = readonly, create and not readonly
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._waits_itself = False  # the connection's busy handler is off: see `_own_waits`
        self._pending: list[tuple[Sequence[NewJob], threading.Event]] = []
        self._ckpt: tuple[sqlite3.Connection, int] | None = None
        self._ckpt_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self.on_commit: list[Callable[[], None]] = []
        self._progress = ProgressBuffer()  # see set_progress / record_progress
        self._cancelled: dict[tuple[str, int], None] = {}  # attempts found cancelled while running (newest last)
        self._bell = None if self.memory or readonly else Doorbell(self.path)

    # -- connection ------------------------------------------------------------------------------
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

    # -- writes ----------------------------------------------------------------------------------
    def enqueue(self, jobs: Sequence[NewJob]) -> None:
        """Store `jobs` in one transaction. A job whose uniqueness key (`NewJob.key`) a live job holds (one stored
        before, or an earlier one of `jobs`) is not stored: its `id` becomes the live job's once committed."""
        if not jobs: return
        if self.durability == "full": return self._group_enqueue(jobs)
        with self._tx("enqueue") as c:
            dup = self._insert(c, jobs)
        _point_at_live(jobs, dup)
        self._committed()

    def _insert(self, c: sqlite3.Connection, jobs: Sequence[NewJob]) -> dict[int, str]:
        """Insert `jobs`; returns {index in `jobs`: the live job's id} for those not stored because a live job holds
        their key (fh_jobs_ukey; the insert does nothing on that conflict, so concurrent defers never fail). The
        caller points them at the live job once the transaction commits (`_point_at_live`)."""
        rows = [(j.id, j.task, j.queue, j.args, _state(j), j.max_attempts, j.timeout, j.run_at, j.created_at,
                 j.parent, j.owner, j.priority, j.key, j.limit_key, j.takes, j.group) for j in jobs]
        dup = self._insert_keyed(c, Q["insert"], jobs, rows)
        for i, j in enumerate(jobs):
            if j.parent and i not in dup: self._settle_child(c, j)
        return dup

    def _insert_keyed(self, c: sqlite3.Connection, sql: str, jobs: Sequence[NewJob],
                      rows: list[tuple[Any, ...]]) -> dict[int, str]:
        "Run insert `sql` for `rows`: in one call without keys; one by one with, to learn which were duplicates."
        if len(rows) == 1 and jobs[0].key is None:
            c.execute(sql, rows[0])
            return {}
        if all(j.key is None for j in jobs):
            c.executemany(sql, rows)
            return {}
        dup: dict[int, str] = {}
        for i, (j, row) in enumerate(zip(jobs, rows, strict=True)):
            if not c.execute(sql, row).rowcount and j.key is not None:
                dup[i] = str(c.execute(Q["live_key"], {"key": j.key}).fetchone()[0])
        return dup

    def live_job(self, key: str) -> str | None:
        "The id of the live (not finished) job holding uniqueness key `key`, or None."
        rows = self._read(Q["live_key"], {"key": key})
        return str(rows[0][0]) if rows else None

    def _settle_child(self, c: sqlite3.Connection, j: NewJob) -> None:
        "A chained job stored after its parent already ended starts (or is cancelled) at once."
        row = c.execute(Q["parent_state"], {"id": j.parent}).fetchone()
        state = row[0] if row else "missing"
        if state == "succeeded": c.execute(Q["unwait"], {"id": j.id, "now": self.clock()})
        elif state in ("failed", "cancelled", "missing"):
            c.execute(Q["cancel"], {"id": j.id, "now": self.clock()})
            self._cancel_chain(c, j.id, self.clock())

    def enqueue_claimed(self, jobs: Sequence[NewJob], claimed: int, worker: str, lease: float,
                        outcomes: Sequence[Outcome] = (), *, queues: Sequence[str] = (), tasks: str | None = None,
                        ordered: bool = False) -> tuple[int, list[Claim]]:
        """Store `jobs`, the first `claimed` of them already claimed by `worker`, and record `outcomes`,
        in one transaction: an in-process worker with free slots takes new jobs without a claim round trip.

        The claimed ones come in due order (`due`: run_at - priority * 60). Given the worker's `queues` (and `tasks`),
        a new job is claimed only if no stored due job of those queues would be claimed before it: none ranks at or
        before it, or (`ordered`: strict or weighted queues) none is due at all. The others are stored as queued and
        the worker claims in order. A job whose key a live job holds is not stored (see `enqueue`)."""
        now = self.clock()
        with self._tx("enqueue") as c:
            accepted = self._record(c, list(outcomes), now)
            if claimed and queues: claimed = self._handoff_cut(c, jobs, claimed, queues, tasks, ordered, now)
            dup: dict[int, str] = {}
            if claimed:
                dup = self._insert_keyed(c, Q["insert_claimed"], jobs[:claimed], [
                    (j.id, j.task, j.queue, j.args, j.max_attempts, j.timeout, j.run_at, j.created_at, worker,
                     now + lease, now, j.owner, j.priority, j.key, j.limit_key, j.takes, j.group)
                    for j in jobs[:claimed]])
            if claimed < len(jobs):
                dup.update({i + claimed: id for i, id in self._insert(c, jobs[claimed:]).items()})
        taken = [Claim(j.id, j.task, j.queue, j.args, 1, j.max_attempts, j.timeout, j.created_at, now)
                 for i, j in enumerate(jobs[:claimed]) if i not in dup]
        _point_at_live(jobs, dup)
        if claimed < len(jobs): self._committed()
        return accepted, taken

    def _handoff_cut(self, c: sqlite3.Connection, jobs: Sequence[NewJob], claimed: int, queues: Sequence[str],
                     tasks: str | None, ordered: bool, now: float) -> int:
        "How many of the first `claimed` jobs (in due order) may be handed off: see `enqueue_claimed`."
        queues = self._unpaused(queues)
        if not queues: return claimed
        first = c.execute(_per_queue("first_due", "due", len(queues)),
                          {"now": now, "limit": 1, "tasks": tasks, **{f"q{i}": q for i, q in enumerate(queues)}}
                          ).fetchone()
        if first is None: return claimed
        if ordered or not isinstance(first[0], (int, float)): return 0
        return next((i for i, j in enumerate(jobs[:claimed]) if j.rank >= first[0]), claimed)

    def _group_enqueue(self, jobs: Sequence[NewJob]) -> None:
        # Group commit: whoever holds the lock commits every batch that queued up behind it in one fsync.
        done = threading.Event()
        with self._pending_lock: self._pending.append((jobs, done))
        with self._lock:
            if done.is_set(): return
            with self._pending_lock: batch, self._pending = self._pending, []
            try:
                with self._tx("enqueue") as c:
                    dups = [self._insert(c, js) for js, _ in batch]
            except BaseException:
                with self._pending_lock: self._pending = [b for b in batch if b[1] is not done] + self._pending
                raise
            for (js, ev), dup in zip(batch, dups, strict=True):
                _point_at_live(js, dup)
                ev.set()
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
                         lease: float, *, tasks: str | None = None, alone: bool = True,
                         ordered: bool = False, limits: Limits | None = None) -> tuple[int, list[Claim]]:
        """Record outcomes and claim the next batch in one transaction: one commit per worker round trip.
        `tasks` (a JSON list of names; None: any) limits the claim to the tasks the worker can run. A due suspect job
        is claimed on its own by a worker with nothing else running (`alone`, the default); a busy worker
        (`alone=False`) claims nothing then, so that it drains and can take it. Jobs are claimed in due order across
        `queues` (run_at - priority * 60, then seq), or, `ordered`, queue after queue in the order given. Jobs with a
        limit_key are claimed only under `limits` (the worker's limited tasks: see `_claim_limited`)."""
        outcomes, now = list(outcomes), self.clock()
        if queues: queues = self._unpaused(queues)  # paused queues (the dashboard) are skipped; cached for a second
        if not outcomes and not self._any_due(queues, tasks, now, limits): return 0, []  # no lock taken for nothing
        with self._tx("record results and claim jobs") as c:
            accepted = self._record(c, outcomes, now)
            rows = self._claim_rows(c, worker, queues, limit, lease, now, tasks, alone, ordered, limits) \
                if limit > 0 and queues else []
            if rows and _taking(rows): rows = self._with_inputs(c, rows, now)
        # RETURNING gives rows in no set order: hand them out in the order they were due (whatever a row holds).
        if ordered:
            pos = {q: i for i, q in enumerate(queues)}
            rows.sort(key=lambda r: (pos.get(r[2], len(pos)), *_due_order(r)))
        else: rows.sort(key=_due_order)
        claims = [Claim(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], now, suspect=bool(r[10])) for r in rows]
        return accepted, claims

    def _any_due(self, queues: Sequence[str], tasks: str | None, now: float, limits: Limits | None = None) -> bool:
        """A job of these queues (and tasks) is due: a read, which never waits for the write lock. Workers of several
        processes woken by one commit would otherwise each take the lock in turn, and all but one claim nothing."""
        if not queues: return False
        if self._read(_per_queue("any_due", "due", len(queues)),
                      {"now": now, "limit": 1, "tasks": tasks, **{f"q{i}": q for i, q in enumerate(queues)}}):
            return True
        return bool(limits) and self._limited_due(queues, limits or {}, now)  # jobs with a limit_key: `due` skips them

    def _claim(self, c: sqlite3.Connection, worker: str, queues: Sequence[str], limit: int, lease: float, now: float,
               tasks: str | None, alone: bool, ordered: bool = False,
               limits: Limits | None = None) -> list[sqlite3.Row]:
        p: dict[str, Any] = {"worker": worker, "lease_until": now + lease, "now": now, "limit": limit, "tasks": tasks,
                             "ordered": int(ordered)}
        # A suspect job (lost with a worker that died) goes first, and alone: see `expire`.
        if (suspect := c.execute(Q["suspect"], {"now": now, "queues": json.dumps(list(queues)), "tasks": tasks})
                .fetchone()) is not None:
            return c.execute(Q["claim_seq"], {**p, "seq": suspect[0]}).fetchall() if alone else []
        # Jobs with a limit_key first, as many as their limits let in; `due` leaves them out.
        limited, alone_now = self._claim_limited(c, p, queues, limits, alone) if limits else ([], False)
        if alone_now or len(limited) >= limit: return limited
        return limited + c.execute(_per_queue("claim", "due", len(queues)),
                                   {**p, "limit": limit - len(limited),
                                    **{f"q{i}": q for i, q in enumerate(queues)}}).fetchall()

    def _claim_rows(self, c: sqlite3.Connection, *args: Any) -> list[sqlite3.Row]:
        """`_claim`, reading text with surrogate escapes. A claimed row holding text that is not UTF-8 (written behind
        the store's back) would otherwise fail the claim, and so every claim after it: this way the worker sees the
        row and fails it alone (`_bad_row`). No savepoint is needed, and each statement of the transaction is one more
        moment the thread may wait for the GIL while it holds the write lock."""
        c.text_factory = _escaped
        try: return self._claim(c, *args)
        finally: c.text_factory = str

    def _record(self, c: sqlite3.Connection, outcomes: list[Outcome], now: float) -> int:
        """Record outcomes (`_finish`). If that fails for a reason other than a busy or unavailable store (a value the
        driver refuses, a constraint), record them one by one, failing each that cannot be written with a minimal
        error: one outcome that cannot be stored never holds back the others, nor the commit carrying them."""
        if not outcomes: return 0
        c.execute("SAVEPOINT fh_outcomes")
        try: accepted = self._finish(c, outcomes, now)
        except Exception as e:
            self._roll_back_to("fh_outcomes", c, e)
            accepted = sum(self._record_one(c, o, now) for o in outcomes)
        c.execute("RELEASE fh_outcomes")
        return accepted

    def _record_one(self, c: sqlite3.Connection, o: Outcome, now: float) -> int:
        c.execute("SAVEPOINT fh_outcome")
        try: n = self._finish(c, [o], now)
        except Exception as e:
            self._roll_back_to("fh_outcome", c, e)
            task = o.extra.get("task", "?")
            msg = storable_text(f"{task}: the job's outcome ({o.kind}) could not be stored ({type(e).__name__}: {e}); "
                                "it is recorded as failed")
            log.warning("job %s (%s) failed: OutcomeError: %s", o.id, task, msg,
                        extra={"action": "fail", "job_id": o.id, "task": task, "error_type": "OutcomeError"})
            err = json.dumps({"type": "OutcomeError", "message": msg, "traceback": None})
            try: n = self._finish(c, [Outcome("fail", o.id, o.attempt, error=err, extra=o.extra)], now)
            except Exception as e2:  # not even that: the lease runs out and the job runs again
                self._roll_back_to("fh_outcome", c, e2)
                log.error("job %s (%s): could not record its failure either (%s: %s); it runs again once its lease "
                          "runs out", o.id, task, type(e2).__name__, e2, extra={"job_id": o.id, "task": task})
                n = 0
        c.execute("RELEASE fh_outcome")
        return n

    def _roll_back_to(self, savepoint: str, c: sqlite3.Connection, e: Exception) -> None:
        "Undo a failed write back to `savepoint`; re-raise `e` if the store is busy or unavailable, or the tx is gone."
        if not c.in_transaction: raise e
        if isinstance(e, sqlite3.Error) and isinstance(self._wrap(e, "record outcomes"), (QueueBusy, QueueUnavailable)):
            raise e
        c.execute(f"ROLLBACK TO {savepoint}")

    def _finish(self, c: sqlite3.Connection, outcomes: list[Outcome], now: float) -> int:
        # An attempt's last recorded progress is committed with its outcome, and before it (the write is fenced).
        if self._progress: self._write_progress(c, self._progress.peek([(o.id, o.attempt) for o in outcomes]))
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
            self._record_attempts(c, rt, "retrying", now)  # the dashboard's attempt history (failures only)
        if (rl := by_kind.get("release")):
            accepted += c.executemany(Q["release"], [{"id": o.id, "attempt": o.attempt} for o in rl]).rowcount
        for o in by_kind.get("fail", ()):
            if c.execute(Q["fail"], {"id": o.id, "attempt": o.attempt, "now": now, "error": o.error}).rowcount:
                accepted += 1
                self._cancel_chain(c, o.id, now)
                self._record_attempts(c, [o], "failed", now)
        return accepted

    def _record_attempts(self, c: sqlite3.Connection, outcomes: Sequence[Outcome], state: str, now: float) -> None:
        "Copy failed attempts just recorded (the job is now in `state` at that attempt) into fh_attempts."
        c.executemany(Q["record_attempt"], [{"id": o.id, "attempt": o.attempt, "state": state, "now": now}
                                            for o in outcomes])

    def _cancel_chain(self, c: sqlite3.Connection, id: str, now: float) -> None:
        todo = [id]
        while todo:
            parent = todo.pop()
            msg = f"an earlier job in its chain ({parent}) did not succeed"
            err = json.dumps({"type": "Cancelled", "message": msg})
            todo += [r[0] for r in c.execute(Q["cancel_children"], {"id": parent, "now": now, "error": err})]
            err = json.dumps({"type": "Cancelled", "message": f"a job of its group ({parent}) did not succeed"})
            todo += [r[0] for r in c.execute(Q["cancel_group_of"], {"id": parent, "now": now, "error": err})]

    def heartbeat(self, worker: str, lease: float, info: WorkerInfo | None = None) -> int:
        "Extend the leases of `worker`'s jobs and note it is alive (registered again from `info` if forgotten)."
        now = self.clock()
        with self._tx("renew leases") as c:
            n = c.execute(Q["heartbeat"], {"worker": worker, "lease_until": now + lease}).rowcount
            if not c.execute(Q["worker_seen"], {"id": worker, "now": now}).rowcount and info is not None:
                c.execute(Q["register_worker"], _worker_params(info, now))
            return int(n)

    def expire(self) -> list[tuple[str, str]]:
        """Take back the jobs of dead workers (a worker is dead once every lease it holds has expired): queued again,
        or failed (`WorkerLost`) once out of attempts. A job that was running alone in its worker's process is
        charged the attempt; jobs that ran beside others are not (they are excused), and all of them become suspect."""
        now = self.clock()
        out: list[tuple[str, str]] = []
        with self._tx("requeue expired jobs") as c:
            c.execute(Q["forget_workers"], {"now": now, "stale": WORKER_STALE_LEASES})
            if c.execute(Q["expired"], {"now": now}).fetchone() is None: return out
            running = c.execute(Q["running_jobs"], {"now": now}).fetchall()
            live = {r[1] for r in running if not r[3] and r[1] is not None}
            held = collections.Counter(r[2] for r in running)  # jobs running in each process
            for seq, worker, process, expired in running:
                if not expired or worker in live: continue
                alone, beside = held[process] == 1, held[process] - 1
                why = "alone: the attempt is charged" if alone else \
                    f"beside {beside} other job(s): the attempt is not charged, and the job runs alone from now on"
                err = json.dumps({"type": "WorkerLost", "message": f"the worker running this job stopped (its lease "
                                                                   f"expired) while it ran {why}"})
                p = {"seq": seq, "alone": int(alone), "now": now, "error": err, "crash_attempts": CRASH_ATTEMPTS}
                if (row := c.execute(Q["expire"], p).fetchone()) is None: continue
                c.execute(Q["record_lost_attempt"], {"seq": seq, "worker": worker, "now": now})  # attempt history
                out.append((row[0], row[1]))
                _log_lost(row[0], row[2], row[1], row[3], alone, beside)
            for id, state in out:
                if state == "failed": self._cancel_chain(c, id, now)
        if out: self._committed()
        return out

    # -- workers ---------------------------------------------------------------------------------
    def register_worker(self, info: WorkerInfo) -> None:
        "Record a worker as live (its `last_seen` is renewed by `heartbeat`)."
        with self._tx("register a worker") as c: c.execute(Q["register_worker"], _worker_params(info, self.clock()))

    def unregister_worker(self, id: str) -> None:
        "Forget a worker that stopped cleanly."
        with self._tx("unregister a worker") as c: c.execute(Q["unregister_worker"], {"id": id})

    def workers(self) -> list[WorkerInfo]:
        "Registered workers, live ones first (a worker silent for a few lease periods is not live)."
        return [WorkerInfo(r[0], r[1], r[2], tuple(_json_list(r[3])), tuple(_json_list(r[4])), r[5], r[6], r[7], r[8],
                          bool(r[9]))
                for r in self._read(Q["workers"], {"now": self.clock(), "stale": WORKER_STALE_LEASES})]

    def suspect_due(self, queues: Sequence[str], tasks: str | None = None) -> bool:
        "A suspect job of these queues (and tasks, a JSON list) is due: it waits for a worker with nothing running."
        queues = self._unpaused(queues)  # paused queues are skipped
        return bool(self._read(Q["suspect"], {"now": self.clock(), "queues": json.dumps(list(queues)), "tasks": tasks}))

    def running_workers(self) -> int:
        "How many workers hold running jobs."
        return int(self._read(Q["running_workers"])[0][0])

    def waiting_by_task(self) -> list[tuple[str, str, int, int]]:
        "(task, queue, due, scheduled) for every task and queue with jobs waiting for a worker."
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in self._read(Q["waiting_by_task"])]

    def set_progress(self, id: str, attempt: int, progress: str) -> bool:
        "Write a running job's progress now; False when the attempt no longer holds the job."
        with self._tx("record progress") as c:
            self._progress.drop((id, attempt))  # an older buffered value must not overwrite this one
            ok = c.execute(Q["progress"], {"id": id, "attempt": attempt, "progress": progress}).rowcount > 0
        if not ok: self._progress.stale([(id, attempt)])
        return ok

    def record_progress(self, id: str, attempt: int, progress: str) -> bool:
        """Keep a running job's progress in memory, to be written by `flush_progress` or with the job's outcome
        (latest value wins). Returns at once; False when a write already found the attempt stale."""
        return self._progress.put((id, attempt), progress)

    def progress_pending(self) -> int:
        "How many attempts have progress waiting for `flush_progress`."
        return len(self._progress)

    def flush_progress(self) -> int:
        "Write every pending progress value in one transaction; returns how many were stored (not stale)."
        if not self._progress: return 0
        items: dict[tuple[str, int], str] = {}
        try:
            with self._tx("record progress") as c:
                items = self._progress.take()  # under the store lock: an outcome commit sees the value or its write
                stale = self._write_progress(c, items)
        except BaseException:
            self._progress.restore(items)
            raise
        self._progress.stale(stale)
        return len(items) - len(stale)

    def _write_progress(self, c: sqlite3.Connection, items: dict[tuple[str, int], str]) -> list[tuple[str, int]]:
        "Write progress values (fenced by attempt and state); returns the attempts that no longer hold their job."
        q = Q["progress"]
        return [k for k, text in items.items()
                if not c.execute(q, {"id": k[0], "attempt": k[1], "progress": text}).rowcount]

    def cancel(self, id: str) -> bool:
        now = self.clock()
        with self._tx("cancel a job") as c:
            ok = c.execute(Q["cancel"], {"id": id, "now": now}).rowcount > 0
            if ok: self._cancel_chain(c, id, now)
        return ok

    # -- cancelling running jobs (`tasks.cancel(id, running=True)`) ---------------------------------
    def cancel_running(self, id: str) -> bool:
        "Cancel a running job; its worker stops the attempt when it next checks (`cancelled_among`)."
        now = self.clock()
        error = json.dumps({"type": "JobCancelled", "message": "cancelled while running"})
        with self._tx("cancel a running job") as c:
            ok = c.execute(Q["cancel_running"], {"id": id, "now": now, "error": error}).rowcount > 0
            if ok: self._cancel_chain(c, id, now)
        return ok

    def cancelled_among(self, attempts: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        "Which of these running attempts were cancelled; remembered for `is_cancelled` (what `progress()` checks)."
        keys = set(attempts)
        if not keys: return set()
        rows = self._read(Q["cancelled_among"], {"ids": json.dumps(sorted({k[0] for k in keys}))})
        found = {k for r in rows if (k := (str(r[0]), int(r[1]))) in keys}
        if found:
            self._progress.stale(found)
            self._cancelled.update(dict.fromkeys(found))
            while len(self._cancelled) > 4096: del self._cancelled[next(iter(self._cancelled))]
        return found

    def is_cancelled(self, id: str, attempt: int) -> bool:
        "True once this process's worker found the attempt cancelled."
        return (id, attempt) in self._cancelled

    def requeue(self, id: str) -> bool:
        with self._tx("requeue a job") as c:
            ok = c.execute(Q["requeue"], {"id": id, "now": self.clock()}).rowcount > 0
        if ok: self._committed()
        return ok

    def prune(self, before: float, limit: int = 10_000) -> int:
        with self._tx("prune finished jobs") as c:
            return c.execute(Q["prune"], {"before": before, "limit": limit}).rowcount

    # -- reads -----------------------------------------------------------------------------------
    # Rows may come from other versions of fh-tasks: `JobRecord.from_row` reads any row, and text that is not
    # valid UTF-8 is decoded with replacement characters, so one odd row never fails a read of many.
    def _records(self, sql: str, params: Any = ()) -> list[JobRecord]:
        with self._lock:
            c = self._own_waits()
            try:
                try: rows = self._retrying(lambda: c.execute(sql, params).fetchall())
                except sqlite3.OperationalError as e:
                    if "decode" not in str(e): raise
                    c.text_factory = _lenient
                    try: rows = self._retrying(lambda: c.execute(sql, params).fetchall())
                    finally: c.text_factory = str
            except sqlite3.Error as e: raise self._wrap(e, "read") from e
        return [JobRecord.from_row(dict(r)) for r in rows]

    def get(self, id: str) -> JobRecord | None:
        "The whole stored job (arguments and result included), or None."
        return next(iter(self._records(Q["get"], {"id": id})), None)

    def summary(self, id: str) -> JobRecord | None:
        """The job without what a status page does not show, cheap to read whatever the task stored: its `args`
        and `result` read as empty/None, its error as its type and message, long texts cut (see `summary` query)."""
        return next(iter(self._records(Q["summary"], {"id": id})), None)

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        "Jobs, newest first; state `unknown` selects the rows whose state this version does not know."
        where, params = [], []
        if state == JobState.unknown: where.append(f"state NOT IN ({_KNOWN})")
        elif state: where.append("state = ?"); params.append(str(state))
        if task: where.append("task = ?"); params.append(task)
        cond = "WHERE " + " AND ".join(where) if where else ""
        sql = f"SELECT * FROM fh_jobs {cond} ORDER BY seq DESC LIMIT ? OFFSET ?"
        return self._records(sql, [*params, max(0, limit), max(0, offset)])

    def counts(self) -> dict[str, int]:
        "Jobs per state; states this version does not know are counted as `unknown`."
        out: dict[str, int] = {}
        for state, n in self._read(Q["counts"]):
            key = state if state in _STATES else JobState.unknown.value
            out[key] = out.get(key, 0) + (n if isinstance(n, int) else 0)
        return out

    def next_due(self, queues: Sequence[str], tasks: str | None = None) -> float | None:
        """When the next waiting job of these queues (and tasks, a JSON list) is due (None: nothing waits). While a job
        is due, a time at or before now (the run_at of the job the claim takes first)."""
        queues = self._unpaused(queues)  # paused queues are skipped
        if not queues: return None
        row = self._read(_per_queue("next_due", "next_due_one", len(queues)),
                         {"tasks": tasks, "now": self.clock(), "limit": 1,
                          **{f"q{i}": q for i, q in enumerate(queues)}})
        try: return None if not row or row[0][0] is None else float(row[0][0])
        except (TypeError, ValueError): return None  # only rows whose run_at is not a time: none is ever due

    def finished_since(self, since: float) -> int:
        return int(self._read(Q["finished_since"], {"since": since})[0][0])

    def integrity(self) -> str:
        return str(self._read("PRAGMA quick_check")[0][0])

    # -- periodic tasks (fh_tasks/cron.py): one row per task in fh_cron, advanced by compare-and-set --------------
    def cron_rows(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        "The stored state of periodic tasks (all, or those named): name, expr, tz, next_slot, last_slot, fired_at."
        p = {"names": None if names is None else json.dumps(list(names))}
        return [dict(r) for r in self._read(Q["cron_rows"], p)]

    def cron_advance(self, plans: Sequence[dict[str, Any]],
                     build: Callable[[str, float], NewJob | None]) -> list[NewJob]:
        """Apply the schedulers' plans (`CronScheduler.plan`) in one transaction: for each, move the task's next slot
        from what the scheduler read (`seen`; None: no row yet) to `next`, and if that compare-and-set wins and the
        plan fires a `slot`, store the job `build(name, slot)` makes, in the same transaction. A scheduler that read
        a row another one has advanced since changes nothing, so two can never both fire a slot; the job's id is
        derived from (task, slot) and checked too. Returns the jobs stored."""
        now, fired = self.clock(), []
        with self._tx("fire periodic tasks") as c:
            for p in plans:
                new = {"name": p["name"], "expr": p["expr"], "tz": p["tz"], "next": p["next"], "now": now}
                if (seen := p["seen"]) is None: won = c.execute(Q["cron_create"], new).fetchone()
                else: won = c.execute(Q["cron_move"], {**new, "seen_expr": seen["expr"], "seen_tz": seen["tz"],
                                                       "seen_next": seen["next"]}).fetchone()
                if won is None or p["slot"] is None or (job := build(p["name"], p["slot"])) is None: continue
                if c.execute(Q["cron_job_exists"], {"id": job.id}).fetchone(): continue
                self._insert(c, [job])
                c.execute(Q["cron_fired"], {"name": p["name"], "slot": p["slot"], "now": now})
                fired.append(job)
        if fired: self._committed()
        return fired

    # -- job events (see store/feed.py) ------------------------------------------------------------
    def listen_events(self, listener: str, ttl: float) -> int:
        "Register (or renew) an event listener for `ttl` seconds; returns the last event's seq."
        with self._tx("register an event listener") as c:
            c.execute(Q["listen_events"], {"id": listener, "until": self.clock() + ttl})
            return int(c.execute(Q["last_event"]).fetchone()[0])

    def unlisten_events(self, listener: str) -> None:
        with self._tx("unregister an event listener") as c: c.execute(Q["unlisten_events"], {"id": listener})

    def feed(self) -> SQLiteFeed:
        "An event feed over this store (the engine's `EventBus` starts it while somebody listens)."
        return SQLiteFeed(self)

    def prune_events(self, keep: int = 100_000, max_age: float = 3600.0) -> int:
        "Forget events beyond the newest `keep` and older than `max_age` seconds, and listeners that died."
        now = self.clock()
        with self._tx("prune job events") as c:
            c.execute(Q["expire_listeners"], {"now": now})
            c.execute(Q["prune_limits"], {"before": now - 60.0})  # rate windows long open (fh_tasks/limits.py)
            return c.execute(Q["prune_events"], {"keep": keep, "before": now - max_age}).rowcount


def _state(j: NewJob) -> str:
    "The state a new job is stored in: a group's callback (`takes='group'`) waits for its members, like a chained job."
    return "waiting" if j.takes == "group" else j.state


def _is_busy(e: sqlite3.OperationalError) -> bool:
    msg = str(e)
    return "locked" in msg or "busy" in msg


def _escaped(b: bytes) -> str:
    "Text that is not UTF-8 as a str with lone surrogates (which the worker refuses as a bad row)."
    return b.decode("utf-8", "surrogateescape")


def _due_order(r: Any) -> tuple[float, float]:
    "A claimed row's (rank, seq) as `NewJob.rank` has it, whatever the row holds: sorting claims never raises."
    prio = r[11] if isinstance(r[11], (int, float)) else 0
    return _num(r[8]) - prio * PRIORITY_STEP, _num(r[9])


def _point_at_live(jobs: Sequence[NewJob], dup: dict[int, str]) -> None:
    "After the commit: the jobs not stored because a live job holds their key take that job's id."
    for i, id in dup.items(): jobs[i].id = id


@functools.lru_cache(maxsize=64)
def _per_queue(outer: str, inner: str, n: int) -> str:
    "Expand `{due}` in query `outer` into a UNION ALL of query `inner`, once per queue (:q0, :q1, ...)."
    return Q[outer].replace("{due}", " UNION ALL ".join(Q[inner].replace("{due_one}", Q["due"]).replace("{i}", str(i))
                                                         for i in range(n)))


def _log_lost(id: str, task: Any, state: str, charged: Any, alone: bool, beside: int) -> None:
    "Every job taken back from a dead worker is logged: failed, charged the attempt, or excused."
    extra = {"action": "fail" if state == "failed" else "lost", "job_id": id, "task": task}
    if state == "failed":
        log.warning("job %s (%s) failed (WorkerLost): its worker died under it; %s attempt(s) charged", id, task,
                    charged, extra=extra)
    elif alone:
        log.warning("job %s (%s): its worker died while running it alone; queued again, attempt charged (%s so far)",
                    id, task, charged, extra=extra)
    else:
        log.warning("job %s (%s): its worker died while running it beside %d other job(s); queued again, attempt not "
                    "charged; it will run alone", id, task, beside, extra=extra)


def _worker_params(w: WorkerInfo, now: float) -> dict[str, Any]:
    return {"id": w.id, "host": w.host, "pid": w.pid, "queues": json.dumps(list(w.queues)),
            "tasks": json.dumps(list(w.tasks)), "concurrency": w.concurrency, "lease": w.lease, "now": now}


def _json_list(text: Any) -> list[str]:
    try: v = json.loads(text)
    except (TypeError, ValueError): return []
    return [str(x) for x in v] if isinstance(v, list) else []
