"""Pickup latency: jobs enqueued at a steady ~100/s; p50/p99 of (start - enqueue) as each job records it.

fh-tasks is measured in-process (worker on the producer's event loop; and under uvicorn, producer = the request
handler) and cross-process (worker subprocess, producer in this process). Starlette's BackgroundTask under the
same uvicorn app is the floor. The other peers run their worker as a subprocess with the producer here.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import probe
from .common import Settings, log, percentile, stat, wait_until
from .peers import Peer, job_arg


def _paced(put: Callable[[dict[str, Any]], Any], rate: float, seconds: float) -> int:
    n = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0: time.sleep(delay)
        put(job_arg())
    return n


def _rounds(put: Callable[[dict[str, Any]], Any], d: Path, s: Settings, alive: Callable[[], bool]) -> dict[str, Any]:
    "Warm up until one job has run, then `s.reps` paced rounds; latency stats per round."
    deadline = time.monotonic() + 45
    while probe.count(str(d)) == 0:
        if time.monotonic() > deadline or not alive(): raise RuntimeError("no job ran within 45s")
        put(job_arg())
        wait_until(lambda: probe.count(str(d)) > 0, 0.25, 0.01)
    time.sleep(1.5)  # settle: connections made, fh-tasks' producer has re-read its list of workers to wake
    lats = []
    for _ in range(s.reps):
        before, since = probe.count(str(d)), time.time()
        target = before + _paced(put, s.pickup_rate, s.pickup_seconds)
        wait_until(lambda target=target: probe.count(str(d)) >= target, 15, 0.02, alive)
        lats.append([(r[1] - r[0]) * 1000 for r in probe.records(str(d), since)])
        time.sleep(0.3)
    return _stats(lats)


def _stats(lats: list[list[float]]) -> dict[str, Any]:
    "p50, p99 and max of each round's latencies (ms), summarised over the rounds."
    lats = [x for x in lats if x]
    return {"p50_ms": stat([percentile(x, 50) for x in lats]), "p99_ms": stat([percentile(x, 99) for x in lats]),
            "max_ms": stat([max(x) for x in lats]), "jobs": [len(x) for x in lats]}


def cross_process(peer: Peer, s: Settings) -> dict[str, Any]:
    "One worker subprocess, producer in this process."
    peer.reset()
    d = peer.dir / f"pickup-{peer.rep}"
    d.mkdir()
    workers = peer.start_workers(1, d, tag=f"-pickup-{peer.rep}")
    try:
        out = _rounds(peer.put, d, s, lambda: any(w.alive() for w in workers))
    finally:
        peer.stop_workers(workers)
        peer.close()
    return out


def via_server(variant: str, s: Settings, workdir: Path, redis: str) -> dict[str, Any]:
    "Producer = the request handler of the benchmark app under uvicorn, paced GETs from here."
    import httpx

    from .request import serve
    d = workdir / "pickup" / variant
    d.mkdir(parents=True, exist_ok=True)
    with serve(variant, workdir, redis, d, f"pickup-{variant}") as url, httpx.Client(timeout=10) as c:
        return _rounds(lambda _arg: c.get(url).raise_for_status(), d, s, lambda: True)


def fh_in_process(s: Settings, workdir: Path) -> dict[str, Any]:
    "fh-tasks' in-process worker on this event loop; the producer defers on the same loop (one commit per job)."
    from .peers.fh_peer import make_hub
    d = workdir / "pickup" / "fh-inproc"
    d.mkdir(parents=True, exist_ok=True)
    os.environ[probe.ENV] = str(d)
    probe.reset()
    return asyncio.run(_fh_in_process(make_hub(str(d / "jobs.db"), workers=1), d, s))


async def _fh_in_process(hub: Any, d: Path, s: Settings) -> dict[str, Any]:
    await hub.start()
    noop = hub.registry["bench.noop"]
    try:
        noop.defer(job_arg())
        for _ in range(500):
            if probe.count(str(d)): break
            await asyncio.sleep(0.01)
        lats = []
        for _ in range(s.reps):
            before, since, n = probe.count(str(d)), time.time(), int(s.pickup_rate * s.pickup_seconds)
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / s.pickup_rate - time.perf_counter()
                if delay > 0: await asyncio.sleep(delay)
                noop.defer(job_arg())
            for _ in range(1500):
                if probe.count(str(d)) >= before + n: break
                await asyncio.sleep(0.01)
            lats.append([(r[1] - r[0]) * 1000 for r in probe.records(str(d), since)])
        return _stats(lats)
    finally:
        await hub.stop()
        hub.store.close()
        probe.reset()


def show(label: str, r: dict[str, Any]) -> None:
    log(f"  pickup {label:34} p50 {r['p50_ms']['median']:8.2f} ms   p99 {r['p99_ms']['median']:8.2f} ms")
