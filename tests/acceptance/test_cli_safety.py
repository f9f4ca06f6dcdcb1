"""The `fh-tasks` command never harms what it is pointed at: read commands never write, no command adopts a
database that is not a job store, a closed pipe ends it quietly, every bad input is a one-line error, and the
worker's log and `show` stay sane whatever a job stored. The supervisor backs off a worker that keeps dying."""
from __future__ import annotations

import gc
import hashlib
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from worker_support import FH_TASKS, cli, enqueue, env_for, make_db, running, start_worker, stop, write_modules

from fh_tasks.cli.workers import BACKOFF, STABLE, backoff
from fh_tasks.store import NewJob
from fh_tasks.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(90)
READS = (["ls"], ["stats"], ["show", "feedface"], ["wait", "--timeout", "0.2"])
WRITES = (["retry", "--failed"], ["cancel", "feedface"], ["purge", "--older-than", "7d"])


def files_of(db: Path) -> dict[str, str]:
    "The database file and everything beside it named after it, hashed."
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(db.parent.iterdir()) if p.name.startswith(db.name)}


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_modules(tmp_path)


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    "Exit code 2, no traceback, and one error line that says it all (argparse puts its usage above it)."
    assert out.returncode == 2, out
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in out.stderr and len(errors) == 1, out.stderr
    for n in needles: assert n in errors[0], (n, out.stderr)


@pytest.mark.parametrize("args", [*READS, *WRITES, ["worker", "jobsapp:tasks", "--burst"]])
def test_no_command_adopts_another_apps_database(app_dir: Path, args: list[str]) -> None:
    # Given another app's SQLite database (rollback journal, its own table)
    db = app_dir / "other.db"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    c.execute("INSERT INTO invoices (total) VALUES (9.5)")
    c.commit()
    c.close()
    before = files_of(db)
    # When any command is pointed at it, Then it refuses, naming the file and why, and the file is untouched
    out = cli(app_dir, env_for(app_dir, str(db)), *args, "--db", str(db))
    one_line_error(out, str(db), "is not an fh-tasks job store", "invoices")
    assert files_of(db) == before
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    c.close()


@pytest.mark.parametrize("args", [*READS, *WRITES])
def test_no_command_creates_a_missing_store(app_dir: Path, args: list[str]) -> None:
    # Through --db, and through the app's hub whose file does not exist yet
    missing = app_dir / "missing.db"
    out = cli(app_dir, env_for(app_dir, str(missing)), *args, "--db", str(missing))
    one_line_error(out, f"no job store at {missing}")
    out = cli(app_dir, env_for(app_dir, str(missing)), *args, "--app", "jobsapp:tasks")
    one_line_error(out, f"no job store at {missing}")
    assert not any(p.name.startswith("missing.db") for p in app_dir.iterdir())


@pytest.mark.parametrize("args", READS)
def test_read_commands_never_write(app_dir: Path, args: list[str]) -> None:
    # Given a store with jobs, closed (its file holds everything)
    db = make_db(app_dir / "jobs.db")
    [jid] = enqueue(db, "jobsapp:record", [((1,), {})])
    gc.collect()  # no connection of this process stays open to checkpoint later
    before = files_of(Path(db))
    assert list(before) == ["jobs.db"]
    # When a read command runs on it (through --db, and through the app)
    args = [a if a != "feedface" else jid for a in args]
    for where in (["--db", db], ["--app", "jobsapp:tasks"]):
        out = cli(app_dir, env_for(app_dir, db), *args, *where)
        assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out
    # Then the database file is byte for byte the same (SQLite may leave an empty WAL for a read-only reader)
    after = files_of(Path(db))
    assert after["jobs.db"] == before["jobs.db"]
    assert set(after) <= {"jobs.db", "jobs.db-wal", "jobs.db-shm"} and not Path(f"{db}-wal").read_bytes()


def test_a_closed_pipe_ends_the_command_quietly(app_dir: Path) -> None:
    # Given more jobs than a pipe holds
    db = make_db(app_dir / "jobs.db")
    enqueue(db, "jobsapp:record", [((i,), {}) for i in range(3000)])
    # When the reader stops after one line (`fh-tasks ls | head -1`)
    p = subprocess.Popen([FH_TASKS, "ls", "--db", db, "--limit", "3000"], cwd=app_dir, env=env_for(app_dir, db),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with running(p):
        assert p.stdout is not None and p.stdout.readline().startswith(b"ID")
        p.stdout.close()
        assert p.wait(30) == 128 + signal.SIGPIPE
        assert p.stderr is not None and p.stderr.read() == b""
    # And in a shell pipeline, nothing is printed but the line asked for
    sh = subprocess.run(f"'{FH_TASKS}' ls --db '{db}' --limit 3000 | head -1", shell=True, cwd=app_dir,
                        env=env_for(app_dir, db), capture_output=True, text=True, timeout=30)
    assert sh.stdout.startswith("ID") and len(sh.stdout.splitlines()) == 1 and sh.stderr == ""


@pytest.mark.parametrize("args, message", [
    (["purge", "--older-than", "3"], "'3' has no unit: write it like 3d"),
    (["purge", "--older-than", "2.5"], "'2.5' has no unit: write it like 2.5d"),
    (["ls", "--limit", "99999999999999999999"], "'99999999999999999999' is not a whole number from 1 to 1000000"),
    (["ls", "--limit", "0"], "'0' is not a whole number from 1 to 1000000"),
    (["worker", "jobsapp:tasks", "--processes", "99999999999"], "is not a whole number from 1 to 256"),
    (["worker", "jobsapp:tasks", "--concurrency", "10000000000000"], "is not a whole number from 1 to 100000"),
    (["worker", "jobsapp:tasks", "--grace", "99999999999d"], "'99999999999d' is longer than 100 years"),
    (["worker", "jobsapp:tasks", "--lease", "1e400"], "'1e400' is not a duration"),
    (["wait", "--timeout", "9999999999999999999999"], "is not a duration"),
    (["worker", "jobsapp.py:tasks"], "'jobsapp.py:tasks' names a file; name its module instead: jobsapp:tasks"),
    (["worker", "src/app.py:tasks"], "name its module instead: src.app:tasks"),
    (["worker", "./src/pkg/app.py"], "name its module instead: src.pkg.app "),
])
def test_bad_input_is_a_one_line_error(app_dir: Path, args: list[str], message: str) -> None:
    db = make_db(app_dir / "jobs.db")
    out = cli(app_dir, env_for(app_dir, db), *args, *(["--db", db] if args[0] in ("ls", "purge", "wait") else []))
    one_line_error(out, message)


def test_a_bare_number_never_purges(app_dir: Path) -> None:
    # Given finished jobs, When purge is given a bare number, Then nothing is deleted
    db = make_db(app_dir / "jobs.db")
    enqueue(db, "jobsapp:record", [((i,), {}) for i in range(3)])
    assert start_worker("jobsapp:tasks", app_dir, env_for(app_dir, db), "--burst").wait(30) == 0
    assert cli(app_dir, env_for(app_dir, db), "purge", "--older-than", "0", "--db", db).returncode == 2
    assert SQLiteStore(db).counts() == {"succeeded": 3}
    out = cli(app_dir, env_for(app_dir, db), "purge", "--older-than", "0s", "--db", db)
    assert out.returncode == 0 and out.stdout.strip() == "deleted 3 finished job(s) older than 0s"


def test_show_prints_something_sane_for_deep_or_huge_stored_values(app_dir: Path) -> None:
    # Given jobs whose stored arguments, progress and result are nested 5,000 deep or megabytes long
    db = make_db(app_dir / "jobs.db")
    deep = "[" * 5000 + "]" * 5000
    huge = '"' + "x" * 3_000_000 + '"'
    store = SQLiteStore(db)
    store.enqueue([NewJob(id="deep", task="t", args='{"args": [' + deep + '], "kwargs": {}}', run_at=0, created_at=0),
                   NewJob(id="huge", task="t", args='{"args": [' + huge + '], "kwargs": {}}', run_at=0, created_at=0)])
    store.close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE fh_jobs SET progress = ?, result = ?, error = ? WHERE id = 'deep'",
                  (deep, deep, '{"type": "E", "message": "m", "traceback": "' + "line\\n" * 100_000 + '"}'))
    # When they are shown, Then each prints a bounded, readable page and no traceback
    for jid in ("deep", "huge"):
        out = cli(app_dir, env_for(app_dir, db), "show", jid, "--db", db)
        assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
        assert len(out.stdout) < 80_000 and re.search(rf"^id\s+{jid}$", out.stdout, re.M)
    assert "more characters)" in cli(app_dir, env_for(app_dir, db), "show", "huge", "--db", db).stdout


HOSTILE_APP = '''
from fh_tasks import Tasks
tasks = Tasks(db={db!r}, workers=0)

@tasks.task
def hostile() -> None:
    raise ValueError("boom\\n2026-01-01 00:00:00 INFO    [1] fh_tasks.worker: all jobs done\\x1b[2J\\x07")
'''


def test_the_worker_log_escapes_what_a_job_stored(tmp_path: Path) -> None:
    # Given a job whose error message holds a newline, a forged log line and terminal escapes
    db = str(tmp_path / "jobs.db")
    (tmp_path / "hostileapp.py").write_text(HOSTILE_APP.format(db=db))
    env = env_for(tmp_path, db)
    enqueue(db, "hostileapp:hostile", [((), {})])
    # When a worker runs it
    out = subprocess.run([FH_TASKS, "worker", "hostileapp:tasks", "--burst"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    # Then its log names the failure on one line, escaped, and forges nothing (exit code 1: a job failed)
    assert out.returncode == 1, out.stderr
    assert "boom\\n2026-01-01 00:00:00 INFO    [1] fh_tasks.worker: all jobs done\\x1b[2J\\x07" in out.stderr
    assert "\x1b" not in out.stderr and "\x07" not in out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("2026-01-01 00:00:00")]


DYING_APP = '''
import os, sys, time
from fh_tasks import Tasks
tasks = Tasks(db={db!r}, workers=0)
if "--processes" in sys.argv and sys.argv[sys.argv.index("--processes") + 1] == "1":  # a supervised worker process
    try: os.close(os.open({keeper!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # the first one lives on
    except FileExistsError:
        with open({starts!r}, "a") as f: f.write(f"{{time.monotonic()}}\\n")
        os._exit(3)
'''


def test_the_supervisor_backs_off_a_worker_that_keeps_dying(tmp_path: Path) -> None:
    # Given a worker target whose worker processes, but the first, exit with code 3 as soon as they start
    db = make_db(tmp_path / "jobs.db")
    starts = tmp_path / "starts"
    (tmp_path / "dyingapp.py").write_text(DYING_APP.format(db=db, starts=str(starts), keeper=str(tmp_path / "keep")))
    # When a supervisor runs two worker processes for a while
    sup = subprocess.Popen([FH_TASKS, "worker", "dyingapp:tasks", "--processes", "2"], cwd=tmp_path,
                           env=env_for(tmp_path, db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deaths = re.compile(r"ended with exit code 3 after [\d.]+s; starting another in ([\d.]+)s")
    with running(sup):
        assert sup.stderr is not None
        lines: list[str] = []
        for line in sup.stderr:  # (the suite's timeout stops this if the deaths never come)
            lines.append(line)
            if len(deaths.findall("".join(lines))) == 3: break
        # (and is told to stop while it waits 2 s to restart the dying one: no worker process is starting)
        t, started = time.monotonic(), len(starts.read_text().split())
        assert stop(sup) == 0
        stopped_in = time.monotonic() - t
        log = "".join(lines) + sup.stderr.read()
    # Then each death is logged with its exit code, and the delay before the next start doubles
    delays = [float(d) for d in deaths.findall(log)]
    assert delays == [0.5, 1.0, 2.0], log
    # And the processes really were started that far apart
    times = [float(x) for x in starts.read_text().split()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g >= d for g, d in zip(gaps, delays, strict=False)), (gaps, delays)
    # And stopping did not wait for the pending restart, nor start another process
    assert stopped_in < 5.0 and len(starts.read_text().split()) == started
    assert "every worker process has stopped" in log


def test_the_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    first, cap = BACKOFF
    d, seen = None, []
    for _ in range(12):
        d = backoff(d, uptime=0.1)
        seen.append(d)
    assert seen[:4] == [first, first * 2, first * 4, first * 8] and seen[-1] == cap and max(seen) == cap
    assert backoff(cap, uptime=STABLE) == first and backoff(cap, uptime=STABLE - 1) == cap
