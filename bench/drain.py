"""Drain throughput: N jobs queued first, then 1 or 2 worker processes start; jobs/s from first start to last end."""
from __future__ import annotations

import time
from typing import Any

from . import probe
from .common import Settings, busy_seconds, log, stat, wait_until
from .peers import Peer

#: Seconds a worker gets to start and run its first job.
STARTUP = 45.0


def once(peer: Peer, procs: int, n: int, budget: float) -> dict[str, Any]:
    """One drain of `n` jobs by `procs` worker processes, bounded by `budget` seconds after the first job runs.
    `cpu_per_job`: the machine's CPU seconds (every process: workers, broker, this one polling) per job run from
    the first job to the last, the worker's start-up left out; None without /proc/stat."""
    peer.reset()
    if not peer.put_batches(n, 500): peer.put_many(n)
    d = peer.dir / f"drain-{procs}p-{peer.rep}"
    d.mkdir()
    workers = peer.start_workers(procs, d, tag=f"-drain{procs}-{peer.rep}")
    try:
        alive = lambda: any(w.alive() for w in workers)  # noqa: E731
        if not wait_until(lambda: probe.count(str(d)) > 0, STARTUP, 0.02, alive):
            raise RuntimeError(f"{peer.label}: no job ran within {STARTUP}s:\n" + "\n".join(w.tail() for w in workers))
        busy0, ran0 = busy_seconds(), probe.count(str(d))
        wait_until(lambda: probe.count(str(d)) >= n, budget, 0.01, alive)
        busy1, ran1 = busy_seconds(), probe.count(str(d))
    finally:
        peer.stop_workers(workers)
    recs = probe.records(str(d))
    first, last = min(r[1] for r in recs), max(r[2] for r in recs)
    cpu = None if busy0 is None or busy1 is None or ran1 <= ran0 else (busy1 - busy0) / (ran1 - ran0)
    return {"done": len(recs), "seconds": last - first, "rate": len(recs) / max(last - first, 1e-9),
            "cpu_per_job": cpu}


def measure(peer: Peer, s: Settings, procs_list: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    "Median jobs/s over the repetitions, for each process count."
    out: dict[str, Any] = {"concurrency": peer.concurrency, "jobs": s.drain_jobs}
    for procs in procs_list:
        runs = []
        for _ in range(s.reps):
            try: runs.append(once(peer, procs, s.drain_jobs, s.drain_budget))
            except Exception as e:  # one peer failing must not sink the run; the error is reported
                log(f"  drain {peer.label} x{procs}: FAILED: {e}")
                out[f"error_{procs}"] = str(e)[:2000]
                break
            time.sleep(0.2)
        st = stat([r["rate"] for r in runs])
        st["done"] = [r["done"] for r in runs]
        out[str(procs)] = st
        if runs:
            partial = "" if all(r["done"] >= s.drain_jobs for r in runs) else \
                f"  (partial: {min(r['done'] for r in runs)}/{s.drain_jobs} within {s.drain_budget:.0f}s)"
            log(f"  drain {peer.label:16} x{procs}: {st['median']:>9,.0f} jobs/s{partial}")
    peer.close()
    return out
