"""The claim's step for jobs of limited tasks (`fh_tasks/limits.py`): a mixin of `SQLiteStore`.

Jobs with a `limit_key` stay out of the plain claim (`due` leaves them out) and are claimed here, in the same write
transaction: running jobs per key are counted and rate windows (fh_limits, migration 008) read and moved on, so the
limits hold across every worker process of the store.
"""
from __future__ import annotations

import collections
import json
import math
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .queries import Q, _num

__all__ = ["LimitedClaims", "Limits"]

#: The limits a worker claims under: limited task name -> (concurrency, seconds between starts of a key).
Limits = Mapping[str, tuple[int | None, float | None]]


class LimitedClaims:
    "Claiming jobs of limited tasks; mixed into `SQLiteStore`."

    if TYPE_CHECKING:  # what the mixin uses of `SQLiteStore`
        clock: Callable[[], float]
        def _read(self, sql: str, params: Any = ()) -> list[sqlite3.Row]: ...
        def _unpaused(self, queues: Sequence[str]) -> Sequence[str]: ...

    # `limits` maps the names of the limited tasks a worker runs to (concurrency, interval): at most `concurrency`
    # running jobs per key, starts of one key at least `interval` seconds apart (None: no such limit).
    def _limit_state(self, rows: Callable[[str, dict[str, Any]], list[Any]], limits: Limits,
                     now: float) -> tuple[collections.Counter[str], set[str], dict[str, float]]:
        "(running jobs per key, keys at their concurrency, keys whose rate window is closed -> when it opens)."
        running: collections.Counter[str] = collections.Counter()
        tasks_of: dict[str, set[str]] = {}
        for key, task, n in rows(Q["limit_running"], {}):
            running[key] += int(n)
            tasks_of.setdefault(key, set()).add(task)
        full = {k for k, ts in tasks_of.items()
                if any((conc := limits.get(t, (None, None))[0]) is not None and running[k] >= conc for t in ts)}
        return running, full, {str(k): float(t) for k, t in rows(Q["limit_closed"], {"now": now})}

    def _limited_candidates(self, rows: Callable[[str, dict[str, Any]], list[Any]], base: dict[str, Any],
                            blocked: set[str], want: int) -> Iterator[Any]:
        """Waiting limited jobs due by `base["until"]`, (seq, key, task, lost, run_at), for a caller that takes what
        it can and stops: first the earliest in due order (a read of bounded size), then, when those were not
        enough (their keys full: a backlog), the due jobs of each key not in `blocked` (read as the caller goes on),
        one seek per key. The cost never grows with the backlog of full keys."""
        scan = 4 * want + 16
        found = rows(Q["limited_due"], {**base, "scan": scan})
        yield from found
        if len(found) < scan: return
        seen = {r[0] for r in found}
        keys = rows(Q["limit_keys"], {"blocked": json.dumps(sorted(blocked)), "keys": scan + len(blocked)})
        more = [r for (k,) in keys if k not in blocked for r in rows(Q["limited_key_due"], {**base, "key": k,
                                                                                            "scan": want})]
        yield from sorted((r for r in more if r[0] not in seen), key=lambda r: (_num(r[4]), r[0]))

    def _claim_limited(self, c: sqlite3.Connection, p: dict[str, Any], queues: Sequence[str], limits: Limits,
                       alone: bool) -> tuple[list[sqlite3.Row], bool]:
        """The claim's step for jobs with a limit_key, in its transaction: take, in due order, the due jobs whose key
        has room (running jobs of the key below its task's concurrency, its rate window open), at most one start per
        rate-limited key, and move those keys' windows on. Jobs of full keys are passed over, never holding back
        other keys or tasks. Returns the claimed rows, and whether they are a suspect job that runs alone (nothing
        else may be claimed beside it)."""
        now, want = p["now"], p["limit"]
        def rows(q: str, a: dict[str, Any]) -> list[Any]: return c.execute(q, a).fetchall()
        running, blocked, closed = self._limit_state(rows, limits, now)
        blocked |= closed.keys()
        base = {"until": now, "queues": json.dumps(list(queues)), "tasks": json.dumps(sorted(limits))}
        taken: collections.Counter[str] = collections.Counter()
        seqs: list[int] = []
        opened: dict[str, float] = {}
        for seq, key, task, lost, _ in self._limited_candidates(rows, base, blocked, want):
            if seq in seqs: continue
            conc, interval = limits.get(task, (None, None))
            if key in blocked or (conc is not None and running[key] + taken[key] >= conc):
                blocked.add(key)
                continue
            if lost:  # a suspect job (lost with a worker that died) runs alone: see `expire`
                if not alone or seqs: continue
                self._limits_started(c, {key: now + interval} if interval else {})
                return rows(Q["claim_seqs"], {**p, "seqs": json.dumps([seq])}), True
            seqs.append(seq)
            taken[key] += 1
            if interval:
                opened[key] = now + interval
                blocked.add(key)
            if len(seqs) >= want: break
        if not seqs: return [], False
        self._limits_started(c, opened)
        return rows(Q["claim_seqs"], {**p, "seqs": json.dumps(seqs)}), False

    def _limits_started(self, c: sqlite3.Connection, opened: dict[str, float]) -> None:
        if opened: c.executemany(Q["limit_start"], [{"key": k, "tat": t} for k, t in opened.items()])

    def _open_limited(self, limits: Limits, queues: Sequence[str], now: float, until: float) -> Any:
        """The first waiting limited job due by `until` whose key has room now (no suspect job: it waits for an idle
        worker), read without the write lock; and the keys that are full, and those whose window is closed."""
        running, full, closed = self._limit_state(self._read, limits, now)
        blocked = full | closed.keys()
        base = {"until": until, "queues": json.dumps(list(queues)), "tasks": json.dumps(sorted(limits))}
        first = next((r for r in self._limited_candidates(self._read, base, blocked, 1)
                      if r[1] not in blocked and not r[3]
                      and ((conc := limits.get(r[2], (None, None))[0]) is None or running[r[1]] < conc)), None)
        return first, full, closed

    def _limited_due(self, queues: Sequence[str], limits: Limits, now: float) -> bool:
        "A job with a limit_key could be claimed now (a read: the claim takes no lock for jobs that must wait)."
        return self._open_limited(limits, queues, now, now)[0] is not None

    def limited_next(self, queues: Sequence[str], limits: Limits | None, *, now_only: bool = False) -> float | None:
        """When a job with a limit_key may next be claimed: the first waiting job of a key with room falls due, or a
        key's rate window opens for a job waiting for it (None: no such time; a full key waits for a job to end).
        `now_only`: only windows that due jobs wait for, or a due job with room (a burst worker waits for them rather
        than stop)."""
        queues = self._unpaused(queues)
        if not limits or not queues: return None
        now = self.clock()
        first, full, closed = self._open_limited(limits, queues, now, now if now_only else math.inf)
        opens = self._read(Q["limit_opens"], {"now": now, "queues": json.dumps(list(queues)), "now_only": int(now_only),
                                              "tasks": json.dumps(sorted(limits)),
                                              "blocked": json.dumps(sorted(full))})[0][0]
        times = [float(t) for t in (opens, first[4] if first else None) if isinstance(t, (int, float))]
        return min(times) if times else None
