"""Periodic tasks across real processes: two `fh-tasks worker` processes and two uvicorn servers with in-process
workers all run a scheduler on one store, and a per-second task still fires once per slot, none missing; then
`fh-tasks cron` lists the schedules, their next runs and the last slot fired."""
from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from support import uvicorn_server
from worker_support import cli, env_for, make_db, rows, running, start_worker, stop, wait_for

pytestmark = pytest.mark.timeout(90)

CRON_APP = '''
import os, sqlite3
from fasthtml.common import fast_app
from fh_tasks import Tasks, cron_slot, current_job

DB = os.environ["JOBS_DB"]
app, rt = fast_app()
tasks = Tasks(app, db=DB, workers=int(os.environ.get("WEB_WORKERS", "1")), lease=1.0, grace=2.0)


@tasks.cron("* * * * * *", tz="Europe/Paris", name="cronapp:tick")
def tick() -> None:
    c = sqlite3.connect(DB, timeout=30, isolation_level=None)
    try:
        c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)",
                  (int(cron_slot().timestamp()), current_job().id, current_job().attempt, os.getpid()))
    finally:
        c.close()


@tasks.cron("30 2 * * *", tz="America/New_York", name="cronapp:nightly", missed="skip", queue="reports")
def nightly() -> None: ...
'''


def test_a_per_second_task_fires_once_per_slot_across_four_processes(tmp_path: Path):
    # Given an app with a task every second, and its store
    (tmp_path / "cronapp.py").write_text(CRON_APP)
    db = make_db(tmp_path / "jobs.db")
    env = env_for(tmp_path, db)
    with ExitStack() as stack:
        # When two worker processes and two web servers (each with an in-process worker) run on it
        workers = [stack.enter_context(running(start_worker("cronapp:tasks", tmp_path, env))) for _ in range(2)]
        for _ in range(2): stack.enter_context(uvicorn_server("cronapp:app", cwd=tmp_path, env=env))
        wait_for(lambda: rows(db, "SELECT count(*) FROM fh_workers")[0][0] >= 4, 20, what="four live workers")
        start = time.time()
        time.sleep(6.2)
        end = time.time()
        for p in workers: assert stop(p) == 0
    # Then every second from the first slot fired to the last was fired once, and ran once
    jobs = rows(db, "SELECT id, created_at, state FROM fh_jobs WHERE task = 'cronapp:tick'")
    slots = sorted(int(i[:12], 16) / 1000 for i, _, _ in jobs)
    window = [s for s in slots if start <= s <= end - 1]
    assert len(window) >= 5, slots
    assert slots == [slots[0] + k for k in range(len(slots))], "a slot is missing or fired twice"
    ran = rows(db, "SELECT n, count(*), max(attempt) FROM witness GROUP BY n ORDER BY n")
    assert all(n == 1 and a == 1 for _, n, a in ran), ran
    assert {r[0] for r in ran} >= {int(s) for s in window}
    # And each was stored soon after its time (the scheduler sleeps until the slot, it does not poll)
    late = [created - int(i[:12], 16) / 1000 for i, created, _ in jobs]
    print(f"\nslots {len(slots)}; stored after the slot: median {statistics.median(late) * 1000:.1f} ms, "
          f"max {max(late) * 1000:.1f} ms")
    assert max(late) < 1.0, late

    # When the periodic tasks are listed
    out = cli(tmp_path, env, "cron", "cronapp:tasks", "--next", "2")
    # Then each shows its schedule, time zone, queue, policy, next two runs and last slot fired
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    tick, nightly = lines["cronapp:tick"], lines["cronapp:nightly"]
    assert "* * * * * *" in tick and "Europe/Paris" in tick and "run_once" in tick
    last = datetime.fromtimestamp(slots[-1], ZoneInfo("Europe/Paris")).strftime("%Y-%m-%d %H:%M:%S %Z")
    assert tick.rstrip().endswith(last)
    assert "30 2 * * *" in nightly and "America/New_York" in nightly and "reports" in nightly and "skip" in nightly
    assert nightly.count(" 02:30:00 E") == 2 and nightly.rstrip().endswith("-")  # EST/EDT; never fired
    # And the command needs the app, and is in the help
    assert cli(tmp_path, env, "cron").returncode == 2
    assert "cron" in cli(tmp_path, env, "--help").stdout
