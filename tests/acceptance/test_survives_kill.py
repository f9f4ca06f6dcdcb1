"""The durability promise with real processes: a job outlives a server killed with SIGKILL, and runs after a restart."""
from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from support import uvicorn_server

APP = '''
import os, time
from fasthtml.common import P, fast_app
from fh_tasks import Tasks

app, rt = fast_app()
tasks = Tasks(app, db=os.environ["JOBS_DB"], workers=int(os.environ["WORKERS"]), lease=float(os.environ["LEASE"]))
OUT = os.environ["OUT"]

@tasks.task(retries=2)
def record(text: str):
    with open(OUT, "a") as f: f.write(f"start {text}\\n")
    time.sleep(float(os.environ["TASK_SLEEP"]))
    with open(OUT, "a") as f: f.write(f"done {text}\\n")

@rt("/")
def index(text: str):
    job = record.defer(text=text)
    return P(job.id, id="job"), job
'''


@contextmanager
def server(tmp_path: Path, *, workers: int, lease: float = 2.0, task_sleep: float = 0.0) -> Iterator[Any]:
    "The app above under uvicorn; yields (base_url, process)."
    (tmp_path / "killme.py").write_text(APP)
    env = {"JOBS_DB": str(tmp_path / "jobs.db"), "OUT": str(tmp_path / "out.txt"), "WORKERS": str(workers),
           "LEASE": str(lease), "TASK_SLEEP": str(task_sleep)}
    with uvicorn_server("killme:app", cwd=tmp_path, env=env) as served:
        yield served


def row(tmp_path: Path, job_id: str) -> dict[str, Any]:
    with sqlite3.connect(tmp_path / "jobs.db") as c:
        c.row_factory = sqlite3.Row
        r = c.execute("SELECT * FROM fh_jobs WHERE id = ?", (job_id,)).fetchone()
    assert r is not None, f"job {job_id} is not in the store"
    return dict(r)


def wait_state(tmp_path: Path, job_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (r := row(tmp_path, job_id))["state"] != state:
        assert time.monotonic() < deadline, f"job still {r['state']} after {timeout}s, expected {state}"
        time.sleep(0.05)
    return r


def defer(url: str, text: str) -> str:
    "Request the page that defers a job; returns the job id it shows."
    r = httpx.get(url + "/", params={"text": text})
    assert r.status_code == 200, r.text
    found = re.search(r'id="job">([0-9a-f]+)<', r.text)
    assert found, r.text
    return found.group(1)


def lines(tmp_path: Path) -> list[str]:
    out = tmp_path / "out.txt"
    return out.read_text().splitlines() if out.exists() else []


def test_job_deferred_right_before_a_sigkill_runs_after_restart(tmp_path: Path) -> None:
    # Given the app running with no worker, so nothing can pick the job up before the kill
    with server(tmp_path, workers=0) as (url, proc):
        # When a page defers a job and the server is SIGKILLed as soon as the response has arrived
        job_id = defer(url, "hello")
        proc.kill()
        proc.wait()
    # Then the job is in the SQLite file, queued, untouched
    r = row(tmp_path, job_id)
    assert (r["state"], r["attempts"]) == ("queued", 0) and lines(tmp_path) == []
    # And when the app starts again with its worker, the job runs once to success
    with server(tmp_path, workers=1):
        r = wait_state(tmp_path, job_id, "succeeded")
    assert r["attempts"] == 1 and lines(tmp_path) == ["start hello", "done hello"]


def test_job_running_when_the_server_is_sigkilled_runs_again_after_restart(tmp_path: Path) -> None:
    # Given the app with a worker and a short lease, and a job that takes long on this first run
    with server(tmp_path, workers=1, lease=1.0, task_sleep=60) as (url, proc):
        job_id = defer(url, "again")
        # When the job has started and the server is SIGKILLed mid-job
        r = wait_state(tmp_path, job_id, "running")
        deadline = time.monotonic() + 10
        while lines(tmp_path) != ["start again"]:
            assert time.monotonic() < deadline, lines(tmp_path)
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    # Then the store still says running (nobody is left to say otherwise) on the first attempt
    r = row(tmp_path, job_id)
    assert (r["state"], r["attempts"]) == ("running", 1)
    # And when the app starts again, the lease runs out, the job is requeued and runs to success on attempt 2
    with server(tmp_path, workers=1, lease=1.0):
        r = wait_state(tmp_path, job_id, "succeeded")
    assert r["attempts"] == 2
    assert lines(tmp_path) == ["start again", "start again", "done again"]
