"""The broker engines' job path in one process, without Celery or Dramatiq: what fh-tasks itself costs per job.
Jobs are stored in the status store (Redis) in batches of 500, then each is run as a Celery pool process runs it
(`run_job`: its `start`, the task, its success held for the next `start`). Prints CPU and wall time per job stored
and run, with the status store's commands packed by hiredis (the default where it is installed) and by redis-py's
own packer, the two alternating in processes of their own.

    python -m bench.jobpath                 # 4,000 jobs, 3 repetitions of each
    python -m bench.jobpath --jobs 2000 --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ensure_redis, log

MODES = ("hiredis", "redis-py")


def _run(jobs: int, mode: str, redis_url: str) -> dict[str, float]:
    "One measurement in this process: store `jobs` jobs, run them; CPU and wall seconds per job stored and run."
    from fh_tasks import Tasks
    from fh_tasks.engine import EngineSettings
    from fh_tasks.engines import status as status_module
    from fh_tasks.engines.celery import CeleryEngine
    if mode == "redis-py": status_module._hiredis_pack = None
    elif status_module._hiredis_pack is None: raise SystemExit("hiredis is not installed: pip install 'redis[hiredis]'")
    db = os.path.join(tempfile.mkdtemp(prefix="fh-jobpath-"), "outbox.db")
    tasks = Tasks(engine=CeleryEngine(EngineSettings(broker=f"{redis_url}/4", db=db, workers=0),
                                      namespace="jobpath"), workers=0)

    @tasks.task(name="jobpath.noop")
    def noop(arg: dict[str, object]) -> None:
        return None

    engine, task = tasks.engine, tasks.registry["jobpath.noop"]
    engine.status.clear()
    arg = {"t": time.time(), "user": 42, "tag": "bench"}
    warm = 50
    new = [task.new_job((arg,), {}, task.options) for _ in range(jobs + warm)]
    engine.status.insert(new[:warm])
    for job in new[:warm]: engine.run_job(job.id, task.name, [arg], {}, overlap=True)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(warm, len(new), 500): engine.status.insert(new[i:i + 500])
    for job in new[warm:]: engine.run_job(job.id, task.name, [arg], {}, overlap=True)
    engine.settle()
    c1, w1 = time.process_time(), time.perf_counter()
    engine.status.clear()
    tasks.close()
    return {"cpu": (c1 - c0) / jobs, "wall": (w1 - w0) / jobs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process: one measurement, as JSON
    ap.add_argument("--redis", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(_run(a.jobs, a.one, a.redis)))
        return 0
    url, proc = ensure_redis(Path(tempfile.mkdtemp(prefix="fh-jobpath-")))
    out: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    try:
        for rep in range(a.reps):
            for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
                r = subprocess.run([sys.executable, "-m", "bench.jobpath", "--one", mode, "--jobs", str(a.jobs),
                                    "--redis", url], capture_output=True, text=True, check=True)
                out[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
    finally:
        if proc is not None: proc.stop()
    med = {m: {k: statistics.median(x[k] for x in out[m]) for k in ("cpu", "wall")} for m in MODES}
    for m in MODES:
        reps = ", ".join(f"{1e6 * x['cpu']:.0f}" for x in out[m])
        log(f"  {m:9} CPU per job {1e6 * med[m]['cpu']:6.0f} µs   wall per job {1e6 * med[m]['wall']:6.0f} µs   "
            f"(CPU per rep: {reps})")
    log(f"  hiredis ÷ redis-py: CPU {med['hiredis']['cpu'] / med['redis-py']['cpu']:.2f}, "
        f"wall {med['hiredis']['wall'] / med['redis-py']['wall']:.2f} ({a.jobs:,} jobs, {a.reps} repetitions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
