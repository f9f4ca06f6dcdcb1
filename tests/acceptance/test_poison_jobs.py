"""A sync task that kills its worker process (os._exit, a segfault) among good jobs, with real worker processes:
the poison job ends failed (WorkerLost) after its lone crashes, and the jobs that ran beside it are not charged."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from worker_support import env_for, make_db, rows, start_worker, stop, write_modules

from fh_tasks.store.sqlite import CRASH_ATTEMPTS

pytestmark = pytest.mark.timeout(120)

CRASH_APP = '''
import os, signal, sqlite3, threading, time
from fh_tasks import Tasks, current_job
from fh_tasks.store.sqlite import SQLiteStore

DB = os.environ["JOBS_DB"]
tasks = Tasks(store=SQLiteStore(DB), lease=float(os.environ.get("JOBS_LEASE", "1")), grace=2)
_local = threading.local()


@tasks.task
def good(n: int, pause: float) -> int:
    time.sleep(pause)
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = sqlite3.connect(DB, timeout=30, isolation_level=None)
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)",
              (n, current_job().id, current_job().attempt, os.getpid()))
    return n


@tasks.task
def exit_now() -> None:
    time.sleep(0.05)
    os._exit(1)


@tasks.task
def segfault() -> None:
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGSEGV)
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_modules(tmp_path)
    (tmp_path / "crashapp.py").write_text(CRASH_APP)
    return tmp_path


def enqueue_all(db: str, poison: str, goods: int) -> tuple[str, list[str]]:
    "Good jobs with the poison job among the first ones (so that it runs beside them), in one transaction."
    import uuid

    from fh_tasks.encoding import encode_args
    from fh_tasks.store import NewJob
    from fh_tasks.store.sqlite import SQLiteStore
    now = time.time()
    jobs = [NewJob(id=uuid.uuid4().hex, task="crashapp:good", args=encode_args("good", (n, 0.3), {}), run_at=now,
                   created_at=now) for n in range(goods)]
    bad = NewJob(id=uuid.uuid4().hex, task=f"crashapp:{poison}", args='{"args": []}', run_at=now, created_at=now)
    jobs.insert(3, bad)
    store = SQLiteStore(db)
    try: store.enqueue(jobs)
    finally: store.close()
    return bad.id, [j.id for j in jobs if j is not bad]


@pytest.mark.parametrize("poison, processes", [("exit_now", 1), ("segfault", 1), ("exit_now", 2)])
def test_a_poison_sync_task_fails_alone_and_its_neighbours_succeed(app_dir, tmp_path, poison, processes):
    # Given a sync task that kills its worker process, queued among 20 good jobs (0.3 s each, no retries)
    db = make_db(tmp_path / "jobs.db")
    bad, goods = enqueue_all(db, poison, 20)
    env = env_for(app_dir, db, JOBS_LEASE=1)
    log = tmp_path / "workers.log"
    args = ("--processes", str(processes), "--concurrency", "8", "--lease", "1")
    # When workers serve them with a 1 s lease, restarted whenever one dies (by the supervisor with 2 processes;
    # with 1 the test restarts it, as systemd or a container runtime would)
    exits: list[int] = []
    w = start_worker("crashapp:tasks", app_dir, env, *args, log=log)
    deadline = time.monotonic() + 90
    try:
        while not done(db, bad, goods):
            if w.poll() is not None:
                exits.append(w.returncode)
                w = start_worker("crashapp:tasks", app_dir, env, *args, log=log)
            assert time.monotonic() < deadline, (exits, rows(db, "SELECT state, count(*) FROM fh_jobs GROUP BY 1"))
            time.sleep(0.05)
        assert stop(w) == 0
    finally:
        if w.poll() is None: w.kill(); w.wait()
    text = log.read_text()
    deaths = len(exits) + text.count("starting another")
    print(f"{poison} with {processes} process(es): {deaths} worker deaths, exits {exits}")
    # Then the poison job failed as a lost worker after CRASH_ATTEMPTS crashes charged to it, each while it ran alone
    [(state, charged, lost, error)] = rows(db, "SELECT state, attempts - excused, lost, error FROM fh_jobs WHERE id=?",
                                          [bad])
    assert (state, charged, json.loads(error)["type"]) == ("failed", CRASH_ATTEMPTS, "WorkerLost")
    assert lost == deaths <= CRASH_ATTEMPTS + 1
    # And every good job succeeded without a charged attempt beyond its first, and ran (at most twice: once more
    # if its worker died after its side effect and before its outcome was recorded)
    marks = ",".join("?" * len(goods))
    got = rows(db, f"SELECT state, attempts - excused FROM fh_jobs WHERE id IN ({marks})", goods)
    assert sorted(got) == [("succeeded", 1)] * 20
    ran = dict(rows(db, f"SELECT job, count(*) FROM witness WHERE job IN ({marks}) GROUP BY job", goods))
    assert set(ran) == set(goods) and max(ran.values()) <= 2
    # And each death was logged, and a lost job was logged as such
    assert "its worker died while running it beside" in text and "failed (WorkerLost)" in text


def done(db: str, bad: str, goods: list[str]) -> bool:
    states = dict(rows(db, "SELECT id, state FROM fh_jobs"))
    return states.get(bad) == "failed" and all(states.get(g) == "succeeded" for g in goods)
