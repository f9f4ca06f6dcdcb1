"""Cancelling running jobs from another process (`tasks.cancel(id, running=True)`) with a worker in its own process:
async, thread and process-pool jobs each stop within a second, a killed pool child does not break the pool, and
the later steps of a cancelled workflow step are cancelled."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_support import alive, env_for, make_db, rows, running, start_worker, stop, wait_for

from fh_tasks import JobState, Tasks, chain, group

pytestmark = pytest.mark.timeout(90)

#: The requirement: a cancelled running job stops within this many seconds (the worker checks every 0.5 s).
WITHIN = 1.0

APP = '''
import asyncio, os, sqlite3, time
from fh_tasks import Tasks, current_job
from fh_tasks.store.sqlite import SQLiteStore

DB = os.environ["JOBS_DB"]
tasks = Tasks(store=SQLiteStore(DB), lease=5.0, grace=1.0)


def stopped(kind):
    c = sqlite3.connect(DB, timeout=30, isolation_level=None)
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)",
              (time.time(), current_job().id, 0, os.getpid()))
    c.close()


@tasks.task(name="c:spin_async")
async def spin_async() -> None:
    current_job().progress({"pid": os.getpid()})
    try:
        for _ in range(3000): await asyncio.sleep(0.01)
    finally:
        stopped("async")


@tasks.task(name="c:spin_thread")
def spin_thread() -> None:
    try:
        for i in range(3000):
            current_job().progress({"pid": os.getpid(), "i": i})
            time.sleep(0.01)
    finally:
        stopped("thread")


@tasks.task(name="c:spin_process", process=True)
def spin_process(seconds: float = 30.0) -> dict:
    current_job().progress({"pid": os.getpid()})
    time.sleep(seconds)
    return {"pid": os.getpid()}


@tasks.task(name="c:after")
def after(x=None) -> str:
    stopped("after")
    return "ran"
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Tasks]]:
    "One worker process (concurrency 4, a process pool) for the module, and a hub in this process on its store."
    d = tmp_path_factory.mktemp("cancel")
    (d / "cancelapp.py").write_text(APP)
    db = make_db(d / "jobs.db")
    hub = Tasks(db=db)
    for name in ("spin_async", "spin_thread", "after"):
        hub.task(name=f"c:{name}")(_stub)
    hub.task(name="c:spin_process", process=True)(_stub)
    with running(start_worker("cancelapp:tasks", d, env_for(d, db), "--concurrency", "4", log=d / "worker.log")) as w:
        yield db, hub
        stop(w)
    hub.store.close()


def _stub(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("runs in the worker process")


def _running_pid(db: str, id: str) -> int:
    "Wait until the job runs and reported its pid (progress), and return it."
    got = wait_for(lambda: rows(db, "SELECT progress FROM fh_jobs WHERE id = ? AND state = 'running' AND progress "
                                    "IS NOT NULL", (id,)), timeout=30, what=f"job {id} running")
    return int(json.loads(got[0][0])["pid"])


def _stopped_at(db: str, id: str) -> float:
    got = wait_for(lambda: rows(db, "SELECT n FROM witness WHERE job = ?", (id,)), timeout=5, what=f"job {id} stopped")
    return float(got[0][0])


@pytest.mark.parametrize("kind", ["async", "thread", "process"])
def test_a_running_job_is_cancelled_and_stops_within_a_second(setup: tuple[str, Tasks], kind: str):
    db, hub = setup
    # Given a running job of each kind, in the worker process
    job = hub.registry[f"c:spin_{kind}"].defer()
    pid = _running_pid(db, job.id)
    # When another process cancels it
    t0 = time.time()
    assert hub.cancel(job.id, running=True) is True
    # Then it is cancelled at once
    rec = hub.get(job.id)
    assert rec is not None and rec.state is JobState.cancelled and rec.error is not None
    assert rec.error["type"] == "JobCancelled"
    # and its code stops within a second: the async task and the thread leave their loop, the pool child is killed
    if kind == "process":
        wait_for(lambda: not alive(pid), timeout=5, interval=0.01, what="the pool child killed")
        took = time.time() - t0
    else:
        took = _stopped_at(db, job.id) - t0
    print(f"{kind}: stopped {took:.3f}s after the cancel call")
    assert 0 <= took < WITHIN, f"{kind} job stopped {took:.3f}s after the cancel call"
    # and it stays cancelled (no late outcome overwrites it)
    time.sleep(0.2)
    assert hub.get(job.id).state is JobState.cancelled  # type: ignore[union-attr]


def test_a_killed_pool_child_does_not_break_the_pool(setup: tuple[str, Tasks]):
    db, hub = setup
    spin = hub.registry["c:spin_process"]
    # Given two process jobs running side by side in the pool
    keep, doomed = spin.defer(1.5), spin.defer(30.0)
    keep_pid, doomed_pid = _running_pid(db, keep.id), _running_pid(db, doomed.id)
    assert keep_pid != doomed_pid
    # When one is cancelled (its child killed)
    assert hub.cancel(doomed.id, running=True)
    wait_for(lambda: not alive(doomed_pid), timeout=5, interval=0.01, what="the cancelled job's child killed")
    # Then the other one finishes in its own child, untouched
    rec = keep.wait(timeout=20)
    assert rec.state is JobState.succeeded and rec.result == {"pid": keep_pid}
    # and the next process job runs in a new child
    nxt = spin.defer(0.0).wait(timeout=20)
    assert nxt.state is JobState.succeeded and nxt.result["pid"] not in (doomed_pid,)
    assert alive(keep_pid) or nxt.result["pid"] != keep_pid  # reused only while alive


def test_cancelling_a_running_workflow_step_cancels_the_rest(setup: tuple[str, Tasks]):
    db, hub = setup
    spin, after = hub.registry["c:spin_thread"], hub.registry["c:after"]
    # Given a workflow whose first step runs, then a group with a callback, then a last step
    flow = chain(spin.s(), group(after.s(), after.s()), after.s(), after.s()).defer()
    _running_pid(db, flow.ids[0])
    assert {hub.get(i).state for i in flow.ids[1:]} == {JobState.waiting}  # type: ignore[union-attr]
    # When the running step is cancelled
    assert hub.cancel(flow.ids[0], running=True)
    # Then every later step is cancelled at once, saying why, and none ever runs
    recs = [hub.get(i) for i in flow.ids]
    assert [r.state for r in recs] == [JobState.cancelled] * 5  # type: ignore[union-attr]
    assert all(flow.ids[0] in r.error["message"] for r in recs[1:3])  # type: ignore[union-attr, index]
    _stopped_at(db, flow.ids[0])  # the step itself stopped
    time.sleep(0.3)
    assert not rows(db, "SELECT 1 FROM witness WHERE job IN (SELECT value FROM json_each(?))",
                    (json.dumps(flow.ids[1:]),))


def test_the_worker_logged_no_refused_outcome(setup: tuple[str, Tasks]):
    # A cancelled job records no outcome: the worker never reports one refused as if its lease had expired
    db, _ = setup
    text = Path(db).with_name("worker.log").read_text(errors="replace")
    print(text[-3000:])
    assert "outcome refused" not in text and "Traceback" not in text
