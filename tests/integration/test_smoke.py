"""The README example, end to end in-process: defer in a handler, the lifespan worker runs it."""
from __future__ import annotations

import time

from fasthtml.common import P, Titled, fast_app
from starlette.testclient import TestClient


def test_handler_job_runs_after_response(make_tasks):
    # Given an app with a task
    app, rt = fast_app()
    tasks = make_tasks(app)
    seen: list[str] = []

    @tasks.task
    def greet(name: str) -> str:
        seen.append(name)
        return f"hi {name}"

    @rt("/")
    def index(name: str):
        job = greet.defer(name=name)
        return Titled("ok", P(job.id, id="jid")), job

    # When the page is requested
    with TestClient(app) as cli:
        r = cli.get("/", params={"name": "ada"})
        assert r.status_code == 200, r.text
        jid = r.text.split('id="jid">')[1].split("<")[0]
        # Then the job is stored, runs, and its result is recorded
        rec = tasks.get(jid)
        assert rec is not None and rec.task.endswith(".greet")
        deadline = time.monotonic() + 5
        while not rec.done and time.monotonic() < deadline:
            time.sleep(0.01)
            rec = tasks.get(jid)
        assert rec.state == "succeeded" and rec.result == "hi ada"
    assert seen == ["ada"]
