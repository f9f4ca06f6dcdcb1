"""CPU-bound jobs on 2 cores: `@tasks.task(process=True)` (process pool) versus a plain task (thread pool).

The tasks are defined in this script, run as __main__: pool processes load it as `__mp_main__` and find the task
in their registry. Each drain is a worker with concurrency 2 on a fresh SQLite file; the process pool's start-up
is included in its time.

    .venv/bin/python bench/cpu_bound.py            # 8 jobs, 3 rounds
    .venv/bin/python bench/cpu_bound.py --quick    # 4 jobs, 1 round
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fh_tasks import Tasks  # noqa: E402
from fh_tasks.testing import drain  # noqa: E402

tasks = Tasks(db=os.environ.get("FH_TASKS_CPU_DB", ":memory:"), workers=0)


def burn(work: int) -> int:
    "Pure-Python arithmetic: holds the GIL the whole time."
    acc = 0
    for i in range(work): acc = (acc + i * i) % 1_000_003
    return acc


in_process = tasks.task(name="cpu_bound:in_process", process=True)(burn)
in_thread = tasks.task(name="cpu_bound:in_thread")(burn)


def drain_time(task_name: str, jobs: int, work: int, db: Path) -> float:
    "Seconds a concurrency-2 worker takes to run `jobs` jobs of `task_name` from a fresh store."
    hub = Tasks(db=str(db), workers=0)
    hub.registry.update(tasks.registry)  # same Task objects, so pool processes find them by name
    task = tasks.registry[task_name]
    from fh_tasks.store import NewJob
    rows: list[NewJob] = [task.new_job((work,), {}, task.options) for _ in range(jobs)]
    hub.store.enqueue(rows)
    t0 = time.perf_counter()
    done = drain(hub, timeout=600, concurrency=2)
    seconds = time.perf_counter() - t0
    ok = hub.counts().get("succeeded", 0)
    hub.store.close()
    if done != jobs or ok != jobs: raise RuntimeError(f"{task_name}: {ok}/{jobs} jobs succeeded")
    return seconds


def main() -> None:
    "Print thread-pool and process-pool drain times and the speed-up."
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--work", type=int, default=15_000_000, help="loop iterations per job")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 jobs, 1 round")
    a = ap.parse_args()
    if a.quick: a.jobs, a.rounds = 4, 1
    print(f"CPU-bound jobs: {a.jobs} x burn({a.work:,}) on {os.cpu_count()} CPU(s), worker concurrency 2")
    threads, procs = [], []
    with tempfile.TemporaryDirectory(prefix="fh-tasks-cpu-") as d:
        for r in range(a.rounds):
            threads.append(drain_time("cpu_bound:in_thread", a.jobs, a.work, Path(d) / f"t{r}.db"))
            procs.append(drain_time("cpu_bound:in_process", a.jobs, a.work, Path(d) / f"p{r}.db"))
            print(f"  round {r + 1}: thread pool {threads[-1]:.2f} s, process pool {procs[-1]:.2f} s")
    t, p = statistics.median(threads), statistics.median(procs)
    print(f"thread pool  (plain task):    {t:.2f} s  (median of {a.rounds})")
    print(f"process pool (process=True):  {p:.2f} s  (median of {a.rounds}, pool start-up included)")
    print(f"speed-up: {t / p:.2f}x")


if __name__ == "__main__":
    main()
