"""fh-tasks against an earlier version of itself, measured in pairs on this machine: the two versions alternate in
each repetition, in processes of their own, with the same Python, SQLite and benchmark code.

    python -m bench.versus                      # this tree against 0.1.0
    python -m bench.versus --rev HEAD~5 --reps 5 --out /tmp/versus.json
    python -m bench.versus --instructions       # instructions per job under valgrind, not time (see below)

The earlier version is checked out from git (`git worktree add`) into a temporary folder, removed at the end.
Measures: `defer()` outside a request (µs per call), a burst worker draining queued no-op jobs with a sync and an
`async def` task (jobs/s), and the request path: FastHTML under uvicorn whose handler defers a job run by the
in-process worker, loaded by `wrk` (req/s, p50, p99; skipped without `wrk`). Ratios are this tree's throughput over
the earlier version's (> 1: this tree is faster), the median of the per-repetition ratios.

`--instructions` counts instead of timing, for hosts whose speed drifts more between runs than the versions differ:
each measure runs under `valgrind --tool=callgrind` at N and 2N jobs (or calls), and the difference over N is the
instructions per job, start-up left out. A drain reads a store filled beforehand by the same version outside
valgrind; it prints its rounds (outcomes recorded and jobs claimed per transaction), since a worker that batched
differently would do different work. The count is given with and without libc's memset/memcpy/memmove, which move
up to 32 bytes per instruction (an SQLite that zeroes more memory counts many instructions that cost little time).
Instructions are not time: a miss in the CPU's caches costs many, and they are not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


#: The drain of `--instructions`: `prep DB N` fills a store with N queued no-op jobs (outside valgrind) and prints N;
#: `drain DB N KIND` drains it with a burst worker of 8 and prints its rounds: {"outcomes/claimed per transaction":
#: count}.
INSTR_DRAIN = """
import asyncio, collections, json, sys, time
from fh_tasks import Tasks
mode, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kind = sys.argv[4] if len(sys.argv) > 4 else "async"
tasks = Tasks(db=db, workers=0)
if kind == "async":
    async def noop(arg): pass
else:
    def noop(arg): pass
t = tasks.task(name="bench.noop")(noop)
if mode == "prep":
    jobs = [t.new_job(({"t": time.time(), "user": 42, "tag": "bench"},), {}, t.options) for _ in range(n)]
    for i in range(0, n, 500): tasks.store.enqueue(jobs[i:i + 500])
    print(n)
else:
    store, rounds = tasks.store, collections.Counter()
    finish_and_claim = store.finish_and_claim
    def counted(outcomes, *a, **k):
        outcomes = list(outcomes)
        r = finish_and_claim(outcomes, *a, **k)
        rounds[f"{len(outcomes)}/{len(r[1])}"] += 1
        return r
    store.finish_and_claim = counted
    asyncio.run(tasks.worker(burst=True, concurrency=8).run())
    assert tasks.store.counts().get("succeeded") == n, tasks.store.counts()
    print(json.dumps(dict(rounds.most_common())))
"""

#: Byte-moving libc functions, counted apart by `--instructions`.
_MEMORY = ("memset", "memcpy", "memmove")


def _callgrind(code: str, path: str, workdir: Path, *args: Any) -> tuple[int, int, str]:
    "Run `code` under callgrind: (instructions, of them in memset/memcpy/memmove, the program's last output line)."
    out = workdir / f"callgrind.{uuid.uuid4().hex}"
    r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", PY, "-c", code, *map(str, args)],
                       env={**_env(), "PYTHONPATH": path}, cwd=tempfile.gettempdir(), capture_output=True, text=True,
                       timeout=1800)
    if r.returncode:
        raise RuntimeError(f"{code.split(chr(10))[1]}... failed under valgrind ({path}):\n{r.stderr[-2000:]}")
    ann = subprocess.run(["callgrind_annotate", "--threshold=100", str(out)], capture_output=True, text=True,
                         check=True).stdout
    out.unlink()
    total = memory = 0
    for line in ann.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)$", line)
        if not m: continue
        n, rest = int(m.group(1).replace(",", "")), m.group(2)
        if rest.startswith("PROGRAM TOTALS"): total = n
        elif any(f in rest.split("[")[0] for f in _MEMORY): memory += n
    return total, memory, (r.stdout.strip().splitlines() or [""])[-1]


def instructions(old: str, jobs: int, workdir: Path) -> dict[str, Any]:
    "Instructions per job of each measure, both trees, at `jobs` and twice as many (see the module docstring)."
    new, res = str(ROOT), {}
    for name, kind in (("drain, async task", "async"), ("drain, sync task", "sync"), ("defer() outside a request", "")):
        row: dict[str, Any] = {}
        for who, path in (("old", old), ("new", new)):
            counts, rounds = [], []
            for n in (jobs, 2 * jobs):
                if kind:
                    db = workdir / f"instr-{who}-{kind}-{n}.db"
                    _run(INSTR_DRAIN, path, "prep", db, n, kind)
                    total, memory, last = _callgrind(INSTR_DRAIN, path, workdir, "drain", db, n, kind)
                    rounds.append(json.loads(last))
                else:
                    total, memory, _ = _callgrind(DEFER, path, workdir, n)
                counts.append((total, memory))
            per = (counts[1][0] - counts[0][0]) / jobs
            per_mem = (counts[1][1] - counts[0][1]) / jobs
            row[who] = {"per_job": per, "memory_per_job": per_mem, "rounds": rounds}
        row["ratio"] = row["old"]["per_job"] / row["new"]["per_job"]
        row["ratio_without_memory"] = ((row["old"]["per_job"] - row["old"]["memory_per_job"])
                                       / (row["new"]["per_job"] - row["new"]["memory_per_job"]))
        res[name] = row
        o, w = row["old"], row["new"]
        log(f"  {name:28} instructions a job: earlier {o['per_job']:>9,.0f}   this tree {w['per_job']:>9,.0f}   "
            f"ratio {row['ratio']:.2f}; without memset/memcpy {o['per_job'] - o['memory_per_job']:>9,.0f} / "
            f"{w['per_job'] - w['memory_per_job']:>9,.0f}, ratio {row['ratio_without_memory']:.2f}")
        if kind:
            log(f"    rounds (outcomes/claimed: count) at {2 * jobs}: earlier {o['rounds'][1]}; "
                f"this tree {w['rounds'][1]}")
    return res


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
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per job under valgrind instead of timing (see above)")
    a = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fh-versus-"))
    tree = workdir / "earlier"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), a.rev], check=True)
    log(f"this tree against {a.rev}, " + (f"instructions per job at {a.jobs} and {2 * a.jobs} jobs under callgrind"
                                          if a.instructions else f"{a.reps} paired repetitions"))
    ticks = cpu_ticks()
    old = f"{tree}{os.pathsep}{ROOT}"  # its fh_tasks first; the benchmark's own modules from this tree
    try:
        if a.instructions:
            if not shutil.which("valgrind"): raise SystemExit("--instructions needs valgrind (Debian: valgrind)")
            res = {"rev": a.rev, "instructions": instructions(old, a.jobs, workdir)}
        else:
            res = {"rev": a.rev, "reps": a.reps, "measures": measure(old, a.reps, a.defers, a.jobs, a.seconds, workdir)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    res["steal_pct"] = steal_since(ticks)
    log(f"the hypervisor took {res['steal_pct']} % of the CPU time during the run (steal)")
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
