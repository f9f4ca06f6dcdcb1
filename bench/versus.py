"""fh-tasks against an earlier version of itself, measured in pairs on this machine: the two versions alternate in
each repetition, in processes of their own, with the same Python, SQLite and benchmark code.

    python -m bench.versus                      # this tree against 0.1.0
    python -m bench.versus --rev HEAD~5 --reps 5 --out /tmp/versus.json

The earlier version is checked out from git (`git worktree add`) into a temporary folder, removed at the end.
Measures: `defer()` outside a request (µs per call), a burst worker draining queued no-op jobs with a sync and an
`async def` task (jobs/s), and the request path: FastHTML under uvicorn whose handler defers a job run by the
in-process worker, loaded by `wrk` (req/s, p50, p99; skipped without `wrk`). Ratios are this tree's throughput over
the earlier version's (> 1: this tree is faster), the median of the per-repetition ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .common import PY, ROOT, cpu_ticks, log, steal_since

#: The commit released as fh-tasks 0.1.0.
RELEASE_0_1_0 = "3621683"

#: One `defer()` per call outside a request: prints µs per call. Both versions' API: `Tasks(db=, workers=0)`.
DEFER = """
import os, sys, tempfile, time
from fh_tasks import Tasks
tasks = Tasks(db=os.path.join(tempfile.mkdtemp(), "jobs.db"), workers=0)
@tasks.task(name="bench.noop")
def noop(arg): pass
for _ in range(200): noop.defer({"t": time.time(), "user": 42, "tag": "bench"})
n = int(sys.argv[1])
t0 = time.perf_counter()
for _ in range(n): noop.defer({"t": time.time(), "user": 42, "tag": "bench"})
print((time.perf_counter() - t0) / n * 1e6)
"""

#: N queued no-op jobs drained by a burst worker of 8: prints jobs/s.
DRAIN = """
import asyncio, os, sys, tempfile, time
from fh_tasks import Tasks
n, kind = int(sys.argv[1]), sys.argv[2]
tasks = Tasks(db=os.path.join(tempfile.mkdtemp(), "jobs.db"), workers=0)
if kind == "async":
    async def noop(arg): pass
else:
    def noop(arg): pass
t = tasks.task(name="bench.noop")(noop)
jobs = [t.new_job(({"t": time.time(), "user": 42, "tag": "bench"},), {}, t.options) for _ in range(n)]
for i in range(0, n, 500): tasks.store.enqueue(jobs[i:i + 500])
w = tasks.worker(burst=True, concurrency=8)
t0 = time.perf_counter()
asyncio.run(w.run())
dt = time.perf_counter() - t0
assert tasks.store.counts().get("succeeded") == n, tasks.store.counts()
print(n / dt)
"""


def _run(code: str, path: str, *args: Any) -> float:
    out = subprocess.run([PY, "-c", code, *map(str, args)], env={**_env(), "PYTHONPATH": path},
                         cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=600)
    if out.returncode: raise RuntimeError(f"{code.split(chr(10))[1]}... failed under {path}:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _request(path: str, workdir: Path, seconds: float, tag: str) -> float:
    "req/s of bench/request_app.py's `fh` variant under `wrk -c8`, with fh-tasks from `path`."
    from .request import serve, wrk
    with serve("fh", workdir, "", workdir, tag, extra_env={"PYTHONPATH": path}) as url:
        wrk(url, 2.0, 8)  # warm-up
        return float(wrk(url, seconds, 8)["rps"])


def measure(old: str, reps: int, defers: int, jobs: int, seconds: float, workdir: Path) -> dict[str, Any]:
    "Each measure for both trees, alternating which goes first; returns values, ratios and their medians."
    new = str(ROOT)
    runs: dict[str, Any] = {
        "defer() outside a request, calls/s": lambda p: 1e6 / _run(DEFER, p, defers),
        "drain, sync task, jobs/s": lambda p: _run(DRAIN, p, jobs, "sync"),
        "drain, async task, jobs/s": lambda p: _run(DRAIN, p, jobs, "async"),
    }
    if shutil.which("wrk"): runs["request path, req/s"] = lambda p: _request(p, workdir, seconds, uuid.uuid4().hex)
    else: log("  (wrk is not installed: the request path is not measured)")
    out: dict[str, Any] = {}
    for name, fn in runs.items():
        vals: dict[str, list[float]] = {"old": [], "new": []}
        for rep in range(reps):
            for who in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                vals[who].append(fn(old if who == "old" else new))
        ratios = [n / o for n, o in zip(vals["new"], vals["old"], strict=True)]
        out[name] = {**vals, "ratios": ratios, "ratio": statistics.median(ratios)}
        log(f"  {name:36} earlier {statistics.median(vals['old']):>10,.0f}   this tree "
            f"{statistics.median(vals['new']):>10,.0f}   ratio {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default=RELEASE_0_1_0, help="the earlier version: a git revision (default: 0.1.0)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--defers", type=int, default=20_000, help="defer() calls per measurement")
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs per drain")
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk's duration per request measurement")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fh-versus-"))
    tree = workdir / "earlier"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), a.rev], check=True)
    log(f"this tree against {a.rev}, {a.reps} paired repetitions")
    ticks = cpu_ticks()
    old = f"{tree}{os.pathsep}{ROOT}"  # its fh_tasks first; the benchmark's own modules from this tree
    try: res = {"rev": a.rev, "reps": a.reps, "measures": measure(old, a.reps, a.defers, a.jobs, a.seconds, workdir)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    res["steal_pct"] = steal_since(ticks)
    log(f"the hypervisor took {res['steal_pct']} % of the CPU time during the run (steal)")
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
