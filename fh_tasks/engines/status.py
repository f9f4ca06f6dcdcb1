"""The status store of the broker engines (Celery, Dramatiq): every job's record in Redis, readable by any process.

Brokers keep messages, not jobs: neither engine can list, count or page jobs, keep progress, or tell a finished
job from an unknown one. So every job has a record here, written at submit time and moved by the workers:

    {ns}:job:<id>        hash: task queue args state attempts max_attempts timeout created_at run_at started_at
                         finished_at lease_until worker progress result error parent owner lost engine
    {ns}:all             zset of every job, scored by created_at (listing and paging, newest first)
    {ns}:state:<state>   zset per state, scored by created_at (listing by state; counts are ZCARDs)
    {ns}:task:<name>     zset per task, scored by created_at (listing by task; with a state: ZINTERSTORE)
    {ns}:due             zset: when a job must be (re)published: a scheduled job or a retry's run_at, a running
                         job's lease end (a worker that dies stops renewing it), a queued job's redelivery deadline
                         (a message the broker lost is published again; the copy a worker takes second is refused)
    {ns}:done            zset of finished jobs ("<id>|<task>"), scored by finished_at: the retention sweep
    {ns}:children:<id>   list of the jobs chained after this one (`fh_tasks.BackgroundTasks`)
    {ns}:events          stream of job events (XADD MAXLEN ~), read with XREAD BLOCK by `RedisFeed`; an entry's
                         id (Redis' clock in ms, never going backwards) is the event's order and time

The jobs dashboard's keys (capabilities `stats` and `admin`; see `page`, `overview`, `attempts`, `pause`):

    {ns}:queue:<queue>   zset per queue, scored by created_at (paging by queue; `insert` adds, `forget` removes)
    {ns}:ok              zset of succeeded jobs scored by finished_at (successes per minute, run times; `succeed`
                         adds, kept STATS_KEEP)
    {ns}:failures        zset of failed attempts ("<id>|<attempt>|<became>|<run seconds>") scored by when they ended
                         (failed attempts per minute; kept STATS_KEEP); written on the failure paths only
    {ns}:attempts:<id>   zset of a job's failed attempts (JSON), its history: capped, deleted with the job
    {ns}:failed_attempts, {ns}:gone_succeeded   hashes of counters per task that never go back (failed attempts in
                         all; successes of jobs pruned or deleted)
    {ns}:paused          set of paused queues; {ns}:held:<queue> zset of the jobs delivered while it was paused
    {ns}:workers         zset of worker ids by last heartbeat; {ns}:worker:<id> hash (queues, concurrency, pids...)
    {ns}:tasks, {ns}:queues   sets of the task and queue names hubs and workers announced (the overview's rows)

`{ns}` is a hash tag (default `{fh}`): every key lives in one Cluster slot. Each transition is one Lua script
(`SCRIPTS`) that reads the state, refuses a move that is backwards or fenced out (by attempt: an attempt that no
longer holds the job cannot write its outcome or progress), writes the hash, moves the index entries and appends
the event, atomically. Final records EXPIRE a day after the retention period; `prune` (called by the `Retention`
hook) deletes them and their index entries on time.

Delivery is at-least-once: a message may arrive twice (a relay re-sends after a crash, Redis redelivers past its
visibility timeout, the redelivery deadline fires). `start` lets one copy run: a job running under a live lease,
a final job and a job not due yet are refused, and the copy is dropped. A job whose worker died (its lease
expired) runs again as its next attempt, at most `CRASH_ATTEMPTS` (or `max_attempts`, if more) in all.

Next to this module: `status.lua` (the scripts, loaded by `status_scripts.py` with what the modules share),
`status_dashboard.py` (the dashboard's reads and actions, a mixin of `StatusStore`) and `status_feed.py`
(`RedisFeed`, the event feed). Their public names are importable from here too.
"""
from __future__ import annotations

import collections
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import QueueUnavailable
from ..pid import pid
from ..progress import ProgressBuffer
from ..records import JobRecord, NewJob
from .status_dashboard import HEARTBEAT_EVERY as HEARTBEAT_EVERY
from .status_dashboard import OLDEST_PROBES as OLDEST_PROBES
from .status_dashboard import PAUSED_TTL as PAUSED_TTL
from .status_dashboard import RUN_TIMES_LAST as RUN_TIMES_LAST
from .status_dashboard import RUNNING_READ as RUNNING_READ
from .status_dashboard import STATS_KEEP as STATS_KEEP
from .status_dashboard import WORKER_FORGET as WORKER_FORGET
from .status_dashboard import StatusDashboard
from .status_feed import RedisFeed
from .status_scripts import _PRELUDE, SCRIPTS, STATES, _record, _safe, connect

__all__ = ["StatusStore", "RedisFeed", "Due", "Started", "CRASH_ATTEMPTS", "REDELIVER_AFTER", "connect"]

#: Attempts a job gets in all when its workers keep dying under it (or its max_attempts, if more).
CRASH_ATTEMPTS = 3
#: Seconds after which a queued job that no worker started is published again (a message the broker lost).
REDELIVER_AFTER = 3600.0
#: Seconds after which a pump publishes a chained job its parent's success released, unless the worker did.
RELEASE_GRACE = 10.0
#: Events kept in the stream (approximately): a subscriber that reconnects within them misses nothing.
MAX_EVENTS = 100_000
#: Final records expire this long after the retention period, in case no worker prunes them on time.
EXPIRE_MARGIN = 86_400.0
#: Seconds a reader's combined filter (state and task) is kept.
TMP_TTL = 10
# The jobs dashboard (capabilities `stats` and `admin`; see `status_dashboard.py`):
#: Index entries one page of a filtered job list examines at most (a sparse filter gives a short page, then the next).
PAGE_BUDGET = 2000


@dataclass(frozen=True, slots=True)
class Due:
    "A job to publish to the broker: its id, task, queue, arguments (JSON text) and per-job timeout."
    id: str
    task: str
    queue: str
    args: str
    timeout: float | None

    @classmethod
    def many(cls, flat: Sequence[Any]) -> list[Due]:
        return [cls(flat[i], flat[i + 1], flat[i + 2], flat[i + 3], float(flat[i + 4]) if flat[i + 4] else None)
                for i in range(0, len(flat) - 4, 5)]


@dataclass(frozen=True, slots=True)
class Started:
    "What `start` said: `run` it as `attempt` (of `max_attempts`), or drop this copy (`why`); `lost`: failed for good."
    run: bool
    attempt: int = 0
    max_attempts: int = 0
    timeout: float | None = None
    why: str = ""
    lost: bool = False


class StatusStore(StatusDashboard):
    """Job records, indexes and events in Redis (see the module docstring); thread-safe, fork-safe (redis-py's pool
    reconnects in a child). Every write raises `QueueUnavailable` when Redis cannot be reached.

    Args:
        url: the Redis URL (`redis://host:port/db`).
        namespace: the key prefix (a hash tag, `{namespace}`): several apps, or tests, can share one Redis.
        engine: the engine's name, stored in each record.
        retention: seconds final records are kept (they expire `EXPIRE_MARGIN` later, pruned or not); None: forever.
        redeliver_after: seconds after which a queued job no worker started is published again.
    """

    def __init__(self, url: str, *, namespace: str = "fh", engine: str = "", clock: Callable[[], float] = time.time,
                 retention: float | None = None, redeliver_after: float = REDELIVER_AFTER,
                 max_events: int = MAX_EVENTS) -> None:
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"namespace must be a non-empty string without braces, not {namespace!r}")
        self.url, self.namespace, self.engine, self.clock = url, namespace, engine, clock
        self.prefix = "{" + namespace + "}"
        self.retention, self.redeliver_after, self.max_events = retention, redeliver_after, max_events
        self.redis: Any = connect(url)  # a redis.Redis answering str (its stubs cannot say so)
        self._shas: dict[str, str] = {}
        self._wires: dict[tuple[int, int], _Wire] = {}
        self._progress = ProgressBuffer()
        self._lock = threading.Lock()
        self._cancelled: set[tuple[str, int]] = set()  # attempts of this process whose job was cancelled as it ran

    def __repr__(self) -> str:
        return f"StatusStore({self.url!r}, namespace={self.namespace!r})"

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def _ttl(self) -> float:
        return 0.0 if self.retention is None else self.retention + EXPIRE_MARGIN

    def _call(self, script: str, *args: Any, doing: str) -> Any:
        "Run one transition script and return its answer (see `_soon`)."
        return self._soon(script, *args, doing=doing)()

    def _soon(self, script: str, *args: Any, doing: str, defer: bool = False) -> Callable[[], Any]:
        """Send one transition script now (`defer`: with the thread's next script, see `_Wire`); the function returned
        reads its answer. Scripts go over a connection of the calling thread (`_Wire`): the answers come back in
        order, so a worker can send an attempt's outcome and go on (the next `start` reads both answers). A script
        is loaded once per server, again after a restart."""
        import redis
        argv = [f"{self.clock():.6f}", self.max_events, *("" if a is None else a for a in args)]
        try:
            sha = self._shas.get(script)
            if sha is None: sha = self._shas[script] = self.redis.script_load(_PRELUDE + SCRIPTS[script])
            wire = self._wire()
            ticket = wire.send("EVALSHA", sha, 1, self.prefix, *argv, defer=defer)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise QueueUnavailable(f"the status store at {_safe(self.url)} cannot be reached to {doing}: {e}") from e

        def answer() -> Any:
            try:
                try: return wire.read(ticket)
                except redis.exceptions.NoScriptError:  # Redis restarted and forgot the script: it did not run
                    self._shas[script] = self.redis.script_load(_PRELUDE + SCRIPTS[script])
                    w = self._wire()
                    return w.read(w.send("EVALSHA", self._shas[script], 1, self.prefix, *argv))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
                raise QueueUnavailable(f"the status store at {_safe(self.url)} cannot be reached to {doing}: "
                                       f"{e}") from e

        return answer

    def send_held(self, *command: Any, doing: str) -> Callable[[], Any]:
        """Send a command of the caller's to this Redis database (a Dramatiq ack: `DramatiqEngine`) with this thread's
        next script, as `succeed_soon(defer=True)` sends an outcome: no round trip of its own. The function returned
        reads its answer (a Redis error as raised; `QueueUnavailable` when the connection broke)."""
        wire = self._wire()
        ticket = wire.send(*command, defer=True)
        return lambda: self._read(lambda: wire.read(ticket), doing)

    def send_all(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Several commands to this Redis database in one write on this thread's script connection (no pool checkout),
        in order; their answers. Every answer is read; the first command Redis refused raises its error then."""
        import redis
        wire = self._wire()
        tickets = [wire.send(*c, defer=i < len(commands) - 1) for i, c in enumerate(commands)]
        replies: list[Any] = []
        refused: Exception | None = None
        for t in tickets:
            try: replies.append(wire.read(t))
            except redis.exceptions.ResponseError as e:
                replies.append(e)
                refused = refused or e
        if refused is not None: raise refused
        return replies

    def flush_held(self) -> None:
        """Write what this process's threads hold back for their next script: outcomes (`succeed_soon(defer=True)`) and
        others (`send_held`)."""
        me = pid()
        for key, w in list(self._wires.items()):
            if key[0] == me and w.held: w.flush()

    def _wire(self) -> _Wire:
        """This thread's connection for scripts (a new one in a forked child). Making it, a thread forgets the
        connections of the threads of this process that ended, including one whose id the system gave this thread."""
        me, key = threading.current_thread(), (pid(), threading.get_ident())
        w = self._wires.get(key)
        if w is not None and w.thread is me: return w
        pool = self.redis.connection_pool
        # No health check: its PING would read an answer still waiting on the connection.
        w = _Wire(pool.connection_class(**{**pool.connection_kwargs, "health_check_interval": 0}), me)
        with _WIRES_LOCK:  # threads starting together each forget the ended ones: one at a time
            ended = [k for k, old in self._wires.items() if k[0] == key[0] and (k == key or not old.thread.is_alive())]
            gone = [self._wires.pop(k) for k in ended]
            self._wires[key] = w
        for old in gone:
            if not old.waiting: old.conn.disconnect()
            else:  # answers still to be read (by a `settle`): its held writes go now; it closes once dropped
                try: old.flush()
                except Exception: pass  # the reader of each answer meets the broken connection
        return w

    def _read(self, fn: Callable[[], Any], doing: str) -> Any:
        import redis
        try: return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise QueueUnavailable(f"the status store at {_safe(self.url)} cannot be reached to {doing}: {e}") from e

    def ping(self) -> None:
        "Raise `QueueUnavailable` unless Redis answers."
        self._read(self.redis.ping, "answer a ping")

    # -- writes ----------------------------------------------------------------------------------------------------
    def insert(self, jobs: Sequence[NewJob]) -> list[tuple[str, str, bool]]:
        """Store new jobs, all in one script; a job already stored is left as it is. Returns (id, state, new) per job:
        the caller publishes the queued ones (their redelivery deadline is set, in case it cannot)."""
        if not jobs: return []
        return _inserted(self._call("insert", *self._insert_argv(jobs), doing="store jobs"))

    def insert_soon(self, jobs: Sequence[NewJob]) -> Callable[[], list[tuple[str, str, bool]]]:
        """`insert`, sent without waiting for the answer: returns a function that waits for it (raising as `insert`
        would). The caller publishes meanwhile, so the two round trips overlap; a worker that gets the message before
        the record exists waits for it a moment (`BrokerEngine.run_job`)."""
        if not jobs: return lambda: []
        answer = self._soon("insert", *self._insert_argv(jobs), doing="store jobs")
        return lambda: _inserted(answer())

    def _insert_argv(self, jobs: Sequence[NewJob]) -> list[Any]:
        due = f"{self.clock() + self.redeliver_after:.6f}"
        argv: list[Any] = [self._ttl, self.engine]
        for j in jobs:
            argv += [j.id, j.task, j.queue, j.args, j.max_attempts, "" if j.timeout is None else repr(j.timeout),
                     f"{j.run_at:.6f}", f"{j.created_at:.6f}", j.parent or "", due, j.owner or ""]
        return argv

    def start(self, id: str, worker: str, lease: float) -> Started:
        "A worker is about to run job `id`: the next attempt under a lease, or a refusal (see the module docstring)."
        r = self._call("start", id, worker, lease, CRASH_ATTEMPTS, self._ttl, doing="start a job")
        if r[0] == 1: return Started(True, int(r[1]), int(r[2]), float(r[3]) if r[3] else None)
        return Started(False, why=str(r[1]), lost=r[0] == -1)

    def renew(self, attempts: Iterable[tuple[str, int]], lease: float) -> list[tuple[str, int]]:
        "Extend the leases of running attempts; returns those that no longer hold their job."
        argv: list[Any] = [lease]
        for id, attempt in attempts: argv += [id, attempt]
        if len(argv) == 1: return []
        stale = self._call("renew", *argv, doing="renew leases")
        return [(stale[i], int(stale[i + 1])) for i in range(0, len(stale), 2)]

    def succeed(self, id: str, attempt: int, result: str | None) -> tuple[bool, list[Due]]:
        "Record a successful attempt (with its last progress); returns (accepted, chained jobs to publish now)."
        return self.succeed_soon(id, attempt, result)()

    def succeed_soon(self, id: str, attempt: int, result: str | None, *,
                     defer: bool = False) -> Callable[[], tuple[bool, list[Due]]]:
        """`succeed`, sent now and answered later (a worker runs its next job meanwhile): returns what reads the answer.
        `defer`: sent with this thread's next script (its next job's `start`), or by `flush_held` (a keeper thread)."""
        answer = self._soon("succeed", id, attempt, result or "", self._last_progress(id, attempt), self._ttl,
                            f"{self.clock() + RELEASE_GRACE:.6f}", doing="record a result", defer=defer)

        def read() -> tuple[bool, list[Due]]:
            r = answer()
            return bool(r[0]), Due.many(r[1:])

        return read

    def retry(self, id: str, attempt: int, error: str, run_at: float, *, publish_now: bool) -> tuple[bool, Due | None]:
        """Record a failed attempt that runs again at `run_at`: published by the pump then, or (`publish_now`) by the
        caller, who gets the job to publish. Returns (accepted, the job)."""
        due = self.clock() + self.redeliver_after if publish_now else run_at
        r = self._call("retry", id, attempt, error, self._last_progress(id, attempt), f"{run_at:.6f}", f"{due:.6f}",
                       doing="record a retry")
        return bool(r[0]), (Due.many(r[1:])[0] if r[0] else None)

    def fail(self, id: str, attempt: int, error: str) -> bool:
        "Record the last failed attempt of a job: it ends failed (and the jobs chained after it are cancelled)."
        return bool(self._call("fail", id, attempt, error, self._last_progress(id, attempt), self._ttl,
                               doing="record a failure"))

    def lost(self, id: str) -> bool:
        "The worker process running job `id` died: its lease ends now, so the pump publishes it again."
        return bool(self._call("lost", id, doing="release a lost job"))

    def cancel(self, id: str) -> bool:
        return bool(self._call("cancel", id, self._ttl, doing="cancel a job"))

    def cancel_running(self, id: str) -> bool:
        "Cancel a running job (see the script); True when it was running."
        return bool(self._call("cancel_running", id, self._ttl, doing="cancel a job"))

    def cancelled_among(self, attempts: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        "The running attempts among `attempts` whose job was cancelled (`cancel_running`); each is remembered."
        if not attempts: return []
        pipe = self.redis.pipeline(transaction=False)
        for id, _ in attempts: pipe.hmget(self.key("job", id), "state", "attempts")
        rows = self._read(pipe.execute, "check for cancelled jobs")
        found = [(id, a) for (id, a), (st, n) in zip(attempts, rows, strict=True) if st == "cancelled" and n == str(a)]
        self._cancelled.update(found)
        return found

    def is_cancelled(self, id: str, attempt: int) -> bool:
        "True once this process found the attempt's job cancelled (`JobContext.cancelled` asks this; no I/O)."
        return (id, attempt) in self._cancelled

    def requeue(self, id: str) -> Due | None:
        "Queue a failed or cancelled job again with fresh attempts; returns it to publish, or None."
        r = self._call("requeue", id, f"{self.clock() + self.redeliver_after:.6f}", doing="requeue a job")
        return Due.many(r)[0] if r else None

    def take_due(self, limit: int = 500) -> list[Due]:
        "The jobs due for publishing now (see `{ns}:due`), each given a redelivery deadline."
        r = self._call("take_due", limit, f"{self.clock() + self.redeliver_after:.6f}", doing="read due jobs")
        return Due.many(r)

    def due_at(self, ids: Sequence[str], when: float) -> None:
        "Publish these jobs at `when` instead (publishing them now failed)."
        if ids: self._call("due_at", f"{when:.6f}", *ids, doing="reschedule jobs")

    def next_due(self) -> float | None:
        "When the next job falls due for publishing (None: none waits)."
        got = self._read(lambda: self.redis.zrange(self.key("due"), 0, 0, withscores=True), "read due jobs")
        return float(got[0][1]) if got else None

    def prune(self, before: float, limit: int = 1000) -> int:
        "Delete finished jobs that finished before `before`, with their index entries; returns how many."
        total = 0
        while (n := int(self._call("prune", f"{before:.6f}", limit, doing="prune jobs"))): total += n
        return total

    def prune_events(self, max_age: float = 3600.0) -> int:
        "Forget events older than `max_age` seconds (the stream is capped at `max_events` anyway)."
        minid = f"{int((self.clock() - max_age) * 1000)}-0"
        return int(self._read(lambda: self.redis.xtrim(self.key("events"), minid=minid, approximate=True),
                              "prune events"))

    # -- progress: the `ProgressSink` of `JobContext` --------------------------------------------------------------
    def record_progress(self, id: str, attempt: int, progress: str) -> bool:
        "Keep the attempt's latest progress; `flush_progress` writes it (the outcome's script writes the last one)."
        return self._progress.put((id, attempt), progress)

    def progress_pending(self) -> int:
        return len(self._progress)

    def flush_progress(self) -> int:
        "Write every pending progress value in one script; returns how many were stored (fenced by attempt)."
        with self._lock:  # an outcome takes the last value under the same lock: never an older value after it
            items = self._progress.take()
            if not items: return 0
            argv: list[Any] = []
            for (id, attempt), text in items.items(): argv += [id, attempt, text]
            try: stale = self._call("progress", *argv, doing="record progress")
            except BaseException:
                self._progress.restore(items)
                raise
        gone = [(stale[i], int(stale[i + 1])) for i in range(0, len(stale), 2)]
        self._progress.stale(gone)
        return len(items) - len(gone)

    def _last_progress(self, id: str, attempt: int) -> str:
        with self._lock:
            text = self._progress.peek([(id, attempt)]).get((id, attempt), "")
            self._progress.drop((id, attempt))
        return text

    # -- reads -----------------------------------------------------------------------------------------------------
    def get(self, id: str) -> JobRecord | None:
        "The whole record, or None."
        h = self._read(lambda: self.redis.hgetall(self.key("job", id)), "read a job")
        return _record(h) if h else None

    def summary(self, id: str) -> JobRecord | None:
        "The record without its arguments and result (what a status page shows), or None."
        fields = ("id", "task", "queue", "state", "attempts", "max_attempts", "created_at", "run_at", "started_at",
                  "finished_at", "progress", "error", "parent", "worker", "owner")
        got = self._read(lambda: self.redis.hmget(self.key("job", id), fields), "read a job")
        if got[3] is None: return None
        return _record({k: v for k, v in zip(fields, got, strict=True) if v is not None})

    def timeout(self, id: str) -> float | None:
        "The job's timeout in seconds (None: none)."
        t = self._read(lambda: self.redis.hget(self.key("job", id), "timeout"), "read a job")
        return float(t) if t else None

    def exists(self, ids: Sequence[str]) -> set[str]:
        "The ids among `ids` that have a record."
        pipe = self.redis.pipeline(transaction=False)
        for i in ids: pipe.exists(self.key("job", i))
        found = self._read(pipe.execute, "read jobs") if ids else []
        return {i for i, n in zip(ids, found, strict=True) if n}

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        "Records newest first, by state and task (a state this version does not know lists nothing)."
        if limit <= 0 or (state is not None and state not in STATES): return []
        keys = [self.key("state", state)] if state else []
        if task: keys.append(self.key("task", task))
        offset = max(0, offset)

        def page() -> list[str]:
            if len(keys) < 2:
                return list(self.redis.zrevrange(keys[0] if keys else self.key("all"), offset, offset + limit - 1))
            tmp = self.key("tmp", uuid.uuid4().hex)
            pipe = self.redis.pipeline(transaction=True)
            pipe.zinterstore(tmp, keys, aggregate="MAX")
            pipe.zrevrange(tmp, offset, offset + limit - 1)
            pipe.expire(tmp, TMP_TTL)
            return list(pipe.execute()[1])

        ids = self._read(page, "list jobs")
        pipe = self.redis.pipeline(transaction=False)
        for i in ids: pipe.hgetall(self.key("job", i))
        rows = self._read(pipe.execute, "list jobs") if ids else []
        return [_record(h) for h in rows if h]

    def counts(self) -> dict[str, int]:
        "Jobs per state (states with none left out)."
        pipe = self.redis.pipeline(transaction=False)
        for s in STATES: pipe.zcard(self.key("state", s))
        return {s: int(n) for s, n in zip(STATES, self._read(pipe.execute, "count jobs"), strict=True) if n}

    def feed(self) -> RedisFeed:
        return RedisFeed(self)

    def clear(self) -> int:
        "Delete every key of this namespace (tests; a store being retired); returns how many."
        n = 0
        for batch in _chunks(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000), 500):
            n += int(self.redis.unlink(*batch))
        return n

    def close(self) -> None:
        with _WIRES_LOCK:
            wires, self._wires = self._wires, {}
        for key, w in wires.items():
            if key[0] == pid(): w.conn.disconnect()
        self.redis.close()


#: Held while a thread changes a store's `_wires` (`StatusStore._wire`, `close`).
_WIRES_LOCK = threading.Lock()


def _new_wires_lock() -> None:
    "In a forked child: a new lock (a thread of the parent may have held the old one at the fork)."
    global _WIRES_LOCK
    _WIRES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"): os.register_at_fork(after_in_child=_new_wires_lock)

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack  # the `redis[hiredis]` that the engines' extras install
except ImportError:
    _hiredis_pack = None


def _pack(conn: Any, args: tuple[Any, ...]) -> list[bytes]:
    """One command in Redis' protocol. With hiredis, its packer takes the arguments as they are: the same bytes as
    redis-py's `pack_command`, which first encodes each argument in Python (7 times the time, on every job's `start`
    and outcome). redis-py's packer where hiredis is missing, or for an argument hiredis does not take."""
    if _hiredis_pack is not None:
        try: return [_hiredis_pack(args)]
        except TypeError: pass  # not str, int, float or bytes: redis-py encodes it, or says why it cannot
    return list(conn.pack_command(*args))


class _Wire:
    """One connection used by one thread for transition scripts, pipelined: `send` writes a command and returns a
    ticket, `read(ticket)` reads the answers in order up to that ticket's (keeping the earlier ones for their own
    `read`). `send(..., defer=True)` holds the command back until the next `send`, `read` or `flush`, which write it
    in the same system call (a worker's success goes out with its next job's `start`: one write per job instead of
    two). Thread-safe: another thread (a worker's keeper) may read an answer or flush. A broken connection fails
    every command waiting on it and reconnects on the next `send`."""

    def __init__(self, conn: Any, thread: threading.Thread) -> None:
        self.conn, self.thread = conn, thread  # the thread it serves (another may get the same id once it ends)
        self.lock = threading.Lock()
        self.waiting: collections.deque[int] = collections.deque()
        self.answers: dict[int, tuple[bool, Any]] = {}
        self.next = 0
        self.unsent: list[Any] = []  # the packed commands held back by `send(defer=True)`...
        self.held = 0                # ...and how many they are (the last ones of `waiting`)

    def send(self, *args: Any, defer: bool = False) -> int:
        with self.lock:
            packed = _pack(self.conn, args)
            if defer:
                self.unsent += packed
                self.held += 1
            else: self._write(packed)
            self.next += 1
            self.waiting.append(self.next)
            return self.next

    def flush(self) -> None:
        "Write the commands held back by `send(defer=True)`, if any."
        with self.lock:
            if self.held: self._write([])

    def _write(self, packed: list[Any]) -> None:
        import redis
        if len(self.waiting) == self.held and getattr(self.conn, "_sock", None) is not None:
            # Idle, yet readable: the server closed it (a restart) or it holds stray data. As the pool does on
            # checkout, reconnect rather than send a command that would be lost (held commands were never sent).
            try: stale = self.conn.can_read(timeout=0)
            except (redis.exceptions.ConnectionError, OSError): stale = True
            if stale: self.conn.disconnect()
        chunks, self.unsent, self.held = self.unsent + packed, [], 0
        try: self.conn.send_packed_command([b"".join(chunks)] if len(chunks) > 1 else chunks)  # one system call
        except BaseException:
            self._broken()
            raise

    def read(self, ticket: int) -> Any:
        import redis
        with self.lock:
            if ticket > self.next - self.held: self._write([])  # held back: written now
            while ticket not in self.answers:
                if not self.waiting: raise redis.exceptions.ConnectionError("the answer was lost with its connection")
                t = self.waiting.popleft()
                try: self.answers[t] = (True, self.conn.read_response())
                except redis.exceptions.ResponseError as e: self.answers[t] = (False, e)
                except BaseException:
                    self._broken()
                    raise
            ok, value = self.answers.pop(ticket)
        if not ok: raise value
        return value

    def _broken(self) -> None:
        "Drop the connection and every answer still expected on it."
        self.waiting.clear()
        self.unsent, self.held = [], 0
        self.conn.disconnect()


def _inserted(out: Sequence[Any]) -> list[tuple[str, str, bool]]:
    return [(out[i], out[i + 1], bool(out[i + 2])) for i in range(0, len(out), 3)]


def _chunks(it: Iterable[Any], n: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) >= n: yield batch; batch = []
    if batch: yield batch


_name = (0, "")


def worker_name() -> str:
    "How this process names itself in `worker` fields: host:pid."
    global _name
    if _name[0] != os.getpid():
        import socket
        _name = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}")
    return _name[1]
