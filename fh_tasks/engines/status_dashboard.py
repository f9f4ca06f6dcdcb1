"""What the jobs dashboard reads and steers in the status store (`fh_tasks/ui/dashboard.py`, capabilities `stats` and
`admin`): a mixin of `StatusStore`, as `store/dashboard.py` is of `SQLiteStore`.

Pages of the job list, the overview's figures (counts per task and state, queue depths, successes and failed
attempts per minute, run times, workers), a job's failed attempts, worker heartbeats, and the admin actions:
delete, requeue the failed jobs of a task, pause and resume a queue (a job delivered while its queue is paused is
held). Their keys are listed in `status.py`'s docstring; their scripts are in `status.lua`. The job path pays
nothing for them but a cached read of the paused queues.
"""
from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..records import JobRecord
from .status_scripts import STATES, _record

if TYPE_CHECKING:
    from ..engine import Overview
    from ..records import WorkerInfo
    from .status import Due

__all__ = ["StatusDashboard", "HEARTBEAT_EVERY", "PAUSED_TTL", "WORKER_FORGET"]

#: Seconds the successes and failed attempts behind the per-minute figures and run times are kept.
STATS_KEEP = 86_400.0
#: The latest finished jobs whose run times make the histogram (as on SQLite).
RUN_TIMES_LAST = 10_000
#: Queued jobs a queue's oldest-job search looks at, at most.
OLDEST_PROBES = 2000
#: Running jobs read to count each worker's (at most).
RUNNING_READ = 10_000
#: Seconds between two heartbeats of a worker process: "silent" after 3 missed ones, forgotten after WORKER_FORGET.
HEARTBEAT_EVERY = 1.0
WORKER_FORGET = 300.0
#: Seconds a process reuses the set of paused queues it read (a pause holds everywhere within about this long).
PAUSED_TTL = 1.0
_SUMMARY = ("id", "task", "queue", "state", "attempts", "max_attempts", "created_at", "run_at", "started_at",
            "finished_at", "progress", "error", "parent", "worker", "owner")


class StatusDashboard:
    "The dashboard's reads and actions; mixed into `StatusStore`."

    if TYPE_CHECKING:  # what the mixin uses of `StatusStore`
        redis: Any
        clock: Callable[[], float]
        def key(self, *parts: str) -> str: ...
        def _call(self, script: str, *args: Any, doing: str) -> Any: ...
        def _read(self, fn: Callable[[], Any], doing: str) -> Any: ...
        def requeue(self, id: str) -> Due | None: ...

    # -- the jobs dashboard: capability `stats` ---------------------------------------------------------------------
    def page(self, *, state: str | None = None, task: str | None = None, queue: str | None = None,
             since: float | None = None, before: str | None = None,
             limit: int = 50) -> tuple[list[JobRecord], str | None]:
        """One page of jobs newest first (summaries), filtered, after the key `before` ("<created_at>_<id>", as the
        previous page returned it); returns the jobs and the next page's key (None: the last page). See the `page`
        script: one index is read from the key on, several are intersected within `PAGE_BUDGET` entries a page."""
        from .status import PAGE_BUDGET  # read at each call, where it is set (tests lower it there)
        if limit <= 0 or (state is not None and state not in STATES): return [], None
        keys = [f"state:{state}"] if state else []
        if task: keys.append(f"task:{task}")
        if queue: keys.append(f"queue:{queue}")
        score, _, cid = (before or "").partition("_")
        try: float(score)
        except ValueError: score = cid = ""  # a key this store did not make: the first page
        r = self._call("page", "" if since is None else f"{since:.6f}", score, cid, limit, PAGE_BUDGET,
                       *(keys or ["all"]), doing="list jobs")
        return self._summaries(r[2::2]), (f"{r[0]}_{r[1]}" if r[0] else None)

    def _summaries(self, ids: Sequence[str]) -> list[JobRecord]:
        if not ids: return []
        pipe = self.redis.pipeline(transaction=False)
        for i in ids: pipe.hmget(self.key("job", i), _SUMMARY)
        rows = self._read(pipe.execute, "list jobs")
        return [_record({k: v for k, v in zip(_SUMMARY, got, strict=True) if v is not None}) for got in rows if got[3]]

    def overview(self, window: float, tasks: Iterable[str] = (), queues: Iterable[str] = (),
                 buckets: Sequence[float] = ()) -> Overview:
        """The dashboard's figures (see `Engine.overview`). `tasks`, `queues`: names the caller knows (its hub's),
        added to those the workers announced. Counts per state and task and queue depths are exact; successes and
        failed attempts per minute come from `{ns}:ok` and `{ns}:failures` (kept `STATS_KEEP` seconds)."""
        from ..engine import Overview
        from ..records import WorkerInfo
        now = self.clock()
        since, minutes = now - window, int(window // 60)
        tasks, queues = sorted(set(tasks)), sorted(set(queues))
        p = self.redis.pipeline(transaction=False)
        if tasks: p.sadd(self.key("tasks"), *tasks)
        if queues: p.sadd(self.key("queues"), *queues)
        p.smembers(self.key("tasks"))
        p.smembers(self.key("queues"))
        p.smembers(self.key("paused"))
        p.hgetall(self.key("gone_succeeded"))
        p.hgetall(self.key("failed_attempts"))
        p.zrangebyscore(self.key("workers"), now - WORKER_FORGET, "+inf")
        p.zrange(self.key("state", "running"), 0, RUNNING_READ - 1)
        for k in ("ok", "failures"):
            for m in range(minutes): p.zcount(self.key(k), since + 60 * m, f"({since + 60 * (m + 1)}")
        got = self._read(p.execute, "read the overview")[(1 if tasks else 0) + (1 if queues else 0):]
        all_tasks, all_queues, paused = sorted(got[0]), sorted(got[1] | got[2]), frozenset(got[2])
        gone, failed = ({k: int(v) for k, v in h.items()} for h in got[3:5])
        worker_ids, running_ids = got[5:7]
        per_minute = got[7:]
        c = self._call("counts", *all_tasks, doing="count jobs") if all_tasks else []
        q = self._call("queues", OLDEST_PROBES, *all_queues, doing="count queued jobs") if all_queues else []
        rt = self._call("run_times", f"{since:.6f}", RUN_TIMES_LAST, *buckets, doing="read run times")
        p = self.redis.pipeline(transaction=False)
        for w in worker_ids: p.hgetall(self.key("worker", w))
        for i in running_ids: p.hget(self.key("job", i), "worker")
        more = self._read(p.execute, "read the overview") if worker_ids or running_ids else []
        hashes, workers_of = more[:len(worker_ids)], more[len(worker_ids):]
        return Overview(at=now, window=window, counts=_counts(all_tasks, c), paused=paused,
                        queues=[(name, int(q[2 * i]), float(q[2 * i + 1]) if q[2 * i + 1] else None)
                                for i, name in enumerate(all_queues) if int(q[2 * i])],
                        succeeded=[int(n) for n in per_minute[:minutes]], failed=[int(n) for n in per_minute[minutes:]],
                        workers=_workers(worker_ids, hashes, workers_of, now, WorkerInfo),
                        run_times=list(zip(buckets, (int(n) for n in rt[:len(buckets)]), strict=True)),
                        run_count=int(rt[-2]), run_sum=float(rt[-1]), gone_succeeded=gone, failed_attempts=failed)

    def attempts(self, id: str) -> list[dict[str, Any]]:
        "A job's failed attempts, oldest first: attempt, state (what it became), worker, started_at, ended_at, error."
        from ..records import _error
        rows = self._read(lambda: self.redis.zrange(self.key("attempts", id), 0, -1), "read a job's attempts")
        out = []
        for text in rows:
            try: a, became, worker, started, ended, err = json.loads(text)
            except ValueError: continue
            out.append({"attempt": int(a or 0), "state": became, "worker": worker or None,
                        "started_at": float(started) if started else None, "ended_at": float(ended) if ended else None,
                        "error": _error(err or None)})
        return out

    def heartbeat(self, info: WorkerInfo, pids: Sequence[int] = ()) -> None:
        """A worker process says it is alive (every `HEARTBEAT_EVERY` s): what it serves, and the processes that run its
        jobs (`pids`: the jobs whose `worker` is one of them count as its running jobs). Forgotten after
        `WORKER_FORGET` s of silence."""
        now, k = self.clock(), self.key("worker", info.id)
        p = self.redis.pipeline(transaction=False)
        p.hset(k, mapping={"host": info.host, "pid": info.pid, "queues": json.dumps(list(info.queues)),
                           "tasks": json.dumps(list(info.tasks)), "concurrency": info.concurrency, "lease": info.lease,
                           "started_at": info.started_at, "last_seen": now,
                           "pids": json.dumps(sorted({info.pid, *pids}))})
        p.expire(k, int(WORKER_FORGET))
        p.zadd(self.key("workers"), {info.id: now})
        if info.queues: p.sadd(self.key("queues"), *info.queues)
        if info.tasks: p.sadd(self.key("tasks"), *info.tasks)
        self._read(p.execute, "record a heartbeat")

    def forget_worker(self, id: str) -> None:
        "A worker stopped cleanly: it leaves the list at once."
        p = self.redis.pipeline(transaction=False)
        p.delete(self.key("worker", id))
        p.zrem(self.key("workers"), id)
        self._read(p.execute, "forget a worker")

    def trim_stats(self) -> None:
        "Forget successes and failed attempts older than `STATS_KEEP`, and workers silent for `WORKER_FORGET`."
        now = self.clock()
        p = self.redis.pipeline(transaction=False)
        for k in ("ok", "failures"): p.zremrangebyscore(self.key(k), "-inf", f"({now - STATS_KEEP}")
        p.zremrangebyscore(self.key("workers"), "-inf", f"({now - WORKER_FORGET}")
        self._read(p.execute, "trim the dashboard's figures")

    # -- capability `admin` ----------------------------------------------------------------------------------------
    def delete(self, id: str) -> bool:
        "Delete a finished job (its record, history and index entries); False when it is not finished or not there."
        return bool(self._call("delete", id, doing="delete a job"))

    def requeue_failed(self, task: str, batch: int = 500) -> list[Due]:
        "Queue every failed job of `task` again, with fresh attempts (as `requeue`); returns them, to publish."
        from .status import PAGE_BUDGET
        out: list[Due] = []
        score = cid = ""
        while True:
            r = self._call("page", "", score, cid, batch, PAGE_BUDGET, "state:failed", f"task:{task}",
                           doing="requeue failed jobs")
            for i in r[2::2]:
                if (due := self.requeue(i)) is not None: out.append(due)
            if not r[0]: return out
            score, cid = r[0], r[1]

    def pause(self, queue: str) -> None:
        "Workers start no job of `queue` (a job delivered meanwhile is held: see `hold`) until `resume`."
        self._read(lambda: self.redis.sadd(self.key("paused"), queue), "pause a queue")
        self.paused(fresh=True)

    def resume(self, queue: str) -> int:
        "Workers start jobs of `queue` again; the jobs held meanwhile fall due (a pump publishes them); how many."
        self._read(lambda: self.redis.srem(self.key("paused"), queue), "resume a queue")
        self.paused(fresh=True)
        n = 0
        while (got := int(self._call("release", queue, 1000, doing="resume a queue"))): n += got
        return n

    def paused(self, fresh: bool = False) -> frozenset[str]:
        """The paused queues, read at most once per `PAUSED_TTL` per process (`fresh`: now): a worker pays nothing for
        pausing while no queue is paused."""
        t = time.monotonic()
        cached = getattr(self, "_paused", None)
        if cached is None or fresh or t - cached[0] >= PAUSED_TTL:
            got = self._read(lambda: self.redis.smembers(self.key("paused")), "read paused queues")
            cached = self._paused = (t, frozenset(got))
        return cached[1]

    def hold(self, id: str) -> bool:
        "Job `id` was delivered while its queue is paused: keep it, without running it, until `resume`. True: held."
        return bool(self._call("hold", id, doing="hold a job of a paused queue"))

    def held_queued(self) -> int:
        "Queued jobs held in paused queues (a burst worker's idle check leaves them out)."
        paused = self.paused()
        if not paused: return 0
        p = self.redis.pipeline(transaction=False)
        for q in paused: p.zintercard(2, [self.key("held", q), self.key("state", "queued")])
        return sum(int(n) for n in self._read(p.execute, "count held jobs"))


def _counts(tasks: Sequence[str], flat: Sequence[Any]) -> list[tuple[str, str, int]]:
    "(task, state, jobs) from the `counts` script's answer: `succeeded` is what the other states leave of a task."
    totals = dict(zip(tasks, (int(n) for n in flat[:len(tasks)]), strict=True))
    out: dict[tuple[str, str], int] = {}
    i = len(tasks)
    while i < len(flat):
        state = str(flat[i])
        for t, n in zip(tasks, flat[i + 1:i + 1 + len(tasks)], strict=True):
            if int(n): out[(t, state)] = int(n)
        i += 1 + len(tasks)
    for t, n in totals.items():
        rest = n - sum(v for (task, _), v in out.items() if task == t)
        if rest > 0: out[(t, "succeeded")] = rest
    return sorted((t, s, n) for (t, s), n in out.items())


def _workers(ids: Sequence[str], hashes: Sequence[dict[str, str]], running: Sequence[str | None], now: float,
             info: Any) -> list[tuple[Any, int]]:
    "The workers that sent a heartbeat lately, each with the running jobs of its processes."
    per: collections.Counter[str] = collections.Counter(w for w in running if w)
    out = []
    for id, h in zip(ids, hashes, strict=True):
        if not h: continue
        try:
            pids = [int(p) for p in json.loads(h.get("pids") or "[]")]
            w = info(id=id, host=h.get("host", ""), pid=int(h.get("pid") or 0),
                     queues=tuple(json.loads(h.get("queues") or "[]")), tasks=tuple(json.loads(h.get("tasks") or "[]")),
                     concurrency=int(h.get("concurrency") or 0), lease=float(h.get("lease") or 0),
                     started_at=float(h.get("started_at") or 0), last_seen=float(h.get("last_seen") or 0))
        except (ValueError, TypeError): continue
        w.live = now - w.last_seen <= 3 * HEARTBEAT_EVERY + 1
        out.append((w, sum(per[f"{w.host}:{p}"] for p in pids)))
    return sorted(out, key=lambda x: x[0].started_at)


