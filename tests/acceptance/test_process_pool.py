"""`@tasks.task(process=True)` in real pool processes: tasks from a script run as __main__ and from a module
uvicorn imports, results/errors/timeouts recorded, progress from the child, and no orphan at shutdown or kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support import uvicorn_server
from worker_support import alive, enqueue, env_for, make_db, rows, running, start_worker, stop, wait_for, write_modules

pytestmark = pytest.mark.timeout(60)

SCRIPT = '''
import json, os, sys, time
from fh_tasks import Tasks, current_job
from fh_tasks.testing import drain

tasks = Tasks(db=os.environ["JOBS_DB"])


@tasks.task(process=True)
def where(n: int) -> dict:
    current_job().progress({"pid": os.getpid()})
    return {"pid": os.getpid(), "ppid": os.getppid(), "n": sum(range(n)), "attempt": current_job().attempt}


@tasks.task(process=True)
def boom() -> None:
    raise ValueError("bad value from the child")


@tasks.task(process=True, timeout=0.5)
def hang() -> None:
    current_job().progress({"pid": os.getpid()})
    time.sleep(30)


@tasks.task(process=True)
def crash() -> None:
    os._exit(3)


if __name__ == "__main__":
    jobs = {"where": where.defer(1000), "boom": boom.defer(), "hang": hang.defer(), "crash": crash.defer(),
            "after": where.defer(10)}
    drain(tasks, concurrency=2)
    out = {k: {"state": j.get().state.value, "result": j.get().result, "error": j.get().error,
               "progress": j.get().progress} for k, j in jobs.items()}
    print(json.dumps({"main": os.getpid(), "jobs": out}))
'''


@pytest.mark.parametrize("how", ["path", "module"])
def test_process_tasks_defined_in_a_script_run_as_main(tmp_path: Path, how: str):
    # Given a script that defines process=True tasks and, under `if __name__ == "__main__"`, defers and drains them
    (tmp_path / "pscript.py").write_text(SCRIPT)
    db = make_db(tmp_path / "jobs.db")
    cmd = [sys.executable, "pscript.py"] if how == "path" else [sys.executable, "-m", "pscript"]
    # When it runs as `python pscript.py` / `python -m pscript`
    out = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path, db), capture_output=True, text=True, timeout=45)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    jobs = report["jobs"]
    # Then the task ran in a pool process that found it in its registry, with progress from the child
    where = jobs["where"]
    assert where["state"] == "succeeded" and where["result"]["n"] == sum(range(1000)), where
    assert where["result"]["pid"] != report["main"] and where["progress"] == {"pid": where["result"]["pid"]}
    # and an exception, a timeout and a crash each fail only their own job, with a clear stored error
    boom, hang, crash = jobs["boom"]["error"], jobs["hang"]["error"], jobs["crash"]["error"]
    assert boom["type"] == "ValueError" and "bad value from the child" in boom["message"]
    assert 'raise ValueError("bad value from the child")' in boom["traceback"]
    assert hang["type"] == "TaskTimeout"
    assert crash["type"] == "PoolProcessDied" and "exited with code 3" in crash["message"]
    assert jobs["after"]["state"] == "succeeded"
    # and no pool process outlives the script (the timed-out child was killed)
    for pid in (where["result"]["pid"], where["result"]["ppid"], jobs["hang"]["progress"]["pid"]):
        wait_for(lambda pid=pid: not alive(pid), timeout=5, what=f"pool process {pid} gone")


def test_process_task_in_a_module_imported_by_uvicorn_leaves_no_orphan(tmp_path: Path):
    # Given the web app under uvicorn, with a process=True task and its in-process worker
    write_modules(tmp_path)
    db = make_db(tmp_path / "jobs.db")
    with uvicorn_server("webapp:app", cwd=tmp_path, env=env_for(tmp_path, db, WEB_WORKERS=1)) as (url, server):
        # When a request defers it
        jid = httpx.get(f"{url}/cpu", params={"seconds": 0}).text.split('id="job">')[1].split("<")[0]
        wait_for(lambda: rows(db, "SELECT state FROM fh_jobs WHERE id=?", [jid]) == [("succeeded",)], what="job done")
        # Then it ran in a pool process, not in the server process
        child = json.loads(rows(db, "SELECT result FROM fh_jobs WHERE id=?", [jid])[0][0])
        assert child["pid"] != server.pid and alive(child["pid"])
        # And when the server stops, the pool process and the fork server go with it
        assert stop(server) in (0, -signal.SIGTERM)
    for pid in (child["pid"], child["ppid"]):
        wait_for(lambda pid=pid: not alive(pid), timeout=5, what=f"pool process {pid} gone")


def test_sigkilled_worker_takes_its_pool_processes_with_it(tmp_path: Path):
    # Given a standalone worker running a long process=True job
    write_modules(tmp_path)
    db = make_db(tmp_path / "jobs.db")
    [jid] = enqueue(db, "jobsapp:cpu_pid", [((30.0,), {})])
    with running(start_worker("jobsapp:tasks", tmp_path, env_for(tmp_path, db), log=tmp_path / "w.log")) as w:
        progress = wait_for(lambda: rows(db, "SELECT progress FROM fh_jobs WHERE id=?", [jid])[0][0], what="progress")
        child = json.loads(progress)
        assert alive(child["pid"])
        # When the worker is SIGKILLed (no chance to clean up)
        w.kill()
        w.wait()
    # Then its pool process dies too instead of running on as an orphan
    for pid in (child["pid"], child["ppid"]):
        wait_for(lambda pid=pid: not alive(pid), timeout=5, what=f"pool process {pid} gone")


def test_the_pool_is_warm_before_the_first_process_job(tmp_path):
    # Given a hub with a process task and a worker started on it
    import asyncio

    from fh_tasks import Tasks

    tasks = Tasks(db=str(tmp_path / "jobs.db"), workers=0)

    @tasks.task(process=True)
    def square(x: int) -> int:
        return x * x

    async def started_children() -> int:
        w = tasks.worker()
        run = asyncio.ensure_future(w.run())
        for _ in range(200):
            await asyncio.sleep(0.05)
            if w._procs is not None and len(w._procs._idle) == w._procs.size: break
        n = len(w._procs._idle) if w._procs else 0
        w.stop()
        await run
        return n

    # Then every child of the pool (one per core) is started before any job arrives
    assert asyncio.run(started_children()) == (os.cpu_count() or 1)
