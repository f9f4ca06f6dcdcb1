"""CPU-bound speed-up: the same pure-Python jobs through fh-tasks' process pool and its thread pool (2 at once).

bench/cpu_bound.py is the study of record: when it exists it is run (bounded) and its rounds are parsed. Without
it, `bench.cpu_tasks` drains the jobs in fresh subprocesses here. Pool start-up is part of the process pool's time.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from . import probe
from .common import PY, ROOT, Settings, log, stat

SCRIPT = ROOT / "bench" / "cpu_bound.py"
_ROUND = re.compile(r"round \d+: thread pool ([\d.]+) s, process pool ([\d.]+) s")
_HEAD = re.compile(r"CPU-bound jobs: (\d+) x burn\(([\d,]+)\)")


def once(mode: str, s: Settings, db: Path) -> tuple[float, float]:
    "Seconds of the whole drain (pool start-up included) and from the first job's start to the last job's end."
    d = db.with_suffix(".probe")
    d.mkdir()
    out = subprocess.run([PY, "-c", "import bench.cpu_tasks as m; m.main()", "--mode", mode, "--jobs", str(s.cpu_jobs),
                          "--work", str(s.cpu_work)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "BENCH_CPU_DB": str(db), probe.ENV: str(d)})
    if out.returncode != 0: raise RuntimeError(f"bench.cpu_tasks --mode {mode} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["succeeded"] != s.cpu_jobs: raise RuntimeError(f"{mode}: {r['succeeded']}/{s.cpu_jobs} jobs succeeded: {r}")
    recs = probe.records(str(d))
    return float(r["seconds"]), max(x[2] for x in recs) - min(x[1] for x in recs)


def own(s: Settings, workdir: Path) -> dict[str, Any]:
    "Thread pool vs process pool with bench.cpu_tasks, `s.reps` rounds."
    d = workdir / "cpu"
    d.mkdir(exist_ok=True)
    threads, procs, spans_t, spans_p = [], [], [], []
    for i in range(s.reps):
        t, ts = once("thread", s, d / f"thread-{i}.db")
        p, ps = once("process", s, d / f"process-{i}.db")
        threads.append(t); procs.append(p); spans_t.append(ts); spans_p.append(ps)
        log(f"  cpu    {s.cpu_jobs} jobs: thread pool {t:5.2f} s   process pool {p:5.2f} s   speed-up {t / p:4.2f}x"
            f"   (jobs only: {ts:5.2f} s / {ps:5.2f} s = {ts / ps:4.2f}x)")
    return {"source": "bench/cpu_tasks.py", "jobs": s.cpu_jobs, "work": s.cpu_work, "thread_s": stat(threads),
            "process_s": stat(procs), "speedup": stat([t / p for t, p in zip(threads, procs, strict=True)]),
            "thread_jobs_s": stat(spans_t), "process_jobs_s": stat(spans_p),
            "speedup_jobs": stat([t / p for t, p in zip(spans_t, spans_p, strict=True)])}


def from_script(s: Settings) -> dict[str, Any] | None:
    "Run bench/cpu_bound.py with a bounded time; its rounds, or None when its output cannot be read."
    args = [PY, str(SCRIPT), *(["--quick"] if s.quick else ["--rounds", str(s.reps)])]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        log("  cpu    bench/cpu_bound.py timed out after 300 s")
        return None
    rounds = [(float(t), float(p)) for t, p in _ROUND.findall(r.stdout)]
    head = _HEAD.search(r.stdout)
    if r.returncode != 0 or not rounds or not head:
        log(f"  cpu    bench/cpu_bound.py gave no rounds (exit {r.returncode}): {r.stderr[-500:]}")
        return None
    for t, p in rounds: log(f"  cpu    thread pool {t:5.2f} s   process pool {p:5.2f} s   speed-up {t / p:4.2f}x")
    return {"source": "bench/cpu_bound.py", "cmd": " ".join(["bench/cpu_bound.py", *args[2:]]),
            "jobs": int(head[1]), "work": int(head[2].replace(",", "")),
            "thread_s": stat([t for t, _ in rounds]), "process_s": stat([p for _, p in rounds]),
            "speedup": stat([t / p for t, p in rounds]), "output": r.stdout[-3000:]}


def measure(s: Settings, workdir: Path) -> dict[str, Any]:
    out = (from_script(s) if SCRIPT.exists() else None) or own(s, workdir)
    out.update(concurrency=2, load_avg_after=[round(x, 2) for x in os.getloadavg()])
    return out
