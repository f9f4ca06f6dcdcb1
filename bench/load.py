"""Under load: a producer defers jobs one call at a time while the workers drain them; each job makes one Redis round
trip (`bench/io_job.py`). Measured for every peer, repetitions alternating between peers (ratios are paired within
a repetition):

- drain: the producer (this process) defers `load_jobs` jobs as fast as it can while 1 or 2 worker processes run
  them; jobs/s from the first job's start to the last job's end;
- pickup: the producer defers at a steady 100 and 1,000 jobs/s to one worker process; p50/p99 of start − enqueue;
- in-process: fh-tasks' in-process worker (`Tasks(app)`'s default, on the producer's event loop, async task) against
  Starlette's `BackgroundTask` (run on the same loop, stores nothing), same producer loop and job body.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from . import probe
from .common import Settings, flush_redis, log, percentile, stat, wait_until
from .io_job import URL as IO_URL
from .io_job import aroundtrip
from .peers import Env, Peer, job_arg, load
from .pickup import _paced

#: Seconds a worker gets to start and run its first job.
STARTUP = 45.0
#: The Redis-backed peers (the goals compare fh-tasks with the best of them).
REDIS_PEERS = ("huey-redis", "dramatiq", "celery", "rq-simple", "arq")
#: The peers of the quick run (`--quick`): fh-tasks and the Redis peers the goals compare it with.
QUICK_PEERS = ("fh-tasks", "fh-tasks-async", "huey-redis", "dramatiq")
#: Peers whose jobs are `async def` (fh-tasks' async variant; arq runs only coroutines).
ASYNC_PEERS = ("fh-tasks-async", "arq")


def _warm(peer: Peer, d: Path, alive: Any) -> None:
    "Defer jobs until one has run (the workers are up), then let connections settle."
    deadline = time.monotonic() + STARTUP
    while probe.count(str(d)) == 0:
        if time.monotonic() > deadline or not alive(): raise RuntimeError(f"{peer.label}: no job ran within {STARTUP}s")
        peer.put(job_arg())
        wait_until(lambda: probe.count(str(d)) > 0, 0.25, 0.01)
    time.sleep(1.5)  # the second process is up too; fh-tasks' producer has re-read its list of workers to ring


def drain_once(peer: Peer, procs: int, n: int, budget: float) -> dict[str, Any]:
    "`procs` worker processes drain while this process defers `n` jobs one call at a time."
    peer.io = True
    peer.reset()
    d = peer.dir / f"load-{procs}p-{peer.rep}"
    d.mkdir()
    workers = peer.start_workers(procs, d, tag=f"-load{procs}-{peer.rep}")
    alive = lambda: any(w.alive() for w in workers)  # noqa: E731
    try:
        _warm(peer, d, alive)
        base, since = probe.count(str(d)), time.time()
        t0, sent = time.perf_counter(), 0
        while sent < n and time.perf_counter() - t0 < budget:  # a producer slowed down by its store stops in time
            peer.put_many(min(100, n - sent))
            sent += min(100, n - sent)
        produced = time.perf_counter() - t0
        wait_until(lambda: probe.count(str(d)) >= base + sent, budget, 0.01, alive)
    finally:
        peer.stop_workers(workers)
    recs = probe.records(str(d), since)
    if not recs: raise RuntimeError(f"{peer.label}: no job ran")
    first, last = min(r[1] for r in recs), max(r[2] for r in recs)
    return {"done": len(recs), "rate": len(recs) / max(last - first, 1e-9), "produce_rate": sent / produced}


def pickup_once(peer: Peer, rates: tuple[float, ...], seconds: float) -> dict[str, Any]:
    "One worker process; the producer defers at each steady rate in turn; p50/p99/max of start − enqueue (ms)."
    peer.io = True
    peer.reset()
    d = peer.dir / f"load-pickup-{peer.rep}"
    d.mkdir()
    workers = peer.start_workers(1, d, tag=f"-loadpickup-{peer.rep}")
    alive = lambda: any(w.alive() for w in workers)  # noqa: E731
    out: dict[str, Any] = {}
    try:
        _warm(peer, d, alive)
        for rate in rates:
            before, since = probe.count(str(d)), time.time()
            target = before + _paced(peer.put, rate, seconds)
            wait_until(lambda target=target: probe.count(str(d)) >= target, 15, 0.02, alive)
            lat = [(r[1] - r[0]) * 1000 for r in probe.records(str(d), since)]
            out[str(int(rate))] = {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=0),
                                   "jobs": len(lat)}
            time.sleep(0.3)
    finally:
        peer.stop_workers(workers)
    return out


# -- in-process: fh-tasks' worker on the producer's loop vs Starlette's BackgroundTask ---------------
async def _inproc_fh(db: str, n: int, d: Path, budget: float) -> None:
    from .peers.fh_peer import make_hub
    hub = make_hub(db, workers=1)
    await hub.start()
    aio = hub.registry["bench.aio"]
    try:
        for _ in range(n):
            aio.defer(job_arg())
            await asyncio.sleep(0)
        deadline = time.monotonic() + budget
        while probe.count(str(d)) < n and time.monotonic() < deadline: await asyncio.sleep(0.005)
    finally:
        await hub.stop()
        hub.store.close()


async def _inproc_starlette(n: int, d: Path, budget: float) -> None:
    from starlette.background import BackgroundTask
    running = set()
    for _ in range(n):
        t = asyncio.ensure_future(BackgroundTask(aroundtrip, job_arg())())
        running.add(t)
        t.add_done_callback(running.discard)
        await asyncio.sleep(0)
    deadline = time.monotonic() + budget
    while probe.count(str(d)) < n and time.monotonic() < deadline: await asyncio.sleep(0.005)


def inproc_once(variant: str, workdir: Path, rep: int, n: int, budget: float) -> float:
    d = workdir / "load-inproc" / f"{variant}-{rep}"
    d.mkdir(parents=True)
    os.environ[probe.ENV] = str(d)
    probe.reset()
    try:
        if variant == "fh-tasks": asyncio.run(_inproc_fh(str(d / "jobs.db"), n, d, budget))
        else: asyncio.run(_inproc_starlette(n, d, budget))
    finally:
        probe.reset()
    recs = probe.records(str(d))
    first, last = min(r[1] for r in recs), max(r[2] for r in recs)
    return len(recs) / max(last - first, 1e-9)


# -- the section ---------------------------------------------------------------------------------------
def measure(s: Settings, workdir: Path, redis: str, peers: list[str]) -> dict[str, Any]:
    "Every repetition runs every peer (and process count) once, so the ratios are paired within a repetition."
    env = Env(workdir, redis)
    loaded: dict[str, Peer] = {}
    for key in peers:
        if s.quick and key not in QUICK_PEERS: continue
        try:
            p = load(key, env)
            if "load" in p.measures: loaded[key] = p
        except Exception as e:
            log(f"  load {key}: cannot load: {e}")
    drain: dict[str, dict[str, list[Any]]] = {k: {"1": [], "2": []} for k in loaded}
    produce: dict[str, list[float]] = {k: [] for k in loaded}
    pick: dict[str, dict[str, dict[str, list[float]]]] = {k: {} for k in loaded}
    inproc: dict[str, list[float | None]] = {"fh-tasks": [], "starlette": []}
    errors: dict[str, str] = {}
    for rep in range(s.reps):
        flush_redis(IO_URL)
        for key, peer in loaded.items():
            _drains(s, rep, key, peer, drain[key], produce[key], errors)
            if key != "fh-tasks-async": _pickups(s, rep, key, peer, pick[key], errors)  # one sync row per library
        for variant in ("fh-tasks", "starlette") if rep % 2 == 0 else ("starlette", "fh-tasks"):
            try:
                v = inproc_once(variant, workdir, rep, s.load_jobs, s.load_budget)
                log(f"  load rep {rep + 1} in-process {variant:10}: {v:>8,.0f} jobs/s")
                inproc[variant].append(v)
            except Exception as e:
                log(f"  load in-process {variant}: FAILED: {e}")
                errors[f"in-process {variant}"] = str(e)[:500]
                inproc[variant].append(None)
    for p in loaded.values(): p.close()
    return {"jobs": s.load_jobs, "rates": list(s.load_rates), "seconds": s.load_seconds, "reps": s.reps,
            "concurrency": {k: p.concurrency for k, p in loaded.items()},
            "drain": {k: {p: stat(v) | {"values_by_rep": v} for p, v in x.items() if v} for k, x in drain.items()},
            "produce": {k: stat(v) for k, v in produce.items()},
            "pickup": {k: {r: {m: stat(v) for m, v in x.items()} for r, x in by.items()} for k, by in pick.items()},
            "inproc": {k: stat(v) | {"values_by_rep": v} for k, v in inproc.items()},
            "ratios": _ratios(drain, inproc, s.reps), "errors": errors}


def _drains(s: Settings, rep: int, key: str, peer: Peer, drain: dict[str, list[Any]], produce: list[float],
            errors: dict[str, str]) -> None:
    for procs in (1, 2) if key.startswith("fh-tasks") else s.drain_procs:
        try:
            r = drain_once(peer, procs, s.load_jobs, s.load_budget)
            part = "" if r["done"] >= s.load_jobs else f" (partial: {r['done']}/{s.load_jobs})"
            log(f"  load rep {rep + 1} {peer.label:16} x{procs}: {r['rate']:>8,.0f} jobs/s   producer "
                f"{r['produce_rate']:>8,.0f}/s{part}")
            drain[str(procs)].append(r["rate"] if r["done"] >= s.load_jobs else None)
            if procs == 1: produce.append(r["produce_rate"])
        except Exception as e:
            log(f"  load {peer.label} x{procs}: FAILED: {e}")
            errors[f"{key} x{procs}"] = str(e)[:500]
            drain[str(procs)].append(None)


def _pickups(s: Settings, rep: int, key: str, peer: Peer, pick: dict[str, dict[str, list[float]]],
             errors: dict[str, str]) -> None:
    try:
        for rate, x in pickup_once(peer, s.load_rates, s.load_seconds).items():
            for k, v in x.items(): pick.setdefault(rate, {}).setdefault(k, []).append(v)
            log(f"  load rep {rep + 1} {peer.label:16} pickup at {rate}/s: p50 {x['p50']:6.2f} ms  "
                f"p99 {x['p99']:6.2f} ms  max {x['max']:6.1f} ms")
    except Exception as e:
        log(f"  load pickup {peer.label}: FAILED: {e}")
        errors[f"{key} pickup"] = str(e)[:500]


def _paired(a: list[Any], b: list[Any], reps: int) -> list[float]:
    return [a[i] / b[i] for i in range(reps) if i < len(a) and i < len(b) and a[i] and b[i]]


def _ratios(drain: dict[str, dict[str, list[Any]]], inproc: dict[str, list[Any]], reps: int) -> dict[str, Any]:
    "The goals' ratios, each computed within a repetition, then summarised (median, min–max)."
    def best(procs: str, keys: tuple[str, ...]) -> list[float | None]:
        out: list[float | None] = []
        for i in range(reps):
            vals = [drain[k][procs][i] for k in keys if k in drain and i < len(drain[k][procs]) and drain[k][procs][i]]
            out.append(max(vals) if vals else None)
        return out
    fh1, fh2 = drain.get("fh-tasks", {}).get("1", []), drain.get("fh-tasks", {}).get("2", [])
    fa1 = drain.get("fh-tasks-async", {}).get("1", [])
    huey = drain.get("huey-redis", {}).get("1", [])
    return {"fh2_over_fh1": stat(_paired(fh2, fh1, reps)),
            "fh2_over_best_redis2": stat(_paired(fh2, best("2", REDIS_PEERS), reps)),
            "fh1_over_huey_redis1": stat(_paired(fh1, huey, reps)),
            "fh_async1_over_huey_redis1": stat(_paired(fa1, huey, reps)),
            "inproc_over_starlette": stat(_paired(inproc["fh-tasks"], inproc["starlette"], reps))}
