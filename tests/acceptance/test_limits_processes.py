"""Concurrency and rate limits hold across worker processes: two `fh-tasks worker` processes of 8 slots each share
one store, and the tasks themselves record when they ran (appended to a file), which is what is checked."""
from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from worker_support import PY, env_for, make_db, rows, running, start_worker, states, stop, wait_for

LIMITS_APP = '''
import os, time
from fh_tasks import Tasks

tasks = Tasks(db=os.environ["JOBS_DB"], workers=0, retention=None)


def note(task, key):
    "Append `task key start end pid` to the log: one write of a short line, whole whatever the other processes do."
    t0 = time.time()
    def done(pause):
        time.sleep(pause)
        line = f"{task} {key} {t0:.6f} {time.time():.6f} {os.getpid()}\\n"
        fd = os.open(os.environ["LIMITS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try: os.write(fd, line.encode())
        finally: os.close(fd)
    return done


@tasks.task(concurrency=2)
def capped(i: int, pause: float) -> None:
    note("capped", "capped")(pause)


@tasks.task(concurrency=1, limit_by=lambda customer, **_: f"customer:{customer}")
def per_customer(customer: str, i: int, pause: float) -> None:
    note("per_customer", customer)(pause)


@tasks.task(rate="20/s")
def rated(i: int) -> None:
    note("rated", "rated")(0)


@tasks.task
def free(i: int, pause: float) -> None:
    note("free", "-")(pause)


def load(kind: str) -> None:
    if kind == "first":  # fills one worker for a while: one `capped` job and 7 others
        capped.defer(0, 2.5)
        free.defer_many([(i, 2.5) for i in range(7)])
    elif kind == "concurrency":
        capped.defer_many([(i, 0.1) for i in range(1, 20)])
        per_customer.defer_many([(c, i, 0.1) for i in range(4) for c in ("a", "b", "c")])
        free.defer_many([(i, 0.1) for i in range(7, 23)])
    else:
        rated.defer_many([(i,) for i in range(40)])
'''


@pytest.fixture
def app(tmp_path: Path) -> tuple[Path, str, dict[str, str], Path]:
    (tmp_path / "limitsapp.py").write_text(LIMITS_APP)
    db = make_db(tmp_path / "jobs.db")
    log = tmp_path / "runs.log"
    return tmp_path, db, env_for(tmp_path, db, LIMITS_LOG=str(log)), log


def runs(log: Path) -> dict[str, list[tuple[str, float, float, int]]]:
    "task -> [(key, start, end, pid)] as the tasks recorded them."
    out: dict[str, list[tuple[str, float, float, int]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        task, key, t0, t1, pid = line.split()
        out[task].append((key, float(t0), float(t1), int(pid)))
    return out


def most_at_once(spans: list[tuple[float, float]]) -> int:
    "The most spans running at one moment (an end at the very moment of a start counts as before it)."
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def defer(app: tuple[Path, str, dict[str, str], Path], kind: str) -> None:
    "Store jobs from another process, as an app would."
    dir, _, env, _ = app
    subprocess.run([PY, "-c", f"import limitsapp; limitsapp.load({kind!r})"], cwd=dir, env=env, check=True, timeout=30)


def worker(app: tuple[Path, str, dict[str, str], Path], name: str) -> subprocess.Popen[bytes]:
    "A worker process of 8 slots, registered in the store when this returns."
    dir, db, env, _ = app
    n = len(rows(db, "SELECT 1 FROM fh_workers"))
    p = start_worker("limitsapp:tasks", dir, env, "--concurrency", "8", log=dir / f"{name}.log")
    wait_for(lambda: len(rows(db, "SELECT 1 FROM fh_workers")) > n, what=f"worker {name} registered")
    return p


def finish(app: tuple[Path, str, dict[str, str], Path], jobs: int, *workers: subprocess.Popen[bytes]) -> None:
    "Wait until all `jobs` succeeded, then stop the workers cleanly."
    db = app[1]
    wait_for(lambda: states(db).get("succeeded", 0) == jobs, timeout=30, interval=0.1, what=f"{jobs} jobs succeeded")
    assert [stop(w) for w in workers] == [0] * len(workers)
    assert states(db) == {"succeeded": jobs}


def test_concurrency_limits_hold_across_two_processes_and_never_hold_back_other_tasks(app) -> None:
    # Given a worker of 8 slots running one `capped` job (limited to 2 at once) and 7 others, so it is full
    w1 = worker(app, "w1")
    with running(w1):
        defer(app, "first")
        wait_for(lambda: states(app[1]).get("running") == 8, what="the first worker full")
        # And a second worker of 8 slots, then 19 more `capped` jobs, 12 of a task limited to one at a time per
        # customer (3 customers), and 16 of a task without limits, all 0.1 s long
        with running(worker(app, "w2")) as w2:
            defer(app, "concurrency")
            finish(app, 55, w1, w2)
    done = runs(app[3])
    # Then never 3 `capped` jobs ran at once, in both processes together, yet 2 did (a limit, not a lock)
    capped = done["capped"]
    assert len(capped) == 20
    # (the second worker took `capped` jobs while the first still ran one: a count per process would let 3 run)
    assert len({pid for *_, pid in capped}) == 2
    assert most_at_once([(t0, t1) for _, t0, t1, _ in capped]) == 2
    # And each customer's jobs ran one at a time, while customers ran side by side
    per = done["per_customer"]
    assert len(per) == 12
    for c in "abc":
        assert most_at_once([(t0, t1) for k, t0, t1, _ in per if k == c]) == 1, c
    assert most_at_once([(t0, t1) for _, t0, t1, _ in per]) >= 2
    # And the jobs without limits were not held back behind the limited backlog: they ran many at once, and were
    # done while `capped` (20 jobs, 2 at a time: 1 s at least) still had most of its backlog
    free = [r for r in done["free"] if r[2] - r[1] < 1]  # the 0.1 s ones
    assert len(free) == 16 and most_at_once([(t0, t1) for _, t0, t1, _ in free]) >= 4
    last = max(t0 for _, t0, _, _ in capped)
    assert max(t1 for _, _, t1, _ in free) < last - 0.3, "jobs without limits waited for the limited ones"


def test_a_rate_limit_holds_across_two_processes_without_starving(app) -> None:
    # Given two workers of 8 slots each and 40 jobs of a task limited to 20 starts a second
    with running(worker(app, "w1")) as w1, running(worker(app, "w2")) as w2:
        defer(app, "rate")
        finish(app, 40, w1, w2)
    starts = sorted(t0 for _, t0, _, _ in runs(app[3])["rated"])
    stored = sorted(float(r[0]) for r in rows(app[1], "SELECT started_at FROM fh_jobs"))

    def most_in_a_second(ts: list[float]) -> int:
        return max(sum(1 for u in ts[i:] if u < t + 1.0) for i, t in enumerate(ts))

    # Then no second held more than 20 starts: exactly, by the starts the store recorded in its claims, and within
    # one start by the tasks' own clocks (a thread starts a job a few ms after its claim)
    assert len(starts) == len(stored) == 40
    assert most_in_a_second(stored) <= 20
    assert most_in_a_second(starts) <= 21
    # And the limit did not starve the task: 40 starts 50 ms apart take 1.95 s; waking for each window costs a
    # worker at most a poll (0.1 s), so the whole run stays close to that
    span = stored[-1] - stored[0]
    assert 1.95 - 1e-3 <= span < 1.95 * 1.25, span
    gaps = [b - a for a, b in zip(stored, stored[1:], strict=False)]
    assert min(gaps) >= 0.05 - 1e-6 and max(gaps) < 0.05 + 0.12, (min(gaps), max(gaps))
    assert os.path.getsize(app[3]) > 0
