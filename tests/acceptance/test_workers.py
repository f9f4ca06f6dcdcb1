"""Standalone and in-app workers as real processes: cross-process pickup, leases after SIGKILL, poison jobs,
graceful shutdown on SIGTERM/SIGINT and through the app's lifespan, and corrupt rows."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support import uvicorn_server
from worker_support import (
    alive,
    enqueue,
    env_for,
    make_db,
    rows,
    running,
    start_worker,
    states,
    stop,
    wait_for,
    write_modules,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_modules(tmp_path)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return make_db(tmp_path / "jobs.db")


def job_states(db: str, ids: list[str]) -> dict[str, str]:
    marks = ",".join("?" * len(ids))
    return dict(rows(db, f"SELECT id, state FROM fh_jobs WHERE id IN ({marks})", ids))  # type: ignore[arg-type]


def all_in(db: str, ids: list[str], *wanted: str) -> bool:
    got = job_states(db, ids)
    return len(got) == len(ids) and all(s in wanted for s in got.values())


def test_importing_the_app_module_starts_no_worker(app_dir, db):
    # Given an app module whose hub has an in-process worker (workers=1)
    # When it is imported (as uvicorn, the CLI and pool processes do) and a job is deferred
    code = "import time, webapp; j = webapp.record.defer(1); time.sleep(0.5); print(j.get().state)"
    out = subprocess.run([sys.executable, "-c", code], cwd=app_dir, env=env_for(app_dir, db), capture_output=True,
                         text=True, timeout=30)
    # Then nothing ran it: workers start with the app's lifespan only
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "queued"


def test_web_app_without_workers_and_a_standalone_worker(app_dir, db, tmp_path):
    # Given the web app with workers=0 under uvicorn
    env = env_for(app_dir, db, WEB_WORKERS=0)
    with uvicorn_server("webapp:app", cwd=app_dir, env=env) as (url, server):
        ids = [httpx.post(f"{url}/defer", data={"n": i}).text.split('id="job">')[1].split("<")[0] for i in range(20)]
        time.sleep(0.3)
        # Then the app alone runs nothing
        assert set(job_states(db, ids).values()) == {"queued"}
        # When a standalone worker process is started beside it (pointing at the app object)
        with running(start_worker("webapp:app", app_dir, env, "--concurrency", "4", module=False,
                                  log=tmp_path / "worker.log")) as w:
            # Then it runs every job, and the web app's process runs none
            wait_for(lambda: all_in(db, ids, "succeeded"), what="all jobs succeeded")
            assert stop(w) == 0
        pids = {r[0] for r in rows(db, "SELECT DISTINCT pid FROM witness")}
        assert pids == {w.pid}
        assert server.pid not in pids


def test_several_uvicorn_workers_share_one_file(app_dir, db):
    # Given the app under `uvicorn --workers 2`, each process with its own in-process worker
    env = env_for(app_dir, db, WEB_WORKERS=1)
    with uvicorn_server("webapp:app", cwd=app_dir, env=env, extra=["--workers", "2"]) as (url, server):
        # When 200 jobs are deferred through requests on fresh connections
        def post(i: int) -> str:
            r = httpx.post(f"{url}/defer", data={"n": i, "pause": 0.005})
            assert r.status_code == 200, r.text
            return r.text.split('id="job">')[1].split("<")[0]

        with ThreadPoolExecutor(8) as pool: ids = list(pool.map(post, range(200)))
        # Then every job runs exactly once, with no duplicate between the processes
        wait_for(lambda: all_in(db, ids, "succeeded"), what="all jobs succeeded")
        assert rows(db, "SELECT count(*), count(DISTINCT n) FROM witness") == [(200, 200)]
        by_pid = rows(db, "SELECT pid, count(*) FROM witness GROUP BY pid")
        print("jobs run per uvicorn worker process:", by_pid)
        assert server.pid not in {p for p, _ in by_pid}


def test_sigkilled_worker_jobs_are_requeued_after_the_lease_and_charged_an_attempt(app_dir, db, tmp_path):
    # Given a job whose first attempt hangs, running in a worker with a 1 s lease
    env = env_for(app_dir, db, JOBS_LEASE=1)
    [jid] = enqueue(db, "jobsapp:stall_first", [((1,), {})], max_attempts=2)
    with running(start_worker("jobsapp:tasks", app_dir, env, log=tmp_path / "a.log")) as a:
        wait_for(lambda: rows(db, "SELECT progress FROM fh_jobs WHERE id=?", [jid])[0][0], what="first attempt running")
        # When that worker is SIGKILLed and another one is started
        a.kill()
        a.wait()
        assert rows(db, "SELECT state, attempts FROM fh_jobs WHERE id=?", [jid]) == [("running", 1)]
        with running(start_worker("jobsapp:tasks", app_dir, env, log=tmp_path / "b.log")) as b:
            # Then, once the lease has run out, the job is requeued, charged an attempt, and runs again
            wait_for(lambda: all_in(db, [jid], "succeeded"), what="job succeeded on the second worker")
            stop(b)
    [(attempts, result)] = rows(db, "SELECT attempts, result FROM fh_jobs WHERE id=?", [jid])
    assert attempts == 2
    assert json.loads(result) == {"attempt": 2, "pid": b.pid}


def test_a_job_that_kills_its_worker_ends_failed_after_its_attempts(app_dir, db, tmp_path):
    # Given jobs that SIGKILL or os._exit their own worker process, among ordinary jobs
    env = env_for(app_dir, db, JOBS_LEASE=1)
    [kill] = enqueue(db, "jobsapp:poison_kill", [((), {})], max_attempts=3)
    [exit_] = enqueue(db, "jobsapp:poison_exit", [((), {})], max_attempts=1)
    ok = enqueue(db, "jobsapp:record", [((i,), {}) for i in range(20)], max_attempts=11)
    # When two supervised worker processes serve them (the supervisor restarts a worker that dies)
    log = tmp_path / "workers.log"
    with running(start_worker("jobsapp:tasks", app_dir, env, "--processes", "2", "--concurrency", "4", log=log)) as sup:
        wait_for(lambda: all_in(db, [kill, exit_], "failed") and all_in(db, ok, "succeeded"), timeout=60,
                 what="poison jobs failed and the others succeeded")
        assert stop(sup) == 0
    # Then each poison job ended failed as a lost worker after 3 charged attempts (retries=2, and the floor for lost
    # workers with retries=0), and the rest succeeded
    got = {r[0]: r[1:] for r in rows(db, "SELECT id, attempts - excused, error FROM fh_jobs WHERE id IN (?, ?)",
                                     [kill, exit_])}
    assert got[kill][0] == 3 and got[exit_][0] == 3
    for _, error in got.values(): assert json.loads(error)["type"] == "WorkerLost"
    # (an attempt is charged only to a job that ran alone in the worker that died: 3 lone deaths for each)
    assert log.read_text().count("starting another") >= 6, log.read_text()


def test_sigterm_lets_running_jobs_finish_and_gives_the_rest_back(app_dir, db, tmp_path):
    # Given a worker (concurrency 4, grace 1.5 s) running 2 long jobs and 2 short ones, with 8 more queued
    env = env_for(app_dir, db)
    long = enqueue(db, "jobsapp:nap", [((i, 30.0), {}) for i in range(2)])
    short = enqueue(db, "jobsapp:nap", [((10 + i, 0.8), {}) for i in range(10)])
    with running(start_worker("jobsapp:tasks", app_dir, env, "--concurrency", "4", "--grace", "1.5",
                              log=tmp_path / "w.log")) as w:
        wait_for(lambda: states(db).get("running") == 4, what="4 jobs running")
        # When it gets SIGTERM
        t0 = time.monotonic()
        assert stop(w, signal.SIGTERM) == 0
        took = time.monotonic() - t0
    # Then it exits within the grace period; the short jobs that were running succeeded, the long ones and
    # the unclaimed ones are queued again without an attempt charged; nothing is running or lost
    assert took < 5, took
    final = dict(rows(db, "SELECT id, state || ':' || attempts FROM fh_jobs"))
    assert len(final) == 12
    assert {final[i] for i in long} == {"queued:0"}
    assert {final[i] for i in short} == {"queued:0", "succeeded:1"}
    assert 2 <= sum(final[i] == "succeeded:1" for i in short) <= 4
    assert rows(db, "SELECT count(*) FROM witness WHERE n < 10") == [(0,)]


def test_a_second_signal_gives_running_jobs_back_at_once(app_dir, db, tmp_path):
    # Given a worker with a long grace period running 2 long jobs
    env = env_for(app_dir, db)
    ids = enqueue(db, "jobsapp:nap", [((i, 60.0), {}) for i in range(2)])
    with running(start_worker("jobsapp:tasks", app_dir, env, "--grace", "60", log=tmp_path / "w.log")) as w:
        wait_for(lambda: all_in(db, ids, "running"), what="jobs running")
        # When it gets SIGTERM, waits, then gets SIGINT
        w.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert w.poll() is None  # still giving the jobs their grace period
        t0 = time.monotonic()
        assert stop(w, signal.SIGINT, timeout=5) == 0
        # Then it exits at once and the jobs are back in the queue, their attempt not charged
        assert time.monotonic() - t0 < 3
    assert sorted(rows(db, "SELECT state, attempts FROM fh_jobs")) == [("queued", 0), ("queued", 0)]


def test_app_lifespan_shutdown_finishes_or_returns_jobs(app_dir, db):
    # Given the web app with its in-process worker (grace 1 s), running long and short jobs
    env = env_for(app_dir, db, WEB_WORKERS=1, JOBS_GRACE=1)
    with uvicorn_server("webapp:app", cwd=app_dir, env=env) as (url, server):
        for i in range(3): httpx.post(f"{url}/defer", data={"n": i, "pause": 30})
        for i in range(3): httpx.post(f"{url}/defer", data={"n": 10 + i, "pause": 0.3})
        wait_for(lambda: states(db).get("running", 0) >= 4, what="jobs running")
        # When uvicorn gets SIGTERM
        t0 = time.monotonic()
        assert stop(server, signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        took = time.monotonic() - t0
    # Then the server exits within the grace period, the long jobs are queued again, no job is left running
    assert took < 6, took
    final = states(db)
    assert final.get("running", 0) == 0
    assert final.get("queued", 0) >= 3 and final.get("queued", 0) + final.get("succeeded", 0) == 6
    assert rows(db, "SELECT count(*) FROM witness WHERE n < 10") == [(0,)]


def test_corrupt_and_hostile_rows_fail_alone(app_dir, db, tmp_path):
    # Given rows written behind the app's back: broken JSON, the wrong JSON shape, an unregistered task
    # (named like an importable function), arguments that do not fit, and ordinary jobs
    from fh_tasks.store import NewJob
    from fh_tasks.store.sqlite import SQLiteStore
    now = time.time()
    bad = {"broken": ("jobsapp:record", '{"args": [1'), "shape": ("jobsapp:record", "[1, 2]"),
           "unknown": ("os:system", '{"args": ["touch /tmp/pwned"]}'),
           "misfit": ("jobsapp:record", '{"kwargs": {"nope": 1}}')}
    store = SQLiteStore(db)
    store.enqueue([NewJob(id=k, task=t, args=a, run_at=now, created_at=now) for k, (t, a) in bad.items()])
    store.close()
    good = enqueue(db, "jobsapp:record", [((i,), {}) for i in range(5)], max_attempts=11)
    # When a standalone worker drains the queue
    w = start_worker("jobsapp:tasks", app_dir, env_for(app_dir, db), "--burst", log=tmp_path / "w.log")
    assert w.wait(30) == 1  # exit code 1: some jobs failed
    # Then each bad row failed with a clear stored error, and the worker ran the others
    errors = {k: json.loads(e) for k, e in rows(db, "SELECT id, error FROM fh_jobs WHERE state='failed'")}
    assert set(errors) == set(bad) - {"unknown"}
    assert errors["broken"]["type"] == "DecodeError" and "cannot be decoded" in errors["broken"]["message"]
    assert errors["shape"]["type"] == "DecodeError"
    # (a task this worker does not know stays queued, untouched, for a worker that does)
    assert rows(db, "SELECT state, attempts, error FROM fh_jobs WHERE id='unknown'") == [("queued", 0, None)]
    assert errors["misfit"]["type"] == "TypeError" and "nope" in errors["misfit"]["message"]
    assert all_in(db, good, "succeeded")
    assert not Path("/tmp/pwned").exists()
    assert not alive(w.pid)
