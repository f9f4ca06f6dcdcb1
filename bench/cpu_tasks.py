"""CPU-bound jobs drained by an fh-tasks burst worker: `process=True` (process pool) or a plain task (thread pool).

Run as `python -c "import bench.cpu_tasks as m; m.main()" --mode process|thread --jobs N --work W` with
BENCH_CPU_DB naming the database (pool children import this module by name, so it must not be `__main__`);
prints the drain's seconds as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from fh_tasks import Tasks
from fh_tasks.testing import drain

from .probe import record


def burn(work: int) -> int:
    "Pure-Python arithmetic: holds the GIL the whole time. Records its start and end (bench.probe)."
    started = time.time()
    acc = 0
    for i in range(work): acc = (acc + i * i) % 1_000_003
    record({"t": started}, started)
    return acc


tasks = Tasks(db=os.environ.get("BENCH_CPU_DB", "cpu-bench.db"), workers=0)
tasks.task(name="bench.burn_process", process=True)(burn)
tasks.task(name="bench.burn_thread")(burn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("process", "thread"), required=True)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--work", type=int, default=1_500_000)
    ap.add_argument("--concurrency", type=int, default=2)
    a = ap.parse_args()
    t = tasks.registry[f"bench.burn_{a.mode}"]
    for _ in range(a.jobs): t.defer(a.work)
    t0 = time.perf_counter()
    done = drain(tasks, timeout=300, concurrency=a.concurrency)
    seconds = time.perf_counter() - t0
    ok = tasks.counts().get("succeeded", 0)
    print(json.dumps({"mode": a.mode, "jobs": a.jobs, "done": done, "succeeded": ok, "seconds": seconds}))


if __name__ == "__main__":
    main()
