"""What the jobs dashboard reads and steers in the store (`fh_tasks/ui/dashboard.py`): a mixin of `SQLiteStore`.

Paused queues, figures per task, state and queue, runs per minute, run times, keyset pages of the job list and the
admin actions. Every read is bounded by an index (tests check the plans); the job path pays nothing for them.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from ..records import JobRecord, JobState
from .queries import _KNOWN, _STATES, Q, _lenient

__all__ = ["DashboardQueries", "PAUSED_TTL", "RUN_TIMES_LAST"]

#: Seconds a process keeps the set of paused queues before reading it again.
PAUSED_TTL = 1.0
#: The run-time histogram reads at most this many of the latest finished jobs (each costs a row read).
RUN_TIMES_LAST = 10_000
#: What the job list reads of a job: no arguments or result, texts cut.
_PAGE_COLUMNS = ("seq AS _seq, id, task, queue, state, attempts, max_attempts, run_at, created_at, started_at, "
                 "finished_at, worker, parent, NULL AS args, NULL AS result, substr(progress, 1, 1000) AS progress, "
                 "CASE WHEN error IS NULL THEN NULL WHEN NOT json_valid(error) THEN substr(error, 1, 1000) "
                 "WHEN json_type(error) = 'object' THEN json_object('type', substr(json_extract(error, '$.type'), 1, "
                 "200), 'message', substr(json_extract(error, '$.message'), 1, 1000)) ELSE substr(error, 1, 1000) END "
                 "AS error")


class DashboardQueries:
    "The dashboard's reads and actions; mixed into `SQLiteStore`."

    if TYPE_CHECKING:  # what the mixin uses of `SQLiteStore`
        clock: Callable[[], float]
        _lock: threading.RLock
        def _read(self, sql: str, params: Any = ()) -> list[sqlite3.Row]: ...
        def _tx(self, doing: str) -> AbstractContextManager[sqlite3.Connection]: ...
        def _committed(self) -> None: ...
        def _wrap(self, e: sqlite3.Error, doing: str) -> StoreError: ...
        def _connect(self) -> sqlite3.Connection: ...

    def paused_queues(self, fresh: bool = False) -> frozenset[str]:
        """The paused queues (workers claim nothing from them). Read at most once a second per process (`fresh`: now),
        so the claim pays nothing for it; a pause made in another process is honoured within a second."""
        t = time.monotonic()
        cached = getattr(self, "_paused", None)
        if cached is None or fresh or t - cached[0] >= PAUSED_TTL:
            cached = self._paused = (t, frozenset(str(r[0]) for r in self._read(Q["paused"])))
        return cached[1]

    def _unpaused(self, queues: Sequence[str]) -> Sequence[str]:
        "`queues` without the paused ones (the claim, `next_due` and `suspect_due` skip paused queues)."
        paused = self.paused_queues()
        return [q for q in queues if q not in paused] if paused else queues

    def pause(self, queue: str) -> None:
        with self._tx("pause a queue") as c: c.execute(Q["pause"], {"queue": queue, "now": self.clock()})
        self.paused_queues(fresh=True)

    def resume(self, queue: str) -> None:
        with self._tx("resume a queue") as c: c.execute(Q["resume"], {"queue": queue})
        self.paused_queues(fresh=True)
        self._committed()  # its due jobs can run now

    def counts_by(self) -> list[tuple[str, str, int]]:
        """(task, state, jobs) for every task and state that has jobs; unknown states as `unknown`. Read through
        indexes only: totals per task and per state, the tasks of every state but `succeeded` (the bulk, which is
        what remains), so it costs a pass over two indexes, not over the table."""
        totals = {str(t): int(n) for t, n in self._read(Q["dash_task_totals"])}
        out: dict[tuple[str, str], int] = {}
        for state, _ in self._read(Q["dash_state_totals"]):
            if state == "succeeded": continue
            key = state if state in _STATES else JobState.unknown.value
            for t, n in self._read(Q["dash_state_tasks"], {"state": state}):
                out[(str(t), key)] = out.get((str(t), key), 0) + int(n)
        for t, n in totals.items():
            rest = n - sum(v for (task, _), v in out.items() if task == t)
            if rest > 0: out[(t, "succeeded")] = rest
        return [(t, s, n) for (t, s), n in sorted(out.items())]

    def queue_depths(self) -> list[tuple[str, int, float | None]]:
        "(queue, due jobs, since when the oldest has been due) for every queue with due jobs."
        return [(str(q), int(n), float(t) if isinstance(t, (int, float)) else None)
                for q, n, t in self._read(Q["dash_queues"], {"now": self.clock()})]

    def per_minute(self, since: float) -> tuple[dict[int, int], dict[int, int]]:
        "Succeeded jobs and failed attempts per minute since `since` (minute 0 starts at `since`)."
        ok = {int(m): int(n) for m, n in self._read(Q["dash_succeeded_per_minute"], {"since": since})}
        bad = {int(m): int(n) for m, n in self._read(Q["dash_failed_per_minute"], {"since": since})}
        return ok, bad

    def running_by_worker(self) -> dict[str, int]:
        return {str(w): int(n) for w, n in self._read(Q["dash_running"]) if w is not None}

    def run_times(self, since: float, buckets: Sequence[float]) -> tuple[list[int], int, float]:
        """Run times (finished_at - started_at of the last attempt) of the jobs finished since `since` (the latest
        RUN_TIMES_LAST of them): how many took at most each of `buckets` seconds (cumulative), how many, their sum."""
        le = ", ".join(f"coalesce(sum(d <= {float(b)!r}), 0)" for b in buckets)
        row = self._read(f"SELECT {le}{',' if le else ''} count(d), coalesce(sum(d), 0.0) FROM (SELECT finished_at - "
                         "started_at AS d FROM fh_jobs WHERE state IN ('succeeded', 'failed') AND finished_at >= "
                         ":since AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT :last)",
                         {"since": since, "last": RUN_TIMES_LAST})[0]
        return [int(v) for v in row[:len(buckets)]], int(row[-2]), float(row[-1])

    def run_totals(self) -> tuple[dict[str, int], dict[str, int]]:
        "Succeeded runs of jobs gone (pruned or deleted) and failed attempts in all, per task (for the run counters)."
        gone = {str(t): int(n) for t, n in self._read(Q["dash_gone_succeeded"])}
        return gone, {str(t): int(n) for t, n in self._read(Q["dash_failed_attempts"])}

    def attempts(self, id: str) -> list[dict[str, Any]]:
        "The failed attempts of a job, oldest first: attempt, state, worker, started_at, ended_at, error (a dict)."
        from ..records import _error
        return [{"attempt": r[0], "state": r[1], "worker": r[2], "started_at": r[3], "ended_at": r[4],
                 "error": _error(r[5])} for r in self._read(Q["dash_attempts"], {"id": id})]

    def delete(self, id: str) -> bool:
        "Delete a finished job; False when it is not finished (or not there)."
        with self._tx("delete a job") as c: return c.execute(Q["dash_delete"], {"id": id}).rowcount > 0

    def requeue_failed(self, task: str) -> int:
        "Queue every failed job of `task` again, with fresh attempts; returns how many."
        with self._tx("requeue failed jobs") as c:
            n = int(c.execute(Q["dash_requeue_failed"], {"task": task, "now": self.clock()}).rowcount)
        if n: self._committed()
        return n

    def page(self, *, state: str | None = None, task: str | None = None, queue: str | None = None,
             since: float | None = None, before: int | None = None, limit: int = 50) -> list[JobRecord]:
        """One page of the job list, newest first, without arguments or result (texts cut): the jobs older than the
        `before` seq (keyset paging, so page 1,000 costs what page 1 does), filtered by state, task, queue and
        creation time. `JobRecord.raw["seq"]` is the key of the next page."""
        sql, params = self.page_sql(state=state, task=task, queue=queue, since=since, before=before, limit=limit)
        if sql is None: return []
        with self._lock:
            c = self._connect()
            try:
                c.text_factory = _lenient  # one row of bad text must not fail the page
                try: rows = [dict(r) for r in c.execute(sql, params)]
                finally: c.text_factory = str
            except sqlite3.Error as e: raise self._wrap(e, "read") from e
        out = []
        for row in rows:
            rec = JobRecord.from_row(row)
            rec.raw["seq"] = row["_seq"]
            out.append(rec)
        return out

    def page_sql(self, *, state: str | None = None, task: str | None = None, queue: str | None = None,
                 since: float | None = None, before: int | None = None,
                 limit: int = 50) -> tuple[str | None, dict[str, Any]]:
        """The query `page` runs and its parameters (None: nothing can match). The plan is chosen here, not left to
        the planner: by task, the fh_jobs_task index in seq order; by a state few jobs are in (under a tenth),
        the fh_jobs_state index, then the page sorted; else the table itself backwards from `before`, where
        matching rows are dense. A time filter becomes a seq bound (seq grows with time)."""
        where = ["seq < :before"]
        p: dict[str, Any] = {"before": before if before is not None else 2 ** 62, "limit": max(1, limit)}
        if since is not None:
            if (lo := self._first_seq_since(since)) is None: return None, {}
            where += ["seq >= :lo", "created_at >= :since"]
            p.update(lo=lo, since=since)
        if queue is not None: where.append("queue = :queue"); p["queue"] = queue
        if state == JobState.unknown.value: where.append(f"state NOT IN ({_KNOWN})")
        elif state is not None: where.append("state = :state"); p["state"] = state
        if task is not None: where.append("task = :task"); p["task"] = task
        cond = " AND ".join(where)
        if task is not None: index = "INDEXED BY fh_jobs_task"
        elif state is not None and state != JobState.unknown.value and self._sparse(state): index = "INDEXED BY " \
                                                                                                    "fh_jobs_state"
        else: index = "NOT INDEXED"
        inner = f"SELECT seq FROM fh_jobs {index} WHERE {cond} ORDER BY seq DESC LIMIT :limit"
        return f"SELECT {_PAGE_COLUMNS} FROM fh_jobs WHERE seq IN ({inner}) ORDER BY seq DESC", p

    def _sparse(self, state: str) -> bool:
        "Are fewer than a tenth of the jobs in `state`? (counts through the state index, stopping at a tenth)"
        lo, hi = self._read(Q["dash_seq_range"])[0]
        if lo is None: return True
        cap = max(1000, (int(hi) - int(lo) + 1) // 10)
        n = self._read("SELECT count(*) FROM (SELECT 1 FROM fh_jobs INDEXED BY fh_jobs_state WHERE state = :state "
                       "LIMIT :cap)", {"state": state, "cap": cap})[0][0]
        return int(n) < cap

    def _first_seq_since(self, since: float, slack: float = 60.0) -> int | None:
        """A seq at or below that of the first job created at `since` (bisecting the PK; `slack` seconds early, since
        jobs are stored slightly out of creation order). None when no job is that recent."""
        lo, hi = self._read(Q["dash_seq_range"])[0]
        if lo is None: return None
        lo, hi, t = int(lo), int(hi) + 1, since - slack
        while lo < hi:
            mid = (lo + hi) // 2
            row = self._read(Q["dash_first_since"], {"seq": mid})
            if not row: hi = mid; continue
            seq, created = int(row[0][0]), row[0][1]
            if isinstance(created, (int, float)) and created < t: lo = seq + 1
            else: hi = mid
        return lo
