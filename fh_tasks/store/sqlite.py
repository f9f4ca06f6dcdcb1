"""SQLiteStore: the embedded job store, one SQLite file in WAL mode shared by any number of processes."""
from __future__ import annotations

import collections
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from ..encoding import storable_text
from ..errors import QueueBusy, QueueUnavailable
from ..progress import ProgressBuffer
from ..records import PRIORITY_STEP, JobRecord, JobState
from . import Claim, NewJob, Outcome, WorkerInfo
from .connection import BUSY_TIMEOUT, Connection, decoding
from .dashboard import DashboardQueries
from .doorbell import Doorbell
from .feed import SQLiteFeed
from .inputs import WorkflowInputs, _taking
from .limited import LimitedClaims, Limits
from .migrations import SCHEMA_VERSION
from .queries import _KNOWN, _STATES, Q, _num
from .workers import WORKER_STALE_LEASES, WorkerRows, _worker_params

__all__ = ["SQLiteStore", "SCHEMA_VERSION"]

log = logging.getLogger("fh_tasks.store")

#: Attempts a job gets in all when its workers keep dying under it (or its retries + 1, if more).
CRASH_ATTEMPTS = 3


class SQLiteStore(Connection, WorkerRows, WorkflowInputs, LimitedClaims, DashboardQueries):
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

    # -- writes ----------------------------------------------------------------------------------
    def enqueue(self, jobs: Sequence[NewJob]) -> None:
        """Store `jobs` in one transaction. A job whose uniqueness key (`NewJob.key`) a live job holds (one stored
        before, or an earlier one of `jobs`) is not stored: its `id` becomes the live job's once committed."""
        if not jobs: return
        if self.durability == "full": return self._group_enqueue(jobs)
        if len(jobs) == 1 and jobs[0].key is None and not jobs[0].parent: return self._insert_one(jobs[0])
        with self._tx("enqueue") as c:
            dup = self._insert(c, jobs)
        _point_at_live(jobs, dup)
        self._committed()

    def _insert_one(self, j: NewJob) -> None:
        """`defer()` outside a request: one job without a uniqueness key or a chain to settle, so one statement,
        run on its own (SQLite makes it a transaction, triggers included) rather than between BEGIN and COMMIT.
        A busy store answers before anything is written, so the statement is simply tried again."""
        with self._lock:
            try: self._retrying(self._own_waits().execute, Q["insert"], _row(j))
            except sqlite3.Error as e: raise self._wrap(e, "enqueue") from e
        self._committed()

    def _insert(self, c: sqlite3.Connection, jobs: Sequence[NewJob]) -> dict[int, str]:
        """Insert `jobs`; returns {index in `jobs`: the live job's id} for those not stored because a live job holds
        their key (fh_jobs_ukey; the insert does nothing on that conflict, so concurrent defers never fail). The
        caller points them at the live job once the transaction commits (`_point_at_live`)."""
        rows = [_row(j) for j in jobs]
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
        claim = (worker, queues, limit, lease, now, tasks, alone, ordered, limits) if limit > 0 and queues else None
        try: accepted, rows = self._round(outcomes, now, claim, careful=False)
        except _Careful: accepted, rows = self._round(outcomes, now, claim, careful=True)
        # RETURNING gives rows in no set order: hand them out in the order they were due (whatever a row holds).
        if ordered:
            pos = {q: i for i, q in enumerate(queues)}
            rows.sort(key=lambda r: (pos.get(r[2], len(pos)), *_due_order(r)))
        else:
            try: rows.sort(key=lambda r: (r[8] - r[11] * PRIORITY_STEP, r[9]))  # numbers, as the store writes them
            except TypeError: rows.sort(key=_due_order)  # a row written behind the store's back
        claims = [Claim(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], now, suspect=bool(r[10])) for r in rows]
        return accepted, claims

    def _round(self, outcomes: list[Outcome], now: float, claim: tuple[Any, ...] | None,
               careful: bool) -> tuple[int, list[sqlite3.Row]]:
        """One transaction of `finish_and_claim`. The plain round writes the outcomes and claims with no savepoint.
        Should an outcome fail to be written for a reason other than a busy or unavailable store, or a claimed row
        hold text that is not UTF-8 (rows written behind the store's back), it raises `_Careful`: the transaction is
        undone and the round made again, `careful`, with savepoints: one outcome that cannot be stored never holds
        back the others (`_record`), and the claim reads such text escaped (`_claim_rows`)."""
        with self._tx("record results and claim jobs") as c:
            look = None  # (a job waits, a job is suspect), when the outcomes' writing looked (see `look`)
            if careful: accepted = self._record(c, outcomes, now)
            elif not outcomes: accepted = 0
            else:
                try: accepted, look = self._finish(c, outcomes, now)
                except Exception as e:
                    self._check_recoverable(c, e)
                    raise _Careful from e
            if claim is None: rows = []
            elif careful: rows = self._claim_rows(c, *claim)
            else:
                try: rows = self._claim(c, *claim, look=look)
                except sqlite3.OperationalError as e:
                    if "decode" not in str(e): raise
                    raise _Careful from e
            if rows and _taking(rows): rows = self._with_inputs(c, rows, now)
        return accepted, rows

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
               limits: Limits | None = None, *, look: tuple[int, int] | None = None) -> list[sqlite3.Row]:
        p: dict[str, Any] = {"worker": worker, "lease_until": now + lease, "now": now, "limit": limit, "tasks": tasks,
                             "ordered": int(ordered)}
        # A suspect job (lost with a worker that died) goes first, and alone: see `expire`. `look`: taken this round.
        if look is None: look = c.execute(Q["look"]).fetchone()
        if look[1] and (suspect := c.execute(Q["suspect"], {"now": now, "queues": json.dumps(list(queues)),
                                                            "tasks": tasks}).fetchone()) is not None:
            return c.execute(Q["claim_seq"], {**p, "seq": suspect[0]}).fetchall() if alone else []
        # Jobs with a limit_key first, as many as their limits let in; `due` leaves them out.
        limited, alone_now = self._claim_limited(c, p, queues, limits, alone) if limits else ([], False)
        if alone_now or len(limited) >= limit: return limited
        return limited + c.execute(_per_queue("claim", "due", len(queues)),
                                   {**p, "limit": limit - len(limited),
                                    **{f"q{i}": q for i, q in enumerate(queues)}}).fetchall()

    def _claim_rows(self, c: sqlite3.Connection, *args: Any) -> list[sqlite3.Row]:
        """`_claim`. A claimed row holding text that is not UTF-8 (written behind the store's back) would fail the
        claim, and so every claim after it: then the claim is undone and made again reading text with surrogate
        escapes, so that the worker sees the row and fails it alone (`_bad_row`). Text is read as `str` first: a
        decoder called from Python for every text value of every row would cost each claim more than the savepoint."""
        c.execute("SAVEPOINT fh_claim")
        rows = decoding(c, _escaped, lambda: self._claim(c, *args), undo=lambda: c.execute("ROLLBACK TO fh_claim"))
        c.execute("RELEASE fh_claim")
        return rows

    def _record(self, c: sqlite3.Connection, outcomes: list[Outcome], now: float) -> int:
        """Record outcomes (`_finish`). If that fails for a reason other than a busy or unavailable store (a value the
        driver refuses, a constraint), record them one by one, failing each that cannot be written with a minimal
        error: one outcome that cannot be stored never holds back the others, nor the commit carrying them."""
        if not outcomes: return 0
        c.execute("SAVEPOINT fh_outcomes")
        try: accepted = self._finish(c, outcomes, now)[0]
        except Exception as e:
            self._roll_back_to("fh_outcomes", c, e)
            accepted = sum(self._record_one(c, o, now) for o in outcomes)
        c.execute("RELEASE fh_outcomes")
        return accepted

    def _record_one(self, c: sqlite3.Connection, o: Outcome, now: float) -> int:
        c.execute("SAVEPOINT fh_outcome")
        try: n = self._finish(c, [o], now)[0]
        except Exception as e:
            self._roll_back_to("fh_outcome", c, e)
            task = o.extra.get("task", "?")
            msg = storable_text(f"{task}: the job's outcome ({o.kind}) could not be stored ({type(e).__name__}: {e}); "
                                "it is recorded as failed")
            log.warning("job %s (%s) failed: OutcomeError: %s", o.id, task, msg,
                        extra={"action": "fail", "job_id": o.id, "task": task, "error_type": "OutcomeError"})
            err = json.dumps({"type": "OutcomeError", "message": msg, "traceback": None})
            try: n = self._finish(c, [Outcome("fail", o.id, o.attempt, error=err, extra=o.extra)], now)[0]
            except Exception as e2:  # not even that: the lease runs out and the job runs again
                self._roll_back_to("fh_outcome", c, e2)
                log.error("job %s (%s): could not record its failure either (%s: %s); it runs again once its lease "
                          "runs out", o.id, task, type(e2).__name__, e2, extra={"job_id": o.id, "task": task})
                n = 0
        c.execute("RELEASE fh_outcome")
        return n

    def _roll_back_to(self, savepoint: str, c: sqlite3.Connection, e: Exception) -> None:
        "Undo a failed write back to `savepoint`; re-raise `e` if the store is busy or unavailable, or the tx is gone."
        self._check_recoverable(c, e)
        c.execute(f"ROLLBACK TO {savepoint}")

    def _check_recoverable(self, c: sqlite3.Connection, e: Exception) -> None:
        "Re-raise `e`, a failed write of outcomes, if the store is busy or unavailable, or the transaction is gone."
        if not c.in_transaction: raise e
        if isinstance(e, sqlite3.Error) and isinstance(self._wrap(e, "record outcomes"), (QueueBusy, QueueUnavailable)):
            raise e

    def _finish(self, c: sqlite3.Connection, outcomes: list[Outcome],
                now: float) -> tuple[int, tuple[int, int] | None]:
        """Write outcomes: (how many were accepted, the `look` taken after them when some succeeded, else None). The
        look comes after every outcome is written (a retried suspect job is suspect again), and serves the round's
        claim as well."""
        # An attempt's last recorded progress is committed with its outcome, and before it (the write is fenced).
        if self._progress: self._write_progress(c, self._progress.peek([(o.id, o.attempt) for o in outcomes]))
        by_kind: dict[str, list[Outcome]] = {}
        for o in outcomes: by_kind.setdefault(o.kind, []).append(o)
        accepted, look = 0, None
        if (ok := by_kind.get("succeed")):
            accepted += c.executemany(Q["succeed"], [{"id": o.id, "attempt": o.attempt, "now": now, "result": o.result}
                                                     for o in ok]).rowcount
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
        if ok:
            look = c.execute(Q["look"]).fetchone()
            if look[0]:  # a job waits: release the chains' next steps and the groups' callbacks these successes free
                ids = json.dumps([o.id for o in ok])
                c.execute(Q["release_children_of"], {"ids": ids, "now": now})
                c.execute(Q["release_groups_of"], {"ids": ids, "now": now})
        return accepted, look

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
        """Register (or renew) an event listener for `ttl` seconds; returns the last event's seq. Every change
        committed after this returns is in fh_events."""
        with self._tx("register an event listener") as c:
            c.execute(Q["listen_events"], {"id": listener, "until": self.clock() + ttl})
            _events_on_demand(c, drop=False)
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
            _events_on_demand(c, drop=True)
            c.execute(Q["prune_limits"], {"before": now - 60.0})  # rate windows long open (fh_tasks/limits.py)
            return c.execute(Q["prune_events"], {"keep": keep, "before": now - max_age}).rowcount


class _Careful(Exception):
    "A plain round of `finish_and_claim` met a row or an outcome that needs the careful round (`_round`)."


def _events_on_demand(c: sqlite3.Connection, drop: bool) -> None:
    """Create the job-event triggers if a listener is registered and they are missing; with `drop`, drop them if no
    listener is (migration 011): a store nobody watches pays nothing for events. Registrations only create them and
    the workers' periodic pruning (`prune_events`, once a minute) drops them, so listeners coming and going change
    the schema at most about twice a minute (every other connection then prepares its statements again), and a
    renewal never does."""
    have, wanted = c.execute(Q["events_triggers"]).fetchone()
    if wanted and have < 2:
        c.execute(Q["events_stored_trigger"])
        c.execute(Q["events_changed_trigger"])
    elif drop and not wanted and have:
        c.execute(Q["drop_events_stored_trigger"])
        c.execute(Q["drop_events_changed_trigger"])


def _row(j: NewJob) -> tuple[Any, ...]:
    "The parameters of query `insert` for `j`."
    return (j.id, j.task, j.queue, j.args, _state(j), j.max_attempts, j.timeout, j.run_at, j.created_at, j.parent,
            j.owner, j.priority, j.key, j.limit_key, j.takes, j.group)


def _state(j: NewJob) -> str:
    "The state a new job is stored in: a group's callback (`takes='group'`) waits for its members, like a chained job."
    return "waiting" if j.takes == "group" else j.state


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
