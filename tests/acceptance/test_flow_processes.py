"""Flow control across processes: uniqueness keys under concurrent defers from two processes, and a high-priority
job overtaking a thousand queued ones in a real `fh-tasks worker` process."""
from __future__ import annotations

import subprocess
from pathlib import Path

from worker_support import PY, env_for, make_db, rows, start_worker, stop, wait_for, write_modules

#: Run in each of two processes: 4 threads on 4 hubs (4 connections) defer the same key at the same moment.
DEFER = '''
import sys, threading
from fh_tasks import Tasks
hubs = [Tasks(db=sys.argv[1], workers=0) for _ in range(4)]
tasks = [h.task(name="flow:keyed")(lambda n: n) for h in hubs]
go, ids = threading.Barrier(4), [None] * 4
def run(i):
    go.wait()
    ids[i] = tasks[i].with_options(key="user:42").defer(i).id
threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(" ".join(ids))
'''


def test_two_processes_deferring_one_key_store_one_job_and_all_callers_get_its_id(tmp_path: Path):
    db = make_db(tmp_path / "jobs.db")
    procs = [subprocess.Popen([PY, "-c", DEFER, db], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    ids = [id for p in procs for id in p.communicate(timeout=60)[0].split()]
    assert all(p.returncode == 0 for p in procs) and len(ids) == 8
    stored = rows(db, "SELECT id FROM fh_jobs WHERE ukey = 'user:42'")
    assert len(stored) == 1 and set(ids) == {stored[0][0]}


def test_a_high_priority_job_starts_first_in_a_worker_process_with_1000_queued(tmp_path: Path):
    # Given 1,000 low-priority jobs queued, then one of priority 10
    write_modules(tmp_path)
    db = make_db(tmp_path / "jobs.db")
    env = env_for(tmp_path, db)
    code = ("import jobsapp; jobsapp.record.defer_many([(i,) for i in range(1000)]); "
            "print(jobsapp.record.with_options(priority=10).defer(-1).id)")
    high = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()
    # When a worker process runs them one at a time
    w = start_worker("jobsapp:tasks", tmp_path, env, "--concurrency", "1")
    try: wait_for(lambda: rows(db, "SELECT count(*) FROM witness")[0][0] >= 20, what="20 jobs run")
    finally: stop(w)
    # Then the high job ran first
    first = rows(db, "SELECT n, job FROM witness ORDER BY rowid LIMIT 1")[0]
    assert first == (-1, high), first
