"""Progress in a tight loop does not hold up the app: under uvicorn, with the worker in the web process, an async
and a sync task each report progress 100,000 times while a plain route keeps answering quickly, and each job's
final progress is stored. A pool process writes its progress a few times, not once per call."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support import ROOT, uvicorn_server

pytestmark = pytest.mark.timeout(120)

APP = '''
import asyncio, os
from fasthtml.common import fast_app
from fh_tasks import Tasks, current_job

app, rt = fast_app(secret_key="fh-tasks-tests")
tasks = Tasks(app, db=os.environ["JOBS_DB"])
N, CHUNK = 100_000, 2000


@tasks.task
async def async_hammer() -> int:
    for i in range(N):
        current_job().progress({"done": i + 1, "total": N})
        if (i + 1) % CHUNK == 0: await asyncio.sleep(0)  # an async task awaits now and then (I/O, a query...)
    return N


@tasks.task
def sync_hammer() -> int:
    for i in range(N): current_job().progress({"done": i + 1, "total": N})
    return N


@rt
async def ping(): return "pong"


@rt
def start(): return " ".join((async_hammer.defer().id, sync_hammer.defer().id))
'''
#: While the tasks run, nine answers in ten of a plain route come within this (it answers in about a millisecond
#: when idle), and none takes `WORST`. Not every one within `BOUND`: on a 2-core host with a busy neighbour (the
#: suite runs two tests at a time), the event loop's thread and the sync task hand the GIL back and forth, and single
#: answers come near 0.2 s (measured with the other core busy: median about 0.1 s, slowest 0.12–0.19 s).
BOUND, WORST = 0.2, 1.0


def states(db: str, ids: list[str]) -> list[tuple[str, str | None]]:
    with sqlite3.connect(db) as c:
        return [c.execute("SELECT state, progress FROM fh_jobs WHERE id=?", [i]).fetchone() for i in ids]


def test_a_plain_route_answers_quickly_while_tasks_hammer_progress(tmp_path: Path):
    # Given a FastHTML app under uvicorn with an in-process worker, and two tasks that report progress 100,000 times
    (tmp_path / "hammer.py").write_text(APP)
    db = str(tmp_path / "jobs.db")
    with uvicorn_server("hammer:app", cwd=tmp_path, env={"JOBS_DB": db}) as (url, _), httpx.Client(base_url=url) as cli:
        assert cli.get("/ping").text == "pong"
        # When a request starts both, and a client keeps calling a plain route until they are done
        ids = cli.get("/start").text.split()
        lat: list[float] = []
        deadline = time.monotonic() + 60
        while not all(s == "succeeded" for s, _ in states(db, ids)) and time.monotonic() < deadline:
            t = time.perf_counter()
            assert cli.get("/ping").status_code == 200
            lat.append(time.perf_counter() - t)
            time.sleep(0.005)
        final = states(db, ids)
    # Then both jobs succeeded with their final progress stored
    assert [s for s, _ in final] == ["succeeded", "succeeded"], final
    assert [json.loads(p) for _, p in final] == [{"done": 100_000, "total": 100_000}] * 2
    # And the plain route answered quickly the whole time
    lat.sort()
    p90 = lat[int(0.9 * (len(lat) - 1))]
    assert len(lat) >= 5 and p90 < BOUND and lat[-1] < WORST, f"{len(lat)} requests; p90 {p90}; slowest {lat[-3:]}"


POOL_SCRIPT = '''
import json, os, sqlite3
from fh_tasks import Tasks, current_job
from fh_tasks.testing import drain

DB, N = os.environ["JOBS_DB"], 20_000
tasks = Tasks(db=DB)


@tasks.task(process=True)
def crunch() -> int:
    for i in range(N): current_job().progress({"done": i + 1, "total": N, "pid": os.getpid()})
    return os.getpid()


if __name__ == "__main__":
    tasks.counts()  # creates the schema; then count every statement that writes a progress value, from any process
    with sqlite3.connect(DB) as c:
        c.executescript("CREATE TABLE progress_writes (n INTEGER); INSERT INTO progress_writes VALUES (0);"
                        "CREATE TRIGGER count_progress AFTER UPDATE OF progress ON fh_jobs "
                        "BEGIN UPDATE progress_writes SET n = n + 1; END;")
    job = crunch.defer()
    drain(tasks)
    rec = tasks.get(job.id)
    with sqlite3.connect(DB) as c: writes = c.execute("SELECT n FROM progress_writes").fetchone()[0]
    print(json.dumps({"state": rec.state.value, "pid": rec.result, "main": os.getpid(), "progress": rec.progress,
                      "writes": writes}))
'''


def test_a_pool_process_coalesces_progress_too(tmp_path: Path):
    # Given a process=True task that reports progress 20,000 times
    (tmp_path / "crunch.py").write_text(POOL_SCRIPT)
    env = {**os.environ, "JOBS_DB": str(tmp_path / "jobs.db"), "PYTHONPATH": str(ROOT)}
    # When a worker runs it in a pool process
    out = subprocess.run([sys.executable, "crunch.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=90)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    # Then it ran in a child, its final progress is stored, and the child wrote progress a few times, not 20,000
    assert report["state"] == "succeeded" and report["pid"] != report["main"]
    assert report["progress"] == {"done": 20_000, "total": 20_000, "pid": report["pid"]}
    assert 1 <= report["writes"] <= 50, report
