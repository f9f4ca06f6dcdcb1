"""Mixed load, as a site with a few worker hosts sees it: a producer defers jobs at a steady rate while `hosts`
separate worker processes (each as the library's worker starts it with one pool process: one worker per host) run
them. Every `every`-th job sleeps `long_s` first (a slow call to another service); the others make one Redis round
trip (`bench/io_job.py`). The long jobs are spaced so that one runs at a time: another worker is always free.

The figure is the short jobs' wait, from `defer()` to their start, at p50 and p99. A worker that prefetches holds
messages while it runs a long job, so the short jobs it holds wait for that job although another worker is idle
(Celery's prefetch ×4; Celery's issues #1933, #4494, #6500); a worker that holds only the job it runs (prefetch ×1)
leaves them to the free worker. This is what fh-tasks' prefetch ×1 on Celery buys, against the drain throughput of
no-op jobs it costs (`bench.pairs`).

    python -m bench.pairs celery --only mixed
"""
from __future__ import annotations

import time
from typing import Any

from . import probe
from .common import percentile, wait_until
from .peers import Peer, job_arg

#: Defaults: 20 jobs/s for 20 s, one in 20 sleeping 0.3 s (one long job a second, so never two at once), 2 hosts.
RATE, SECONDS, EVERY, LONG_S, HOSTS = 20.0, 20.0, 20, 0.3, 2


def once(peer: Peer, *, hosts: int = HOSTS, rate: float = RATE, seconds: float = SECONDS, every: int = EVERY,
         long_s: float = LONG_S) -> dict[str, Any]:
    """One run: workers started, warmed up, then `rate * seconds` paced jobs; the short jobs' waits (ms) and how many
    long and short jobs ran."""
    peer.io = True  # before `reset`: an fh-tasks peer picks its task there
    peer.reset()
    d = peer.dir / f"mixed-{peer.rep}"
    d.mkdir()
    workers = peer.start_workers(1, d, tag=f"-mixed-{peer.rep}", hosts=hosts)
    alive = lambda: all(w.alive() for w in workers)  # noqa: E731
    try:
        deadline = time.monotonic() + 45
        while probe.writers(str(d)) < hosts:  # every worker up: each has run a job
            if time.monotonic() > deadline or not alive(): raise RuntimeError(f"{peer.label}: workers did not start")
            peer.put(job_arg())
            wait_until(lambda: probe.writers(str(d)) >= hosts, 0.25, 0.01)
        time.sleep(2.0)  # settle: connections made, the warm-up jobs' records written
        before, since = probe.count(str(d)), time.time()
        n = int(rate * seconds)
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0: time.sleep(delay)
            arg = job_arg()
            if i % every == every - 1: arg["sleep"] = long_s
            peer.put(arg)
        if not wait_until(lambda: probe.count(str(d)) >= before + n, 30 + n * long_s / every, 0.02, alive):
            raise RuntimeError(f"{peer.label}: {probe.count(str(d)) - before}/{n} mixed jobs ran")
    finally:
        peer.io = False
        peer.stop_workers(workers)
        peer.close()
    recs = probe.records(str(d), since)
    short = [(r[1] - r[0]) * 1000 for r in recs if r[2] - r[1] < long_s * 0.8]
    return {"p50_ms": percentile(short, 50), "p99_ms": percentile(short, 99), "max_ms": max(short),
            "short": len(short), "long": len(recs) - len(short)}
