"""In the web process: a suspect job (one that was running in a worker that died) runs alone: the in-process worker
claims nothing beside it and a request's new job is not handed to it; jobs nobody here can run are left alone."""
from __future__ import annotations

import sqlite3
import threading
import time

from fasthtml.common import P
from integration_support import insert_row, wait_until
from starlette.testclient import TestClient


def test_a_suspect_job_runs_alone_and_requests_do_not_hand_jobs_to_its_worker(site, db):
    # Given an app whose in-process worker starts with a suspect job queued (it was lost with a dead worker)
    app, rt, tasks = site(concurrency=4)
    gate, started = threading.Event(), threading.Event()

    @tasks.task
    def slow() -> str:
        started.set()
        gate.wait(10)
        return "slow"

    @tasks.task
    def quick(n: int) -> int: return n

    @rt("/defer")
    def post(n: int):
        job = quick.defer(n)
        return P(job.id, id="job"), job

    tasks.counts()  # creates the store
    suspect = insert_row(db, slow.name, '{"kwargs": {}}')
    with sqlite3.connect(db) as c: c.execute("UPDATE fh_jobs SET lost = 1 WHERE id = ?", (suspect,))
    other = insert_row(db, quick.name, '{"args": [0]}')
    with TestClient(app) as client:
        # When it runs, and a request defers a job meanwhile
        assert started.wait(10)
        new = client.post("/defer", data={"n": 1}).text.split('id="job">')[1].split("<")[0]
        time.sleep(0.3)
        # Then neither the queued job nor the request's job started beside it
        assert tasks.get(suspect).state == "running"
        assert [tasks.get(i).state for i in (other, new)] == ["queued", "queued"]
        # And once it is done, they run
        gate.set()
        wait_until(lambda: all(tasks.get(i).state == "succeeded" for i in (suspect, other, new)), what="all done")
    assert [tasks.get(i).attempts for i in (suspect, other, new)] == [1, 1, 1]


def test_a_busy_worker_drains_for_a_suspect_job_and_takes_no_handoff_meanwhile(site, db):
    # Given an in-process worker (concurrency 4) running one job that waits on a gate
    app, rt, tasks = site(concurrency=4)
    gate, started = threading.Event(), threading.Event()
    order: list[str] = []

    @tasks.task
    def blocker() -> None:
        started.set()
        gate.wait(10)
        order.append("blocker")

    @tasks.task
    def note(name: str) -> None: order.append(name)

    @rt("/defer")
    def post(name: str):
        job = note.defer(name)
        return P(job.id, id="job"), job

    with TestClient(app) as client:
        blocked = blocker.defer()
        assert started.wait(10)
        # When a suspect job becomes due, and a request defers a job while the worker still runs the first one
        suspect = insert_row(db, note.name, '{"args": ["suspect"]}')
        with sqlite3.connect(db) as c: c.execute("UPDATE fh_jobs SET lost = 1 WHERE id = ?", (suspect,))
        time.sleep(0.5)
        new = client.post("/defer", data={"name": "new"}).text.split('id="job">')[1].split("<")[0]
        time.sleep(0.3)
        # Then the worker claims neither (it drains to run the suspect job alone), and takes no handoff
        assert [tasks.get(i).state for i in (suspect, new)] == ["queued", "queued"]
        # And once the running job ends, the suspect job runs, alone, then the new one
        gate.set()
        wait_until(lambda: all(tasks.get(i).state == "succeeded" for i in (blocked.id, suspect, new)), what="done")
    assert order == ["blocker", "suspect", "new"]
