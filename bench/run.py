"""Run the benchmark suite side by side and write bench/results.json, bench/RESULTS.md and bench/chart.png.

    python -m bench.run            # full run (3 repetitions)
    python -m bench.run --quick    # under two minutes, 1 repetition, smaller sizes
    python -m bench.run --only drain,pickup --peers fh-tasks,huey-sqlite --out /tmp/b
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import report
from .common import (
    ROOT,
    Settings,
    cpu_ticks,
    ensure_redis,
    log,
    machine,
    redis_version,
    source_revision,
    steal_since,
    versions,
)

SECTIONS = ("load", "request", "enqueue", "drain", "pickup", "memory", "cpu", "events")
#: Sections that measure peers on Redis; a run of the others needs no Redis server (nor the redis package).
REDIS_SECTIONS = frozenset({"load", "request", "enqueue", "drain", "pickup"})
PEERS = ("fh-tasks", "fh-tasks-async", "fh-tasks-full", "huey-sqlite", "huey-redis", "celery", "celery-late",
         "fh-celery", "dramatiq", "fh-dramatiq", "rq", "rq-simple", "arq")
NOTES = [
    "Section 0 (under load, `bench/load.py`): the harness process is the producer, deferring one job per call while "
    "the workers run; each job makes one Redis round trip (`INCR`, `bench/io_job.py`: a shared `redis.Redis` per "
    "process for sync tasks, a `redis.asyncio` client per event loop for async ones) before recording its times. "
    "Repetitions alternate between peers, and the goal ratios are taken within each repetition. arq runs only "
    "`async def` jobs; RQ's forking worker is left out (a fork per job outlasts the budget); the quick run measures "
    "fh-tasks, huey+Redis and Dramatiq only.",
    "Every job is a no-op whose body appends (enqueued, started, ended) times to a per-process file "
    "(`bench/probe.py`, one `os.write`); drain throughput runs from the first job's start to the last job's end, "
    "so worker start-up is not counted. Jobs carry a small JSON argument "
    "`{\"t\": ..., \"user\": 42, \"tag\": \"bench\"}`.",
    "fh-tasks runs with its defaults: SQLite file in WAL mode, `durability=\"normal\"` (`synchronous=NORMAL`: "
    "survives a process crash, a power loss may drop the last commits). huey's SqliteHuey keeps SQLite's default "
    "`synchronous` "
    "(see Machine), i.e. it fsyncs every commit when that is FULL; the `fh-tasks (durability=full)` enqueue row is the "
    "like-for-like comparison.",
    "Worker processes: each peer's own worker command runs as a subprocess (its own process group), stopped by PID "
    "with SIGTERM and a 10 s bound before SIGKILL. \"1 process\" means one process executing jobs (plus the library's "
    "supervisor where it has one, e.g. Celery's and Dramatiq's main process).",
    "RQ's default worker forks a work-horse per job, so its drain is bounded by time (†: jobs done within the budget); "
    "its jobs/s is done ÷ elapsed. `rq-simple` is RQ's SimpleWorker (no fork).",
    "arq polls Redis every 0.5 s by default (`poll_delay`), and huey's SQLite consumer polls with a 0.1 s initial "
    "delay backing off to 10 s: their pickup latencies are those defaults, not a flaw of the harness.",
    "Request overhead: each route runs in its own uvicorn process (one at a time, rotating order per repetition); "
    "huey's consumer and Celery's worker run beside the server during their routes, fh-tasks' worker runs inside the "
    "server process (`Tasks(app)` default: one in-process worker). (c) ÷ (b) is computed per repetition, then the "
    "median.",
    "Redis peers use their own Redis database numbers (9–13), flushed before each repetition.",
]


def _peer_env(workdir: Path) -> Any:
    from .peers import Env
    return Env(workdir, os.environ["BENCH_REDIS"])


def run_request(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import request
    return request.measure(s, workdir, os.environ["BENCH_REDIS"])


def _each_peer(measure: str, workdir: Path, peers: list[str], fn: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    from .peers import load
    out: dict[str, Any] = {}
    for key in peers:
        try:
            peer = load(key, _peer_env(workdir))
            if measure not in peer.measures: continue
            out[key] = fn(peer)
        except Exception as e:
            log(f"  {measure} {key}: FAILED: {e}")
            out[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    return out


def run_enqueue(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import enqueue
    return _each_peer("enqueue", workdir, peers, lambda p: enqueue.measure(p, s))


def run_drain(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import drain
    return _each_peer("drain", workdir, peers,
                      lambda p: drain.measure(p, s, (1, 2) if p.key == "fh-tasks" else s.drain_procs))


def run_pickup(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import pickup
    redis = os.environ["BENCH_REDIS"]
    out: dict[str, Any] = {}
    plan: list[tuple[str, str, str, str, Callable[[], dict[str, Any]]]] = []
    if "fh-tasks" in peers:
        plan += [("fh-inproc", "fh-tasks", "in-process: producer on the worker's event loop", "",
                  lambda: pickup.fh_in_process(s, workdir)),
                 ("fh-uvicorn", "fh-tasks", "in-process under uvicorn: the request handler defers", "",
                  lambda: pickup.via_server("fh", s, workdir, redis))]
    plan.append(("starlette", "Starlette BackgroundTask", "in-process under uvicorn (floor, not durable)", "fh-uvicorn",
                 lambda: pickup.via_server("starlette", s, workdir, redis)))
    ref = "fh-tasks" if "fh-tasks" in peers else ""
    for key in peers:
        plan.append((key, report.LABELS.get(key, key), "cross-process: worker subprocess", ref,
                     lambda key=key: _cross(key, s, workdir)))
    for key, label, how, ref_, fn in plan:
        try:
            r = fn()
            if r is None: continue
            out[key] = {"label": label, "how": how, "ref": ref_, **r}
            pickup.show(f"{label} ({how.split(':')[0]})", r)
        except Exception as e:
            log(f"  pickup {label}: FAILED: {e}")
            out[key] = {"label": label, "how": how, "error": f"{type(e).__name__}: {e}"[:2000]}
    return out


def _cross(key: str, s: Settings, workdir: Path) -> dict[str, Any] | None:
    from . import pickup
    from .peers import load
    peer = load(key, _peer_env(workdir))
    return pickup.cross_process(peer, s) if "pickup" in peer.measures else None


def run_load(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import load
    return load.measure(s, workdir, os.environ["BENCH_REDIS"], peers)


def run_memory(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import memory
    return memory.measure(s, _peer_env(workdir))


def run_cpu(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import cpu
    return cpu.measure(s, workdir)


def run_events(s: Settings, workdir: Path, peers: list[str]) -> dict[str, Any]:
    from . import events
    return events.measure(s, workdir)


RUNNERS = {"load": run_load, "request": run_request, "enqueue": run_enqueue, "drain": run_drain, "pickup": run_pickup,
           "memory": run_memory, "cpu": run_cpu, "events": run_events}


def _sqlite_default_synchronous(workdir: Path) -> str:
    c = sqlite3.connect(workdir / "probe-sync.db")
    try:
        c.execute("PRAGMA journal_mode=WAL")
        v = c.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        c.close()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(v, str(v))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repetition, smaller sizes (< 2 minutes)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated peers of {','.join(PEERS)}")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="where results.json, RESULTS.md and chart.png go")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (databases, logs)")
    a = ap.parse_args(argv)
    only = [x for x in a.only.split(",") if x]
    peers = [x for x in a.peers.split(",") if x]
    if bad := [x for x in only if x not in SECTIONS] + [x for x in peers if x not in PEERS]:
        ap.error(f"unknown section or peer: {', '.join(bad)}")
    s = Settings.fast() if a.quick else Settings.full()
    workdir = Path(tempfile.mkdtemp(prefix="fh-bench-"))
    t0 = time.monotonic()
    redis, redis_proc = ensure_redis(workdir) if REDIS_SECTIONS.intersection(only) else ("", None)
    os.environ["BENCH_REDIS"] = redis
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "source": source_revision(), "machine": machine(),
            "versions": versions(), "redis": redis, "redis_version": redis_version(redis) if redis else None,
            "sqlite_default_synchronous": _sqlite_default_synchronous(workdir),
            "sections": only, "peers": peers, "private_redis": redis_proc is not None}
    res: dict[str, Any] = {"meta": meta, "settings": asdict(s), "errors": {}, "notes": list(NOTES)}
    log(f"fh-tasks benchmark ({'quick' if s.quick else 'full'}), work dir {workdir}, Redis {redis or 'not needed'}")
    meta["steal_pct"] = steal = {}  # CPU time taken by the hypervisor (a shared host), per section and overall
    run_ticks = cpu_ticks()
    try:
        for name in only:
            log(f"-- {name}")
            ticks = cpu_ticks()
            try:
                res[name] = RUNNERS[name](s, workdir, peers)
            except Exception as e:
                log(f"  {name}: FAILED: {e}")
                res["errors"][name] = traceback.format_exc()[-3000:]
            steal[name] = steal_since(ticks)
            if steal[name]: log(f"  {name}: the hypervisor took {steal[name]} % of the CPU time (steal)")
        steal["run"] = steal_since(run_ticks)
    finally:
        if redis_proc is not None: redis_proc.stop()
        if not a.keep: shutil.rmtree(workdir, ignore_errors=True)
    res["meta"]["seconds"] = time.monotonic() - t0
    res["goals"] = report.goals(res)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / "RESULTS.md").write_text(report.markdown(res))
    if res.get("drain") or res.get("request"): report.chart(res, out / "chart.png")
    print()
    print("\n".join(report.tables(res)))
    log(f"wrote {out / 'results.json'}, {out / 'RESULTS.md'}, {out / 'chart.png'} in {res['meta']['seconds']:.0f} s")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
