"""What the workers' upkeep reads and writes in the store: the worker rows (`fh_workers`), progress (buffered, written
in batches or with the job's outcome), and running jobs cancelled from elsewhere. A mixin of `SQLiteStore`.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ..progress import ProgressBuffer
from ..records import WorkerInfo
from .queries import Q

__all__ = ["WORKER_STALE_LEASES", "WorkerRows"]

#: A registered worker not seen for this many of its lease periods is dead (not live; its row is then dropped).
WORKER_STALE_LEASES = 3


class WorkerRows:
    "Worker rows, progress and cancelled running jobs; mixed into `SQLiteStore`."

    if TYPE_CHECKING:  # what the mixin uses of `SQLiteStore`
        clock: Callable[[], float]
        _progress: ProgressBuffer
        _cancelled: dict[tuple[str, int], None]
        def _tx(self, doing: str) -> AbstractContextManager[sqlite3.Connection]: ...
        def _read(self, sql: str, params: Any = ()) -> list[sqlite3.Row]: ...
        def _unpaused(self, queues: Sequence[str]) -> Sequence[str]: ...
        def _cancel_chain(self, c: sqlite3.Connection, id: str, now: float) -> None: ...

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



def _worker_params(w: WorkerInfo, now: float) -> dict[str, Any]:
    return {"id": w.id, "host": w.host, "pid": w.pid, "queues": json.dumps(list(w.queues)),
            "tasks": json.dumps(list(w.tasks)), "concurrency": w.concurrency, "lease": w.lease, "now": now}


def _json_list(text: Any) -> list[str]:
    try: v = json.loads(text)
    except (TypeError, ValueError): return []
    return [str(x) for x in v] if isinstance(v, list) else []
