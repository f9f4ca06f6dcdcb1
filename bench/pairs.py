"""fh-tasks on a broker engine against the plain library it runs on, measured in pairs: enqueue (one call per job),
drain (N queued jobs, one worker process; no-op jobs, and again with jobs that make one Redis round trip:
`drain-io`), cross-process pickup, and the short jobs' p99 wait beside long ones on two worker hosts (`mixed`,
`bench/mixed.py`). The two peers alternate within each repetition so that a noisy machine moves both alike
(enqueue: in alternating blocks of a tenth of the jobs).
Ratios are fh-tasks' cost over the plain library's (≤ 1.15 is the goal: "at most 15 % slower"), the median of the
per-repetition ratios. Each drain also reports the machine's CPU time per job (every process: workers, broker, status
store), its ratio beside the time's: what a job costs in CPU, which a busy host disturbs less than throughput.

    python -m bench.pairs dramatiq            # fh-dramatiq vs dramatiq, 5 repetitions
    python -m bench.pairs dramatiq --reps 3 --jobs 5000 --out /tmp/pairs.json
    python -m bench.pairs celery --procs 2   # drains with 2 pool processes (Dramatiq: 2 worker processes)
    python -m bench.pairs celery --only mixed --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import drain, mixed, pickup
from .common import Settings, cpu_ticks, ensure_redis, log, steal_since
from .peers import Env, job_arg, load

#: engine -> (plain peer, fh-tasks peer)
PAIRS = {"dramatiq": ("dramatiq", "fh-dramatiq"), "celery": ("celery", "fh-celery"),
         "celery-late": ("celery-late", "fh-celery"),  # plain Celery with fh-tasks' late acks and prefetch ×1
         "celery-p4": ("celery", "fh-celery-p4"),  # fh-tasks with Celery's own prefetch ×4 (`CeleryEngine(prefetch=4)`)
         # plain Celery as above, recording status where every host reads it: Redis results, `task_track_started`
         "celery-status": ("celery-status", "fh-celery")}
GOAL = 1.15


#: Enqueue: each peer's jobs go in this many blocks, the peers' blocks alternating, so that a load that comes and goes
#: during a repetition weighs on both peers alike (one block each, one after the other, could land on either).
BLOCKS = 10


def _enqueue_pair(peers: dict[str, Any], n: int, first: str) -> dict[str, float]:
    "Seconds per job for each peer, one `put` per job, in `BLOCKS` alternating blocks (`first` begins)."
    for p in peers.values():
        p.reset()
        for _ in range(20): p.put(job_arg())  # connections made, scripts loaded: not part of the measure
    spent = dict.fromkeys(peers, 0.0)
    size = max(1, n // BLOCKS)
    order = [first, *(k for k in peers if k != first)]
    for b in range(BLOCKS):
        for k in (order if b % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            for _ in range(size): peers[k].put(job_arg())
            spent[k] += time.perf_counter() - t0
    return {k: v / (size * BLOCKS) for k, v in spent.items()}


def _once(peer: Any, what: str, s: Settings, jobs: int, procs: int = 1) -> tuple[float, float | None]:
    """One measurement of `what` (drain, pickup or mixed), as a cost (lower is better): seconds per job, pickup p50
    ms, or the short jobs' p99 wait (ms) under the mixed load; and for a drain, the machine's CPU seconds per job
    (`drain.once`). `procs`: the drains' worker processes (Celery: pool processes of one worker)."""
    if what == "mixed":
        r = mixed.once(peer)
        log(f"    mixed {peer.label}: short jobs' wait p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"max {r['max_ms']:.1f} ms ({r['short']} short, {r['long']} long)")
        return float(r["p99_ms"]), None
    if what in ("drain", "drain-io"):
        peer.io = what == "drain-io"  # the job body: a no-op, or one Redis round trip (bench/io_job.py)
        try: r = drain.once(peer, procs, jobs, s.drain_budget)
        finally: peer.io = False
        if r["done"] < jobs: raise RuntimeError(f"{peer.label}: {r['done']}/{jobs} jobs within {s.drain_budget}s")
        return 1 / r["rate"], r["cpu_per_job"]
    r = pickup.cross_process(peer, replace(s, reps=1))
    return float(r["p50_ms"]["median"]), None


#: What `measure` takes, in order. `mixed` (`bench/mixed.py`): the short jobs' p99 wait beside long jobs.
MEASURES = ("enqueue", "drain", "drain-io", "pickup", "mixed")


def measure(engine: str, reps: int, jobs: int, s: Settings, env: Env, procs: int = 1,
            only: tuple[str, ...] = MEASURES) -> dict[str, Any]:
    plain_key, fh_key = PAIRS[engine]
    peers = {k: load(k, env) for k in (plain_key, fh_key)}
    out: dict[str, Any] = {"pair": [plain_key, fh_key], "reps": reps, "jobs": jobs, "procs": procs, "measures": {}}
    for what in (m for m in MEASURES if m in only):
        costs: dict[str, list[float]] = {plain_key: [], fh_key: []}
        cpu: dict[str, list[float | None]] = {plain_key: [], fh_key: []}
        for rep in range(reps):
            order = (plain_key, fh_key) if rep % 2 == 0 else (fh_key, plain_key)
            if what == "enqueue":
                for k, cost in _enqueue_pair(peers, s.enqueue_single, order[0]).items(): costs[k].append(cost)
                continue
            for k in order:
                cost, cpu_per_job = _once(peers[k], what, s, jobs, procs)
                costs[k].append(cost)
                cpu[k].append(cpu_per_job)
                time.sleep(0.2)
        ratios = [f / p for f, p in zip(costs[fh_key], costs[plain_key], strict=True)]
        m = statistics.median(ratios)
        out["measures"][what] = {"plain": costs[plain_key], "fh": costs[fh_key], "ratios": ratios, "ratio": m,
                                 "goal": GOAL, "met": m <= GOAL}
        in_ms = what in ("pickup", "mixed")
        unit = "ms" if in_ms else "jobs/s"
        show = (lambda c: statistics.median(c)) if in_ms else (lambda c: 1 / statistics.median(c))
        log(f"  {what:8} {plain_key} {show(costs[plain_key]):>9,.1f} {unit}   {fh_key} {show(costs[fh_key]):>9,.1f} "
            f"{unit}   cost ratio {m:.2f} (per rep: {', '.join(f'{r:.2f}' for r in ratios)})")
        pairs = [(f, p) for f, p in zip(cpu[fh_key], cpu[plain_key], strict=True) if f is not None and p]
        if pairs:  # what the machine spent per job (workers, broker, status store): the cost in CPU, not in time
            cr = [f / p for f, p in pairs]
            out["measures"][what].update(cpu_plain=cpu[plain_key], cpu_fh=cpu[fh_key], cpu_ratios=cr,
                                         cpu_ratio=statistics.median(cr))
            log(f"  {'':8} machine CPU per job: {plain_key} {1e6 * statistics.median(p for _, p in pairs):,.0f} µs   "
                f"{fh_key} {1e6 * statistics.median(f for f, _ in pairs):,.0f} µs   ratio {statistics.median(cr):.2f} "
                f"(per rep: {', '.join(f'{r:.2f}' for r in cr)})")
    for p in peers.values(): p.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=sorted(PAIRS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=5000, help="jobs per drain")
    ap.add_argument("--enqueue", type=int, default=2000, help="jobs per enqueue measurement")
    ap.add_argument("--procs", type=int, default=1,
                    help="worker processes per drain (Celery: pool processes of one worker)")
    ap.add_argument("--only", default=",".join(MEASURES),
                    help=f"the measures to take, comma-separated (default: all of {','.join(MEASURES)})")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.procs < 1: ap.error("--procs must be 1 or more")
    only = tuple(m.strip() for m in a.only.split(",") if m.strip())
    if not only or set(only) - set(MEASURES): ap.error(f"--only takes measures among {', '.join(MEASURES)}")
    workdir = Path(tempfile.mkdtemp(prefix="fh-pairs-"))
    redis, proc = ensure_redis(workdir)
    os.environ["BENCH_REDIS"] = redis
    s = replace(Settings.full(), enqueue_single=a.enqueue, drain_budget=60.0, pickup_seconds=3.0)
    log(f"{a.engine}: fh-tasks vs plain, {a.reps} paired repetitions, {a.procs} worker process(es) per drain, "
        f"Redis {redis}, load {os.getloadavg()[0]:.2f}")
    ticks = cpu_ticks()
    try: res = measure(a.engine, a.reps, a.jobs, s, Env(workdir, redis), a.procs, only)
    finally:
        if proc is not None: proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    res["load_avg_after"] = os.getloadavg()
    res["steal_pct"] = steal_since(ticks)  # CPU time the hypervisor took during the run (a shared host)
    log(f"the hypervisor took {res['steal_pct']} % of the CPU time during the run (steal)")
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
