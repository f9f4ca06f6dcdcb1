"""Chaos: SIGKILL workers at random moments while they drain jobs, and count what ran twice and what was lost.

1. fh-tasks: thousands of jobs queued in one SQLite file, drained by standalone worker processes
   (`python -m fh_tasks worker`) with a short lease; a random worker is SIGKILLed and restarted again and again.
   Each job appends its number to a witness table in the same file, in its own transaction, so a job that ran
   but whose outcome was not yet recorded when its worker died shows up twice: an honest at-least-once witness.
2. The web scenario: a plain FastHTML app under uvicorn whose handler returns Starlette's `BackgroundTask`, and
   the same app deferring an fh-tasks job instead; clients post numbered requests while the server is
   SIGKILLed and restarted. A request that got its 200 was accepted; an accepted number never witnessed is lost.

    .venv/bin/python bench/chaos.py                           # long run: 20,000 jobs and 50 kills, 2,000 requests
    .venv/bin/python bench/chaos.py --jobs 3000 --kills 12 --requests 300 --web-kills 4

tests/acceptance/test_chaos.py runs the same functions with small numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

WORKER_APP = '''
import os, sqlite3, threading, time
from fh_tasks import Tasks, current_job

DB = os.environ["CHAOS_DB"]
PAUSE = float(os.environ.get("CHAOS_PAUSE", "0.02"))
tasks = Tasks(db=DB)
_local = threading.local()


def witness(n):
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = sqlite3.connect(DB, timeout=60, isolation_level=None)
    job = current_job()
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)", (n, job.id, job.attempt, os.getpid()))


@tasks.task(retries=int(os.environ.get("CHAOS_RETRIES", "20")))
def record(n: int) -> int:
    time.sleep(PAUSE)  # the work; the witness row is its side effect
    witness(n)
    return n
'''

STARLETTE_APP = '''
import os, sqlite3, threading, time
from fasthtml.common import P, fast_app
from starlette.background import BackgroundTask

DB = os.environ["CHAOS_DB"]
PAUSE = float(os.environ.get("CHAOS_PAUSE", "0.1"))
app, rt = fast_app()
_local = threading.local()


def work(n: int) -> None:
    time.sleep(PAUSE)
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = sqlite3.connect(DB, timeout=60, isolation_level=None)
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, '', 1, ?)", (n, os.getpid()))


@rt("/job")
def post(n: int):
    return P("accepted"), BackgroundTask(work, n)
'''

FH_TASKS_APP = '''
import os, sqlite3, threading, time
from fasthtml.common import P, fast_app
from fh_tasks import Tasks, current_job

DB = os.environ["CHAOS_DB"]
PAUSE = float(os.environ.get("CHAOS_PAUSE", "0.1"))
app, rt = fast_app()
tasks = Tasks(app, db=DB, lease=float(os.environ.get("CHAOS_LEASE", "1")), concurrency=16)
_local = threading.local()


@tasks.task(retries=20)
def work(n: int) -> None:
    time.sleep(PAUSE)
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = sqlite3.connect(DB, timeout=60, isolation_level=None)
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)",
              (n, current_job().id, current_job().attempt, os.getpid()))


@rt("/job")
def post(n: int):
    return P("accepted"), work.defer(n)
'''

WITNESS = "CREATE TABLE IF NOT EXISTS witness (n INTEGER, job TEXT, attempt INTEGER, pid INTEGER)"


def _setup(workdir: Path, module: str, text: str) -> tuple[str, dict[str, str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{module}.py").write_text(text)
    db = str(workdir / f"{module}.db")
    from fh_tasks.store.sqlite import SQLiteStore
    store = SQLiteStore(db)
    store.counts()  # the store's tables first: a store adopts no other database
    store.close()
    with sqlite3.connect(db) as c: c.execute(WITNESS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(workdir)]), "CHAOS_DB": db}
    return db, env


def _query(db: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(db, timeout=60)
    try: return c.execute(sql, params).fetchall()
    finally: c.close()


def _witnessed(db: str) -> dict[int, int]:
    return {n: k for n, k in _query(db, "SELECT n, count(*) FROM witness GROUP BY n")}


def _stop(p: subprocess.Popen[Any], timeout: float = 20) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try: p.wait(timeout)
        except subprocess.TimeoutExpired: p.kill(); p.wait()


# -- 1. standalone workers -----------------------------------------------------------------------------
def worker_chaos(workdir: Path, *, jobs: int = 3000, kills: int = 12, workers: int = 2, concurrency: int = 8,
                 lease: float = 1.0, pause: float = 0.02, retries: int = 20, gap: tuple[float, float] = (0.2, 0.7),
                 seed: int | None = None, timeout: float = 120.0, say: Callable[[str], None] = print) -> dict[str, Any]:
    "SIGKILL and restart a random one of `workers` worker processes `kills` times while they drain `jobs` jobs."
    from fh_tasks.store import NewJob
    from fh_tasks.store.sqlite import SQLiteStore
    rnd = random.Random(seed)
    db, env = _setup(workdir, "chaosapp", WORKER_APP)
    env.update(CHAOS_PAUSE=str(pause), CHAOS_RETRIES=str(retries))
    now = time.time()
    store = SQLiteStore(db)
    store.enqueue([NewJob(id=uuid.uuid4().hex, task="chaosapp:record", args=json.dumps({"args": [n]}),
                          max_attempts=retries + 1, run_at=now, created_at=now) for n in range(jobs)])
    store.close()
    log = open(workdir / "workers.log", "ab")
    cmd = [PY, "-m", "fh_tasks", "worker", "chaosapp:tasks", "--concurrency", str(concurrency), "--lease", str(lease),
           "--log-level", "warning"]
    start = lambda: subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=log)
    procs = [start() for _ in range(workers)]
    t0, killed, in_flight = time.monotonic(), 0, 0
    try:
        while killed < kills:
            time.sleep(rnd.uniform(*gap))
            i = rnd.randrange(workers)
            # Aim at a worker at work: a restarted one may still be importing (slowly, on a busy machine); give it up
            # to a second to claim jobs, so that most kills land while jobs run (the case that matters).
            until = time.monotonic() + 1.0
            while True:
                held = _query(db, "SELECT count(*) FROM fh_jobs WHERE state='running' AND worker LIKE ?",
                              [f"%:{procs[i].pid}:%"])[0][0]
                if held or time.monotonic() > until: break
                time.sleep(0.02)
            procs[i].kill()
            procs[i].wait()
            killed, in_flight = killed + 1, in_flight + (held > 0)
            procs[i] = start()
        left = _wait_drained(db, jobs, t0 + timeout)
    finally:
        for p in procs: _stop(p)
        log.close()
    seconds = time.monotonic() - t0
    seen = _witnessed(db)
    states = dict(_query(db, "SELECT state, count(*) FROM fh_jobs GROUP BY state"))
    attempts = dict(_query(db, "SELECT attempts, count(*) FROM fh_jobs GROUP BY attempts"))
    out = {"jobs": jobs, "kills": killed, "kills_with_jobs_running": in_flight, "workers": workers,
           "concurrency": concurrency, "lease_s": lease, "succeeded": states.get("succeeded", 0),
           "witnessed": len(seen), "duplicates": sum(k - 1 for k in seen.values()),
           "duplicated_jobs": sorted(n for n, k in seen.items() if k > 1), "lost": jobs - len(seen),
           "not_done": left, "attempts": attempts, "seconds": round(seconds, 1)}
    say(f"fh-tasks workers: {jobs} jobs, {killed} SIGKILLs ({in_flight} with jobs running), "
        f"{out['succeeded']} succeeded, {out['duplicates']} ran twice, {out['lost']} lost, {seconds:.1f} s")
    return out


def _wait_drained(db: str, jobs: int, deadline: float) -> int:
    while True:
        done = _query(db, "SELECT count(*) FROM fh_jobs WHERE state='succeeded'")[0][0]
        if done >= jobs or time.monotonic() > deadline: return jobs - done
        time.sleep(0.1)


# -- 2. a web app under uvicorn ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(module: str, workdir: Path, env: dict[str, str], port: int, log: Any) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([PY, "-m", "uvicorn", f"{module}:app", "--host", "127.0.0.1", "--port", str(port),
                          "--log-level", "warning"], cwd=workdir, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and p.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2): return p
        except OSError: time.sleep(0.02)
    raise RuntimeError(f"uvicorn {module}:app did not start (exit code {p.poll()})")


def _clients(url: str, requests: int, threads: int, spacing: float, accepted: set[int]) -> list[threading.Thread]:
    import httpx
    lock = threading.Lock()

    def post_all(ns: range) -> None:
        with httpx.Client(timeout=5) as http:
            for n in ns:
                for _ in range(600):  # bounded: a server that never comes back ends the run
                    try:
                        if http.post(url, data={"n": n}).status_code == 200:
                            with lock: accepted.add(n)
                            break
                    except httpx.HTTPError: pass
                    time.sleep(0.05)
                time.sleep(spacing)

    ts = [threading.Thread(target=post_all, args=(range(i, requests, threads),), daemon=True) for i in range(threads)]
    for t in ts: t.start()
    return ts


def web_chaos(workdir: Path, kind: str, *, requests: int = 300, kills: int = 4, pause: float = 0.1, threads: int = 8,
              spacing: float = 0.06, gap: tuple[float, float] = (0.3, 0.8), seed: int | None = None,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    "Post `requests` numbered requests to a FastHTML app (`kind`: starlette or fh-tasks), SIGKILLing it `kills` times."
    rnd = random.Random(seed)
    module = {"starlette": "plain_bg", "fh-tasks": "durable_bg"}[kind]
    db, env = _setup(workdir, module, STARLETTE_APP if kind == "starlette" else FH_TASKS_APP)
    env.update(CHAOS_PAUSE=str(pause))
    port, log = _free_port(), open(workdir / f"{module}.log", "ab")
    server = _serve(module, workdir, env, port, log)
    accepted: set[int] = set()
    t0, killed = time.monotonic(), 0
    try:
        clients = _clients(f"http://127.0.0.1:{port}/job", requests, threads, spacing, accepted)
        while killed < kills and any(c.is_alive() for c in clients):
            time.sleep(rnd.uniform(*gap))
            server.kill()
            server.wait()
            killed += 1
            server = _serve(module, workdir, env, port, log)
        for c in clients: c.join()
        _settle(db, accepted, kind, pause)
    finally:
        _stop(server)
        log.close()
    seen = _witnessed(db)
    lost = sorted(accepted - set(seen))
    out = {"kind": kind, "requests": requests, "accepted": len(accepted), "kills": killed, "task_seconds": pause,
           "lost": len(lost), "lost_numbers": lost[:50], "duplicates": sum(k - 1 for k in seen.values()),
           "seconds": round(time.monotonic() - t0, 1)}
    say(f"{kind:>9} web app: {len(accepted)} requests accepted, {killed} SIGKILLs, {len(lost)} accepted jobs lost "
        f"({100 * len(lost) / max(1, len(accepted)):.1f} %), {out['duplicates']} ran twice")
    return out


def _settle(db: str, accepted: set[int], kind: str, pause: float) -> None:
    "Give the last server time to finish what it can: Starlette's in-memory tasks, or the durable queue."
    deadline = time.monotonic() + (pause * 5 + 1 if kind == "starlette" else 60)
    while time.monotonic() < deadline:
        if kind != "starlette" and accepted <= set(_witnessed(db)): return
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    "Run both scenarios and print the figures (and JSON with --json)."
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--lease", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--web-kills", type=int, default=20)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fh-tasks-chaos-") as d:
        w = worker_chaos(Path(d) / "workers", jobs=a.jobs, kills=a.kills, concurrency=a.concurrency, lease=a.lease,
                         seed=a.seed, timeout=600)
        s = web_chaos(Path(d) / "starlette", "starlette", requests=a.requests, kills=a.web_kills, seed=a.seed)
        f = web_chaos(Path(d) / "fh-tasks", "fh-tasks", requests=a.requests, kills=a.web_kills, seed=a.seed)
    bound = w["kills"] * w["concurrency"]
    print(f"\nat-least-once bound: {w['duplicates']} duplicates <= kills x concurrency = {bound}")
    if a.json: print(json.dumps({"workers": w, "starlette": s, "fh_tasks_web": f}, indent=2))


if __name__ == "__main__":
    main()
