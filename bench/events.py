"""Job events: latency from a state change in a worker process to a subscriber in another process, and the cost
of events on the job path.

Latency: an `fh-tasks worker` subprocess runs jobs (each sleeps ~1 ms) that a producer subprocess defers at a
steady rate (200 jobs/s offered); this process subscribes with `tasks.subscribe` and notes `time.time()` as each
event arrives. Latency = arrival - `event.at`, the store's time of the change (stamped inside the writer's
transaction), so it covers the commit, the subscriber's feed noticing it and the read. `started` and `succeeded`
are the worker's changes (the measure with the target); `stored` is the producer's, shown beside them.

Cost: drain throughput of one worker process over N queued no-op jobs (as `bench/drain.py`), without and with a
subscriber registered in this process: while one is, the store's triggers append every change to `fh_events`.

    python -m bench.run --only events [--quick]      # through the runner (results.json, RESULTS.md)
    python -m bench.events produce DB RATE SECONDS    # the producer subprocess (used by the measure)
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from fh_tasks import Tasks

from .common import PY, Proc, Settings, log, percentile, stat, wait_until

#: Jobs per second the producer offers, and how long one round produces (full run, quick run).
RATE = 200.0
SECONDS, QUICK_SECONDS = 10.0, 6.0
#: Drains measured without and with a subscriber (alternating which goes first), and the least jobs in each.
DRAIN_PAIRS, DRAIN_JOBS = 3, 5_000
#: Seconds each job sleeps.
NAP = 0.001
#: The goal for the worker's events, p99 in ms.
TARGET_P99_MS = 50.0
#: Worker kinds (the worker process made the change) and the producer's.
WORKER_KINDS = ("started", "succeeded")
CONCURRENCY = 8


def make_hub(db: str) -> Tasks:
    "A hub on `db` with the benchmark's task (`hub.registry['bench.nap']`)."
    hub = Tasks(db=db, workers=0)

    @hub.task(name="bench.nap")
    def nap(n: int) -> int:
        time.sleep(NAP)
        return n

    return hub


#: The hub `fh-tasks worker bench.events:tasks --db FILE` serves (its own file is never opened: --db replaces it).
tasks = make_hub("fh-bench-unused.db")


def worker_cmd(db: str) -> list[str]:
    return [PY, "-m", "fh_tasks", "worker", "bench.events:tasks", "--db", db, "--concurrency", str(CONCURRENCY),
            "--log-level", "warning"]


# -- latency ---------------------------------------------------------------------------------------
class Arrivals:
    "A subscriber that notes when each event arrived; called in the feed's thread."

    def __init__(self) -> None:
        self.rows: list[tuple[float, str, float]] = []  # (arrived, kind, at)
        self.lock = threading.Lock()

    def __call__(self, ev: Any) -> None:
        now = time.time()
        with self.lock: self.rows.append((now, ev.kind, ev.at))

    def count(self, kind: str, start: int = 0) -> int:
        with self.lock: return sum(1 for r in self.rows[start:] if r[1] == kind)

    def __len__(self) -> int:
        with self.lock: return len(self.rows)


def latency_round(workdir: Path, rep: int, rate: float, seconds: float) -> dict[str, Any]:
    "One round: worker and producer subprocesses, this process subscribed; latencies (ms) per kind of event."
    db = str(workdir / f"latency-{rep}.db")
    hub = make_hub(db)
    hub.store.expire()  # creates the store before two other processes open it
    seen = Arrivals()
    unsubscribe = hub.subscribe(seen)
    worker = Proc(worker_cmd(db), log=workdir / f"worker-latency-{rep}.log")
    producer: Proc | None = None
    try:
        nap = hub.registry["bench.nap"]
        deadline = time.monotonic() + 45
        while seen.count("succeeded") == 0:  # warm up: the worker runs, this process's feed delivers
            if time.monotonic() > deadline or not worker.alive():
                raise RuntimeError(f"no job event within 45s:\n{worker.tail()}")
            nap.defer(-1)
            wait_until(lambda: seen.count("succeeded") > 0, 0.5, 0.01)
        time.sleep(0.5)
        start, n = len(seen), int(rate * seconds)
        producer = Proc([PY, "-m", "bench.events", "produce", db, str(rate), str(seconds)],
                        log=workdir / f"producer-{rep}.log")
        if not wait_until(lambda: seen.count("succeeded", start) >= n, seconds + 60, 0.05, worker.alive):
            raise RuntimeError(f"{seen.count('succeeded', start)}/{n} jobs succeeded in time:\n{worker.tail()}\n"
                               f"{producer.tail()}")
        with seen.lock: rows = seen.rows[start:]
    finally:
        unsubscribe()
        if producer is not None: producer.stop()
        worker.stop()
        hub.store.close()
    lats: dict[str, list[float]] = {}
    for arrived, kind, at in rows: lats.setdefault(kind, []).append((arrived - at) * 1000)
    lats["worker"] = [x for k in WORKER_KINDS for x in lats.get(k, [])]
    return lats


def _summary(rounds: list[dict[str, list[float]]], key: str) -> dict[str, Any]:
    vals = [r[key] for r in rounds if r.get(key)]
    return {"p50_ms": stat([percentile(v, 50) for v in vals]), "p99_ms": stat([percentile(v, 99) for v in vals]),
            "max_ms": stat([max(v) for v in vals]), "events": [len(v) for v in vals]}


# -- cost on the job path --------------------------------------------------------------------------
def _drain_peer(workdir: Path, subscribed: bool) -> Any:
    "The fh-tasks peer of bench/drain.py, with a subscriber in this process while its worker drains, if asked."
    from .peers import Env
    from .peers.fh_peer import FhTasks

    class Subscribed(FhTasks):
        key = "fh-tasks-events" if subscribed else "fh-tasks-no-events"
        delivered = 0
        _unsubscribe: Any = None

        def start_workers(self, procs: int, probe_dir: Path, tag: str = "") -> list[Proc]:
            if subscribed:
                self.delivered = 0
                self._unsubscribe = self.hub.subscribe(self._count)
            return super().start_workers(procs, probe_dir, tag)

        def _count(self, ev: Any) -> None:
            self.delivered += 1

        def wait_delivered(self, count: int, timeout: float = 10.0) -> int:
            "How many events had arrived once `count` had, or `timeout` seconds passed."
            wait_until(lambda: self.delivered >= count, timeout, 0.02)
            return self.delivered

        def close(self) -> None:
            if self._unsubscribe is not None: self._unsubscribe()
            self._unsubscribe = None
            super().close()

    return Subscribed(Env(workdir, ""))


def drain_cost(s: Settings, workdir: Path) -> dict[str, Any]:
    "Jobs/s of one worker process over N queued no-op jobs, without and with a subscriber, in alternating pairs."
    from .drain import once
    n, pairs = max(DRAIN_JOBS, s.drain_jobs), max(DRAIN_PAIRS, s.reps)
    peers = {False: _drain_peer(workdir, False), True: _drain_peer(workdir, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    delivered: list[int] = []
    for rep in range(pairs):
        for subscribed in ((False, True) if rep % 2 == 0 else (True, False)):
            peer = peers[subscribed]
            r = once(peer, 1, n, s.drain_budget)
            if r["done"] < n: raise RuntimeError(f"the worker drained {r['done']}/{n} jobs within {s.drain_budget}s")
            rates[subscribed].append(r["rate"])
            if subscribed: delivered.append(peer.wait_delivered(2 * n))  # the worker's two changes per job
            peer.close()
            time.sleep(0.2)
    ratio = [w / o for w, o in zip(rates[True], rates[False], strict=True)]
    return {"jobs": n, "pairs": pairs, "without": stat(rates[False]), "with": stat(rates[True]),
            "delivered": delivered, "with_over_without": stat(ratio)}


# -- the runner's entry point ----------------------------------------------------------------------
def measure(s: Settings, workdir: Path) -> dict[str, Any]:
    "Event latency (p50/p99/max per round, summarised over `s.reps` rounds) and the drain cost of events."
    d = workdir / "events"
    d.mkdir(parents=True, exist_ok=True)
    seconds = QUICK_SECONDS if s.quick else SECONDS
    rounds = [latency_round(d, rep, RATE, seconds) for rep in range(s.reps)]
    kinds = sorted({k for r in rounds for k in r if k != "worker"})
    out: dict[str, Any] = {"rate": RATE, "seconds": seconds, "nap_ms": NAP * 1000, "concurrency": CONCURRENCY,
                           "target_p99_ms": TARGET_P99_MS, "worker": _summary(rounds, "worker"),
                           "kinds": {k: _summary(rounds, k) for k in kinds}}
    w = out["worker"]
    log(f"  events worker -> subscriber: p50 {w['p50_ms']['median']:.2f} ms   p99 {w['p99_ms']['median']:.2f} ms   "
        f"max {w['max_ms']['median']:.1f} ms   ({sum(w['events'])} events; target p99 <= {TARGET_P99_MS:.0f} ms)")
    out["drain"] = drain_cost(s, d)
    c = out["drain"]
    log(f"  events drain, 1 process: {c['without']['median']:,.0f} jobs/s without a subscriber, "
        f"{c['with']['median']:,.0f} with one ({c['with_over_without']['median']:.2f}x)")
    return out


def produce(db: str, rate: float, seconds: float) -> int:
    "Defer `rate * seconds` jobs at a steady pace, one commit each (the producer subprocess)."
    hub = make_hub(db)
    nap, n = hub.registry["bench.nap"], int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0: time.sleep(delay)
        nap.defer(i)
    hub.store.close()
    return n


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "produce":
        raise SystemExit("usage: python -m bench.events produce DB RATE SECONDS")
    print(produce(sys.argv[2], float(sys.argv[3]), float(sys.argv[4])), "jobs deferred")
