"""The `fh-tasks` console script against a real store: help and env vars, clear errors, ls/show/stats tables,
redaction, retry/cancel/purge, and `wait` with its progress bar."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_support import FH_TASKS, cli, enqueue, env_for, make_db, rows, running, start_worker, stop, write_modules

from fh_tasks import Tasks
from fh_tasks.store import NewJob
from fh_tasks.store.sqlite import SQLiteStore
from fh_tasks.testing import drain

pytestmark = pytest.mark.timeout(60)
ENV_NAMES = ("FH_TASKS_APP", "FH_TASKS_DB", "FH_TASKS_PROCESSES", "FH_TASKS_CONCURRENCY", "FH_TASKS_QUEUES",
             "FH_TASKS_LOG_LEVEL", "FH_TASKS_GRACE", "FH_TASKS_LEASE", "FH_TASKS_LOG_FORMAT")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_modules(tmp_path)


@pytest.fixture
def store(app_dir: Path, tmp_path: Path) -> dict[str, object]:
    "A store with 3 succeeded jobs, 1 failed login (with secrets in its arguments), 2 queued ones, 1 cancelled."
    db = make_db(tmp_path / "jobs.db")
    ok = enqueue(db, "jobsapp:record", [((i,), {}) for i in range(3)], max_attempts=11)
    secrets = {"api_key": "sk-live-123", "options": {"token": "t0k"}}
    [failed] = enqueue(db, "jobsapp:login", [(("ada", "hunter2"), secrets)])
    worker = start_worker("jobsapp:tasks", app_dir, env_for(app_dir, db), "--burst")
    assert worker.wait(30) == 1  # a burst worker's exit code says a job (the login) failed
    queued = enqueue(db, "jobsapp:record", [((i,), {}) for i in (10, 11)], queue="later")
    [cancelled] = enqueue(db, "jobsapp:record", [((12,), {})], queue="later")
    SQLiteStore(db).cancel(cancelled)
    return {"db": db, "ok": ok, "failed": failed, "queued": queued, "cancelled": cancelled,
            "env": env_for(app_dir, db), "dir": app_dir}


def run(s: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    return cli(s["dir"], s["env"], *args)  # type: ignore[arg-type]


def test_help_names_every_command_and_environment_variable(app_dir: Path):
    # When help is asked for, Then every command is listed and every worker option names its variable
    top = cli(app_dir, env_for(app_dir, "x.db"), "--help")
    assert top.returncode == 0
    for cmd in ("worker", "ls", "show", "retry", "cancel", "purge", "stats", "wait"): assert cmd in top.stdout
    worker = cli(app_dir, env_for(app_dir, "x.db"), "worker", "--help")
    for var in ENV_NAMES: assert var in " ".join(worker.stdout.split()), var
    version = subprocess.run([sys.executable, "-m", "fh_tasks", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fh-tasks ")


@pytest.mark.parametrize("args, env, message", [
    (["worker", "jobsapp:tasks"], {"FH_TASKS_CONCURRENCY": "0"}, "FH_TASKS_CONCURRENCY: '0' is not a whole number"),
    (["worker", "jobsapp:tasks", "--grace", "soon"], {}, "'soon' is not a duration"),
    (["worker", "nosuch:tasks"], {}, "cannot import 'nosuch': no such module"),
    (["worker", "jobsapp:nothing"], {}, "jobsapp has no attribute 'nothing'"),
    (["worker", "jobsapp:record"], {}, "is a Task, not a Tasks hub"),
    (["worker"], {}, "name the app's hub"),
    (["ls", "--db", "missing.db"], {}, "no job store at missing.db"),
    (["show", "feedface"], {}, "no job 'feedface'"),
])
def test_mistakes_get_a_clear_error(store, args, env, message):
    # When the command is called wrongly, Then it exits 2 with a message naming the mistake, and no traceback
    out = cli(store["dir"], {**store["env"], **env}, *args, *(["--db", store["db"]] if args[0] == "show" else []))
    assert out.returncode == 2, out
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_environment_variables_stand_in_for_flags(store):
    # Given the target, store and queue given only as FH_TASKS_* variables
    env = {**store["env"], "FH_TASKS_APP": "jobsapp:tasks", "FH_TASKS_DB": store["db"], "FH_TASKS_QUEUES": "later",
           "FH_TASKS_CONCURRENCY": "2", "FH_TASKS_LOG_LEVEL": "debug"}
    # When a burst worker and `ls` run without flags for them
    worker = subprocess.run([FH_TASKS, "worker", "--burst"], cwd=store["dir"], env=env, capture_output=True,
                            text=True, timeout=30)
    listed = subprocess.run([FH_TASKS, "ls", "--state", "succeeded"], cwd=store["dir"], env=env, capture_output=True,
                            text=True, timeout=30)
    # Then the worker served the queue named by the variable, and `ls` read the store it names
    assert worker.returncode == 0, worker.stderr
    assert "serving queue(s) later with concurrency 2" in worker.stderr and "DEBUG" in worker.stderr
    assert rows(store["db"], "SELECT state FROM fh_jobs WHERE id IN (?, ?)", store["queued"]) == [("succeeded",)] * 2
    assert all(jid in listed.stdout for jid in store["queued"])


def test_ls_lists_jobs_in_a_table_with_filters(store):
    # When jobs are listed, Then a table shows each one, newest first
    out = run(store, "ls", "--db", store["db"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "TASK", "STATE", "TRIES", "CREATED", "FINISHED", "ERROR"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + 7
    assert lines[2].startswith(store["cancelled"])
    # And filters by state, task and count work
    failed = run(store, "ls", "--db", store["db"], "--state", "failed").stdout.splitlines()[2:]
    assert len(failed) == 1 and failed[0].startswith(store["failed"]) and "PermissionError: wrong password" in failed[0]
    two = run(store, "ls", "--db", store["db"], "--task", "jobsapp:record", "--limit", "2").stdout.splitlines()
    assert len(two) == 4 and all("jobsapp:record" in line for line in two[2:])


def test_show_redacts_secret_looking_arguments(store):
    # When a job whose arguments hold a password, an API key and a nested token is shown through the app
    out = run(store, "show", store["failed"], "--app", "jobsapp:tasks")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # Then its fields, error and traceback are shown, and no secret value appears
    assert re.search(r"^state\s+failed$", text, re.M) and re.search(r"^attempts\s+1 of 1$", text, re.M)
    assert 'args      ["ada", "[redacted]"]' in text
    assert '"api_key": "[redacted]"' in text and '"token": "[redacted]"' in text
    assert "PermissionError: wrong password for ada" in text and "traceback:" in text
    for secret in ("hunter2", "sk-live-123", "t0k"): assert secret not in text
    # And from the store file alone (no registry) keyword secrets are still redacted
    plain = run(store, "show", store["failed"], "--db", store["db"]).stdout
    assert "sk-live-123" not in plain and "t0k" not in plain


def test_stats_counts_states_and_recent_throughput(store):
    out = run(store, "stats", "--db", store["db"])
    assert out.returncode == 0, out.stderr
    counts = dict(line.split() for line in out.stdout.split("\n\n")[0].splitlines()[2:])
    assert counts["succeeded"] == "3" and counts["failed"] == "1" and counts["queued"] == "2"
    assert counts["cancelled"] == "1" and counts["total"] == "7"
    assert "finished in the last minute: 4" in out.stdout


def test_retry_and_cancel(store):
    db = store["db"]
    # When a failed job is retried, Then it is queued again with fresh attempts
    assert run(store, "retry", store["failed"], "--db", db).stdout.strip() == f"requeued {store['failed']}"
    assert rows(db, "SELECT state, attempts - excused FROM fh_jobs WHERE id=?", [store["failed"]]) == [("queued", 0)]
    # When a job that succeeded is retried, Then it is refused with the reason
    out = run(store, "retry", store["ok"][0], "--db", db)
    assert out.returncode == 2 and "is succeeded; only failed or cancelled jobs can be retried" in out.stderr
    # When a queued job is cancelled, Then it is cancelled; cancelling it again is refused
    assert run(store, "cancel", store["queued"][0], "--db", db).returncode == 0
    assert rows(db, "SELECT state FROM fh_jobs WHERE id=?", [store["queued"][0]]) == [("cancelled",)]
    again = run(store, "cancel", store["queued"][0], "--db", db)
    assert again.returncode == 2 and "only jobs that have not started can be cancelled" in again.stderr


def test_retry_failed_requeues_every_failed_job(store):
    db = store["db"]
    SQLiteStore(db).enqueue([NewJob(id=f"bad{i}", task="jobsapp:login", args='{"args": ["ada", "pw"]}')
                             for i in range(3)])
    assert start_worker("jobsapp:tasks", store["dir"], store["env"], "--burst").wait(30) == 1  # they failed
    assert rows(db, "SELECT count(*) FROM fh_jobs WHERE state='failed'") == [(4,)]
    out = run(store, "retry", "--failed", "--db", db)
    assert out.stdout.strip() == "requeued 4 failed job(s)"
    assert rows(db, "SELECT count(*) FROM fh_jobs WHERE state='failed'") == [(0,)]


def test_purge_deletes_old_finished_jobs_only(store):
    # Given jobs that finished ten days ago besides the fresh ones
    db = store["db"]
    past = Tasks(db=db, clock=lambda: time.time() - 10 * 86400)
    t = past.task(name="cli:old")(lambda n: n)
    for i in range(4): t.defer(i)
    drain(past)
    past.store.close()
    # When finished jobs older than 7 days are purged, Then only those are deleted
    out = run(store, "purge", "--older-than", "7d", "--db", db)
    assert out.returncode == 0 and out.stdout.strip() == "deleted 4 finished job(s) older than 7d", out
    assert rows(db, "SELECT count(*) FROM fh_jobs") == [(7,)]


def test_wait_shows_progress_until_the_queue_drains(store):
    # Given 40 short jobs queued (plus the store's own), a waiting `fh-tasks wait`, then a worker
    enqueue(store["db"], "jobsapp:pause", [((0.02,), {})] * 40)
    wait = subprocess.Popen([FH_TASKS, "wait", "--db", store["db"], "--interval", "0.05"], cwd=store["dir"],
                            env=store["env"], stderr=subprocess.PIPE, text=True)
    with running(wait), running(start_worker("jobsapp:tasks", store["dir"], store["env"], "--queues", "default,later",
                                             "--concurrency", "4")) as w:
        # When the worker drains the queue, Then `wait` exits 0 with the bar at 100 %
        assert wait.wait(30) == 0
        stop(w)
        assert wait.stderr is not None
        err = wait.stderr.read()
    assert "[" + "#" * 30 + "]" in err and " 0 running" in err, err
    assert re.search(r"(\d+)/\1 done", err.splitlines()[-1]), err


def test_wait_gives_up_after_its_timeout(store):
    out = run(store, "wait", "--db", store["db"], "--timeout", "0.3")
    assert out.returncode == 1 and "2 job(s) still pending after 0.3s" in out.stderr


def test_stored_text_cannot_drive_the_terminal(store):
    # Given a job whose stored task name and error carry terminal escape sequences
    db = store["db"]
    SQLiteStore(db).enqueue([NewJob(id="evil", task="\x1b[2Jevil\x07", args='{"kwargs": {"x": "\x1b]0;pwn\x07"}}',
                                    run_at=0, created_at=0)])
    assert start_worker("jobsapp:tasks", store["dir"], store["env"], "--burst").wait(30) == 0
    # When it is listed and shown, Then no control character reaches the terminal (they are escaped)
    for args in (("ls", "--db", db), ("show", "evil", "--db", db)):
        out = run(store, *args)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout
        assert "\\x1b[2Jevil\\x07" in out.stdout
