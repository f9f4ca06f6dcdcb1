"""Shared harness pieces: run settings, subprocesses stopped by PID, Redis, statistics, machine facts."""
from __future__ import annotations

import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass(frozen=True)
class Settings:
    "Sizes and durations of one run; `quick()` keeps the whole run under two minutes."
    quick: bool = False
    reps: int = 3
    request_seconds: float = 5.0
    request_warmup: float = 1.0
    connections: int = 8
    enqueue_single: int = 5_000
    enqueue_batch: int = 20_000
    batch_size: int = 100
    drain_jobs: int = 10_000
    drain_budget: float = 15.0
    pickup_rate: float = 100.0
    pickup_seconds: float = 4.0
    memory_depths: tuple[int, ...] = (1_000, 1_000_000)
    memory_seconds: float = 3.0
    cpu_jobs: int = 8
    cpu_work: int = 6_000_000
    #: Process counts of the drain per peer (quick mode: 2 processes for fh-tasks only).
    drain_procs: tuple[int, ...] = (1, 2)
    #: The load scenario (bench/load.py): jobs deferred while the workers drain, seconds they get, paced rates.
    load_jobs: int = 10_000
    load_budget: float = 30.0
    load_rates: tuple[float, ...] = (100.0, 1000.0)
    load_seconds: float = 3.0

    @classmethod
    def full(cls) -> Settings:
        return cls()

    @classmethod
    def fast(cls) -> Settings:
        return cls(quick=True, reps=1, request_seconds=2.0, request_warmup=1.0, enqueue_single=1_000,
                   enqueue_batch=5_000, drain_jobs=2_000, drain_budget=4.0, pickup_seconds=1.0,
                   memory_depths=(1_000, 100_000), memory_seconds=1.0, cpu_jobs=4, cpu_work=4_000_000, drain_procs=(1,),
                   load_jobs=2_000, load_budget=10.0, load_seconds=1.0)


# -- subprocesses ----------------------------------------------------------------------------------
class Proc:
    "A subprocess in its own process group, stopped by its PID with a bounded wait."

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None,
                 cwd: Path = ROOT) -> None:
        self.args = list(args)
        self.log = log
        out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.p = subprocess.Popen(self.args, env=full_env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        if log: out.close()  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        "Signal the process group this process leads; SIGKILL it after `timeout` seconds."
        if self.p.poll() is None:
            _killpg(self.p.pid, sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        _killpg(self.p.pid, signal.SIGKILL)  # pool children left behind by a parent that exited

    def tail(self, n: int = 15) -> str:
        if not self.log or not self.log.exists(): return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _killpg(pgid: int, sig: int) -> None:
    try: os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError): pass


def stop_all(procs: Sequence[Proc], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    for p in procs:
        if p.alive(): _killpg(p.pid, sig)
    for p in procs: p.stop(sig, timeout)


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.01,
               alive: Callable[[], bool] | None = None) -> bool:
    "Poll `cond` until true or `timeout` seconds pass (or `alive` turns false); True when it held."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond(): return True
        if alive is not None and not alive(): return cond()
        time.sleep(interval)
    return cond()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"server exited before listening on {port}:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2): return
        except OSError: time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# -- Redis -----------------------------------------------------------------------------------------
def _pong(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def ensure_redis(workdir: Path) -> tuple[str, Proc | None]:
    "A Redis base URL (no DB number): 127.0.0.1:6379 if it answers, else a private redis-server on a free port."
    url = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
    host, port = url.split("//")[1].split(":")
    if _pong(host, int(port)): return url, None
    port_ = free_port()
    p = Proc(["redis-server", "--port", str(port_), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
              "--dir", str(workdir)], log=workdir / "redis.log")
    if not wait_until(lambda: _pong("127.0.0.1", port_), 10, 0.05):
        p.stop()
        raise RuntimeError(f"could not start redis-server:\n{p.tail()}")
    return f"redis://127.0.0.1:{port_}", p


def flush_redis(url: str) -> None:
    "Empty one Redis database (the URL names its number)."
    import redis
    r = redis.Redis.from_url(url)
    try: r.flushdb()
    finally: r.close()


# -- statistics ------------------------------------------------------------------------------------
def stat(values: Sequence[float]) -> dict[str, Any]:
    "Median, min and max of the repetitions (None when nothing was measured)."
    vals = [v for v in values if v is not None]
    if not vals: return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": [round(v, 4) for v in vals]}


def percentile(values: Sequence[float], q: float) -> float:
    "The q-th percentile (0..100) by nearest rank."
    s = sorted(values)
    if not s: return float("nan")
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


# -- machine ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    "CPU, cores, load, Python, SQLite and server versions."
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): cpu = line.split(":", 1)[1].strip(); break
    except OSError: pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"): mem = round(int(line.split()[1]) / 1024 / 1024, 1); break
    except OSError: pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "os": platform.platform(),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "wrk": _cmd_version(["wrk", "-v"])}


def cpu_ticks() -> tuple[int, int] | None:
    "(steal, total) CPU ticks of all cores since boot, from /proc/stat; None where there is no /proc/stat."
    try: f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError): return None
    return (f[7] if len(f) > 7 else 0), sum(f)


def busy_seconds() -> float | None:
    "CPU seconds all cores spent running anything since boot (not idle, waiting on I/O or stolen), from /proc/stat."
    try: f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError): return None
    return (sum(f) - f[3] - f[4] - (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


def steal_since(start: tuple[int, int] | None) -> float | None:
    "The share (%) of CPU time the hypervisor took from this machine since `start` (`cpu_ticks()`)."
    end = cpu_ticks()
    if start is None or end is None or end[1] <= start[1]: return None
    return round(100 * (end[0] - start[0]) / (end[1] - start[1]), 1)


def source_revision() -> dict[str, Any]:
    "The git commit of the tree measured, and whether fh_tasks/ had uncommitted changes."
    def git(*args: str) -> str:
        try: return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.TimeoutExpired): return ""
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "fh_tasks_modified": bool(git("status", "--porcelain", "--", "fh_tasks"))}


def _cmd_version(cmd: list[str]) -> str | None:
    try: out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired): return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def redis_version(url: str) -> str | None:
    import redis
    try:
        r = redis.Redis.from_url(url + "/0")
        try: return str(r.info("server")["redis_version"])
        finally: r.close()
    except Exception:
        return None


PACKAGES = ("fh-tasks", "python-fasthtml", "starlette", "uvicorn", "huey", "celery", "kombu", "dramatiq", "rq",
            "arq", "redis", "hiredis", "httpx")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try: out[name] = metadata.version(name)
        except metadata.PackageNotFoundError: out[name] = None
    return out


def log(msg: str) -> None:
    print(msg, flush=True)
