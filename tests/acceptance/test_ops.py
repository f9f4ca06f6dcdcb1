"""Operating a store from the command line: `worker --burst` exit codes, JSON log lines, `backup`, `--version`."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from worker_support import cli, env_for, make_db, rows, start_worker, stop, wait_for

import fh_tasks
from fh_tasks.store import NewJob
from fh_tasks.store.sqlite import SQLiteStore

#: A module of tasks: one succeeds on its second attempt after a short backoff, one always fails.
OPS_APP = '''
import os
from fh_tasks import Tasks, current_job

tasks = Tasks(db=os.environ["JOBS_DB"], workers=0, retention=None)


@tasks.task(retries=1, retry_delay=0.5)
def flaky(n: int) -> int:
    if current_job().attempt == 1: raise ValueError(f"first try of {n}")
    return n


@tasks.task
def broken() -> None:
    raise RuntimeError("broken\\nfake line")


@tasks.task
def fine(n: int) -> int:
    return n
'''


@pytest.fixture
def ops(tmp_path: Path) -> tuple[Path, str, dict[str, str]]:
    (tmp_path / "opsapp.py").write_text(OPS_APP)
    db = make_db(tmp_path / "jobs.db")
    return tmp_path, db, env_for(tmp_path, db)


def store_jobs(db: str, *jobs: tuple[str, str, float]) -> None:
    "Store jobs as (task, args JSON, seconds from now until due)."
    now = time.time()
    s = SQLiteStore(db)
    s.enqueue([NewJob(id=f"j{i}", task=t, args=a, max_attempts=2 if "flaky" in t else 1, run_at=now + d,
                      created_at=now) for i, (t, a, d) in enumerate(jobs)])
    s.close()


def test_burst_finishes_short_retries_and_exits_0_when_no_job_failed(ops) -> None:
    # Given a job that fails once and is retried after a 0.5 s backoff, and one scheduled an hour from now
    dir, db, env = ops
    store_jobs(db, ("opsapp:flaky", '{"args": [1]}', 0), ("opsapp:fine", '{"args": [2]}', 0),
               ("opsapp:fine", '{"args": [3]}', 3600))
    # When a burst worker runs
    started = time.monotonic()
    out = cli(dir, env, "worker", "opsapp:tasks", "--burst")
    # Then it waited for the retry, ran it to success, did not wait for the far job, and exits 0
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 30
    assert dict(rows(db, "SELECT id, state FROM fh_jobs")) == {"j0": "succeeded", "j1": "succeeded", "j2": "scheduled"}


def test_burst_exits_1_when_a_job_failed(ops) -> None:
    # Given a job that fails for good beside one that succeeds
    dir, db, env = ops
    store_jobs(db, ("opsapp:broken", "{}", 0), ("opsapp:fine", '{"args": [1]}', 0))
    # When a burst worker runs, Then both ran and the exit code says a job failed
    out = cli(dir, env, "worker", "opsapp:tasks", "--burst")
    assert out.returncode == 1, out.stderr
    assert dict(rows(db, "SELECT id, state FROM fh_jobs")) == {"j0": "failed", "j1": "succeeded"}
    # And with nothing left to do, the next burst exits 0 at once
    again = cli(dir, env, "worker", "opsapp:tasks", "--burst")
    assert again.returncode == 0, again.stderr


def test_burst_exit_code_does_not_depend_on_the_log_level(ops) -> None:
    # Given a failing job, When a burst worker logs errors only, Then it prints nothing of the warning and exits 1
    dir, db, env = ops
    store_jobs(db, ("opsapp:broken", "{}", 0))
    out = cli(dir, env, "worker", "opsapp:tasks", "--burst", "--log-level", "error")
    assert out.returncode == 1 and out.stderr == "", out.stderr


def test_burst_with_a_supervisor_exits_1_without_restarting(ops) -> None:
    dir, db, env = ops
    store_jobs(db, ("opsapp:broken", "{}", 0))
    out = cli(dir, env, "worker", "opsapp:tasks", "--burst", "--processes", "2")
    assert out.returncode == 1, out.stderr
    assert "starting another" not in out.stderr
    assert rows(db, "SELECT state, attempts FROM fh_jobs") == [("failed", 1)]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_json_logs_are_one_object_per_line_with_the_jobs_id_and_task(ops, how: str) -> None:
    # Given a retried job and one whose error text holds a newline
    dir, db, env = ops
    store_jobs(db, ("opsapp:flaky", '{"args": [1]}', 0), ("opsapp:broken", "{}", 0))
    # When a burst worker logs as JSON (by flag or by variable)
    args = ["--log-format", "json"] if how == "flag" else []
    out = cli(dir, {**env, "FH_TASKS_LOG_FORMAT": "json"} if how == "env" else env,
              "worker", "opsapp:tasks", "--burst", *args)
    # Then every line of its log is one JSON object
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    # And every line about a job carries the job's id and task
    about_jobs = [line for line in lines if line["message"].startswith("job ")]
    assert {line["job_id"] for line in about_jobs} == {"j0", "j1"}
    assert all(line["task"] in ("opsapp:flaky", "opsapp:broken") for line in about_jobs)
    [failed] = [line for line in about_jobs if line.get("action") == "fail"]
    assert failed["job_id"] == "j1" and failed["error_type"] == "RuntimeError"
    assert "broken\nfake line" in failed["message"]  # a newline in stored text stays inside its JSON string
    assert [line["action"] for line in about_jobs if line["job_id"] == "j0"] == ["retry"]


def test_a_bad_log_format_names_its_variable(ops) -> None:
    dir, _, env = ops
    out = cli(dir, {**env, "FH_TASKS_LOG_FORMAT": "xml"}, "worker", "opsapp:tasks", "--burst")
    assert out.returncode == 2 and "FH_TASKS_LOG_FORMAT" in out.stderr and "text or json" in out.stderr


def test_backup_copies_a_store_in_use_into_one_checked_file(ops, tmp_path: Path) -> None:
    # Given a store that keeps receiving jobs while the backup runs
    dir, db, env = ops
    store_jobs(db, *[("opsapp:fine", f'{{"args": [{i}]}}', 0) for i in range(2000)])
    stop = threading.Event()

    def writer() -> None:
        s, i = SQLiteStore(db), 0
        while not stop.is_set():
            s.enqueue([NewJob(id=f"w{i}", task="opsapp:fine", args='{"args": [0]}')])
            i += 1
        s.close()

    t = threading.Thread(target=writer)
    t.start()
    try: out = cli(dir, env, "backup", str(tmp_path / "copy.db"), "--db", db)
    finally:
        stop.set()
        t.join()
    # Then the copy is one file, passes SQLite's integrity check and holds the jobs stored before it began
    assert out.returncode == 0, out.stderr
    copy = tmp_path / "copy.db"
    assert "backed up" in out.stdout and str(copy) in out.stdout
    assert not Path(f"{copy}-wal").exists() and not list(tmp_path.glob("copy.db.part*"))
    c = sqlite3.connect(copy)
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert c.execute("SELECT count(*) FROM fh_jobs WHERE id LIKE 'j%'").fetchone()[0] == 2000
    c.close()
    # And the copy is a store fh-tasks opens and runs
    assert SQLiteStore(str(copy)).counts()["queued"] >= 2000
    # And an existing file is kept unless --force is given
    again = cli(dir, env, "backup", str(copy), "--db", db)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert cli(dir, env, "backup", str(copy), "--db", db, "--force").returncode == 0


def test_backup_refuses_a_file_that_is_not_a_job_store(ops, tmp_path: Path) -> None:
    dir, _, env = ops
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE invoices (id INTEGER)").connection.close()
    out = cli(dir, env, "backup", str(tmp_path / "copy.db"), "--db", str(other))
    assert out.returncode == 2 and "is not an fh-tasks job store" in out.stderr
    assert not (tmp_path / "copy.db").exists()


def test_version_is_the_packages(ops) -> None:
    dir, _, env = ops
    out = cli(dir, env, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fh-tasks {fh_tasks.__version__}"


def test_a_worker_stopped_cleanly_leaves_only_the_store_beside_it(ops) -> None:
    # Given a worker process listening for wake-ups in the folder beside the store
    dir, db, env = ops
    w = start_worker("opsapp:tasks", dir, env)
    try: wait_for(lambda: Path(db + "-wake").is_dir(), what="the wake-up folder")
    finally: code = stop(w)
    # When it is stopped with SIGTERM, Then it exits 0 and removes the folder: only the store's files are left
    assert code == 0
    assert not Path(db + "-wake").exists()
    assert {p.name for p in dir.iterdir() if p.name.startswith("jobs.db")} <= {"jobs.db", "jobs.db-wal", "jobs.db-shm"}
