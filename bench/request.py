"""Request overhead: the same FastHTML page under real uvicorn on loopback, with and without each task system.

Load comes from Debian's `wrk` (fixed duration, fixed connections, --latency for p50/p99). Each variant runs
in its own server process (plus its consumer, when it has one), one at a time, in a rotating order per repetition.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .common import PY, Proc, Settings, flush_redis, free_port, log, stat, stop_all, wait_port

VARIANTS = {
    "plain": "(a) page",
    "starlette": "(b) page + Starlette BackgroundTask",
    "fh": "(c) page + fh-tasks job",
    "huey": "(d) page + huey SqliteHuey enqueue",
    "celery": "(e) page + Celery .delay() (Redis)",
}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@contextmanager
def serve(variant: str, workdir: Path, redis: str, probe_dir: Path, tag: str,
          extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Start the app (and the variant's consumer) on a free port; yield its URL; stop everything by PID. `extra_env`:
    more environment for the processes (`bench/versus.py` sets PYTHONPATH to another version of fh-tasks)."""
    from .probe import ENV
    d = workdir / "request"
    d.mkdir(exist_ok=True)
    port = free_port()
    env = {"BENCH_VARIANT": variant, ENV: str(probe_dir), "BENCH_REDIS": redis, "BENCH_FH_DB": str(d / f"fh-{tag}.db"),
           "BENCH_HUEY_KIND": "sqlite", "BENCH_HUEY_TARGET": str(d / f"huey-{tag}.db"), **(extra_env or {})}
    side: list[Proc] = []
    if variant == "huey":
        side.append(Proc([PY, "-m", "huey.bin.huey_consumer", "bench.peers.huey_peer.huey", "-k", "thread", "-w", "1",
                          "-q"], env=env, log=d / f"huey-{tag}.log"))
    if variant == "celery":
        from .peers.celery_peer import BROKER
        flush_redis(BROKER)
        side.append(Proc([PY, "-m", "celery", "-A", "bench.peers.celery_peer:app", "worker", "-P", "prefork", "-c", "1",
                          "-l", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"],
                         env=env, log=d / f"celery-{tag}.log"))
    server = Proc([PY, "-m", "uvicorn", "bench.request_app:app", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"], env=env, log=d / f"server-{variant}-{tag}.log")
    try:
        wait_port(port, proc=server)
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_all([server, *side])


def wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    "Run wrk for `seconds` and parse requests/s, p50, p99 (ms) and errors."
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    pct = {m[0]: float(m[1]) * _UNITS[m[2]] for m in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors:.*", out)
    if not rps or "50" not in pct: raise RuntimeError(f"could not parse wrk output:\n{out}")
    return {"rps": float(rps[1]), "p50": pct["50"], "p99": pct.get("99"), "non2xx": int(bad[1]) if bad else 0,
            "socket_errors": errs[0] if errs else None}


def warm(url: str, seconds: float, connections: int) -> None:
    import httpx
    for _ in range(20): httpx.get(url, timeout=10).raise_for_status()
    wrk(url, seconds, connections)


def measure(s: Settings, workdir: Path, redis: str) -> dict[str, Any]:
    "Requests/s, p50 and p99 per variant (median and min-max over the repetitions), and the (c)/(b) ratios."
    if not shutil.which("wrk"): raise RuntimeError("wrk is not installed (Debian package `wrk`)")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    keys = list(VARIANTS)
    for rep in range(s.reps):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for v in order:
            probe_dir = workdir / "request" / f"probe-{v}-{rep}"
            probe_dir.mkdir(parents=True, exist_ok=True)
            with serve(v, workdir, redis, probe_dir, f"{v}-{rep}") as url:
                warm(url, s.request_warmup, s.connections)
                r = wrk(url, s.request_seconds, s.connections)
            runs[v].append(r)
            log(f"  request {VARIANTS[v]:38} {r['rps']:>8,.0f} req/s  p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms")
            time.sleep(0.3)
    out: dict[str, Any] = {"tool": f"wrk -t1 -c{s.connections} -d{round(s.request_seconds)}s --latency",
                           "variants": {}}
    for v, rs in runs.items():
        out["variants"][v] = {"label": VARIANTS[v], "rps": stat([r["rps"] for r in rs]),
                              "p50_ms": stat([r["p50"] for r in rs]), "p99_ms": stat([r["p99"] for r in rs]),
                              "non2xx": sum(r["non2xx"] for r in rs),
                              "socket_errors": [r["socket_errors"] for r in rs if r["socket_errors"]]}
    # Ratios within each repetition (same minute of machine noise), then their median.
    pairs = list(zip(runs["fh"], runs["starlette"], strict=True))
    out["ratio_c_b"] = {k: stat([c[k] / b[k] for c, b in pairs]) for k in ("p50", "p99", "rps")}
    return out
