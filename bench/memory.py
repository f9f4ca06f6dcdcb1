"""Worker memory against queue depth: peak RSS of an fh-tasks worker process while it runs jobs from a queue of
1,000 and of 1,000,000 jobs (the big queue is built with the store's `enqueue(list)`, one executemany per chunk)."""
from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from . import probe
from .common import Settings, log, stat, wait_until
from .peers import Env

CHUNK = 50_000


def build(db: str, depth: int) -> float:
    "Queue `depth` no-op jobs in `db`; returns jobs/s of the bulk insert."
    from fh_tasks.store import NewJob

    from .peers.fh_peer import make_hub
    hub = make_hub(db)
    t0 = time.perf_counter()
    try:
        for start in range(0, depth, CHUNK):
            now = time.time()
            args = f'{{"args":[{{"t":{now!r},"user":42,"tag":"bench"}}]}}'
            hub.store.enqueue([NewJob(id=uuid.uuid4().hex, task="bench.noop", args=args, run_at=now, created_at=now)
                               for _ in range(min(CHUNK, depth - start))])
    finally:
        hub.store.close()
    return depth / (time.perf_counter() - t0)


def rss_mb(pid: int) -> float:
    import psutil
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    total = 0
    for q in procs:
        try: total += q.memory_info().rss
        except psutil.Error: pass
    return total / 2**20


def peak_rss(env: Env, template: Path, seconds: float, tag: str) -> float:
    "Start a worker on a copy of `template`, sample its RSS every 20 ms for `seconds` once jobs run; the peak (MiB)."
    from .peers.fh_peer import FhTasks
    db = template.with_name(f"{template.stem}-{tag}.db")
    for suffix in ("", "-wal"):  # a fresh copy each time: the worker drains the queue it measures
        if Path(f"{template}{suffix}").exists(): shutil.copyfile(f"{template}{suffix}", f"{db}{suffix}")
    peer = FhTasks(env)
    peer.db = str(db)
    d = db.parent / f"probe-{db.stem}"
    d.mkdir()
    (w,) = peer.start_workers(1, d, tag=f"-mem-{tag}")
    try:
        if not wait_until(lambda: probe.count(str(d)) > 0, 45, 0.02, w.alive):
            raise RuntimeError(f"the worker ran no job within 45s:\n{w.tail()}")
        peak, end = 0.0, time.monotonic() + seconds
        while time.monotonic() < end and w.alive():
            peak = max(peak, rss_mb(w.pid))
            time.sleep(0.02)
        return peak
    finally:
        w.stop()
        for suffix in ("", "-wal", "-shm"): Path(f"{db}{suffix}").unlink(missing_ok=True)


def measure(s: Settings, env: Env) -> dict[str, Any]:
    "Peak worker RSS per queue depth (median over repetitions) and the ratio deepest/shallowest."
    out: dict[str, Any] = {"depths": {}}
    base = env.workdir / "memory"
    base.mkdir(exist_ok=True)
    for depth in s.memory_depths:
        db = base / f"depth-{depth}.db"
        rate = build(str(db), depth)
        peaks = [peak_rss(env, db, s.memory_seconds, str(i)) for i in range(s.reps)]
        out["depths"][str(depth)] = {"rss_mb": stat(peaks), "build_jobs_per_s": rate,
                                     "db_mb": db.stat().st_size / 2**20}
        for suffix in ("", "-wal", "-shm"): Path(f"{db}{suffix}").unlink(missing_ok=True)
        log(f"  memory depth {depth:>9,}: peak RSS {stat(peaks)['median']:7.1f} MiB"
            f"   (queue built at {rate:,.0f} jobs/s)")
    lo, hi = str(min(s.memory_depths)), str(max(s.memory_depths))
    out["ratio_deep_shallow"] = out["depths"][hi]["rss_mb"]["median"] / out["depths"][lo]["rss_mb"]["median"]
    return out
