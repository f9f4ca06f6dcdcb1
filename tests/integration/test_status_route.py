"""The hub's status route goes through the app's own auth (FastHTML Beforeware, skip patterns included), sends
no-store/nosniff, reads a summary of the job (never its result) in a thread, and can move or be switched off."""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastcore.xml import to_xml
from fasthtml.common import Beforeware, RedirectResponse, fast_app
from integration_support import wait_until
from starlette.applications import Starlette
from starlette.testclient import TestClient
from support import free_port, uvicorn_server

from fh_tasks import JobStatus, Tasks
from fh_tasks.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(60)
NO_STORE = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


def ANYONE(req: Any, rec: Any) -> bool:
    "An app's `access` rule that shows every job to anyone (these jobs are deferred outside a request)."
    return True

AUTH_APP = '''
import os
from fasthtml.common import Beforeware, RedirectResponse, fast_app
from fh_tasks import Tasks

def login_required(req, sess):
    if not sess.get("user"): return RedirectResponse("/login", status_code=303)

app, rt = fast_app(secret_key="fh-tasks-tests", before=Beforeware(login_required, skip=[r"/login"]))
tasks = Tasks(app, db=os.environ["JOBS_DB"])

@tasks.task
def leaky() -> None:
    raise RuntimeError("card 4111-1111 declined <b>for ada</b>")

@rt
def login(sess):
    sess["user"] = "ada"
    return "welcome"

@rt
def go(): return leaky.defer().id
'''


def headers_of(r: httpx.Response) -> dict[str, str]:
    return {k: r.headers.get(k, "") for k in NO_STORE}


def test_the_status_route_is_behind_the_apps_beforeware(tmp_path: Path):
    # Given a FastHTML app whose Beforeware sends anyone not logged in to /login, and a job that failed with
    # private text in its error, started by a logged-in user
    (tmp_path / "authapp.py").write_text(AUTH_APP)
    env = {"JOBS_DB": str(tmp_path / "jobs.db")}
    with uvicorn_server("authapp:app", cwd=tmp_path, env=env) as (url, _), \
            httpx.Client(base_url=url) as ada, httpx.Client(base_url=url) as anon:
        assert ada.get("/login").text == "welcome"
        jid = ada.get("/go").text
        path = f"/_tasks/jobs/{jid}/status"
        wait_until(lambda: 'data-state="failed"' in ada.get(path).text, what="job failed")
        # When someone not logged in asks for its status, Then the Beforeware answers, not the hub
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/login" and "4111" not in r.text
        # And the logged-in user gets the fragment, escaped, with no-store and nosniff
        r = ada.get(path)
    assert r.status_code == 200 and headers_of(r) == NO_STORE
    assert "card 4111-1111 declined &lt;b&gt;for ada&lt;/b&gt;" in r.text and "<b>" not in r.text


def test_beforeware_skip_patterns_apply_to_the_status_route(make_tasks):
    # Given an app whose Beforeware refuses everything except the paths it skips, the hub's among them
    def refuse(req):  # no annotation: FastHTML injects the request by its name
        return RedirectResponse("/login", status_code=303)
    app, rt = fast_app(secret_key="t", before=Beforeware(refuse, skip=[r"/_tasks/.*"]))
    tasks = make_tasks(app, workers=0, access=ANYONE)

    @rt("/home")
    def home() -> str: return "home"

    @tasks.task
    def noop() -> None: ...

    job = noop.defer()
    with TestClient(app, follow_redirects=False) as cli:
        # Then the skipped status route answers, and the app's other routes are refused
        r = cli.get(f"/_tasks/jobs/{job.id}/status")
        assert r.status_code == 200 and 'data-state="queued"' in r.text and headers_of(r) == NO_STORE
        assert cli.get("/home").status_code == 303


def test_a_plain_starlette_app_gets_a_plain_route(make_tasks):
    app = Starlette()
    tasks = make_tasks(app, workers=0, access=ANYONE)

    @tasks.task
    def noop() -> None: ...

    job = noop.defer()
    with TestClient(app) as cli:
        r = cli.get(f"/_tasks/jobs/{job.id}/status")
        missing = cli.get("/_tasks/jobs/nope/status")
    assert r.status_code == 200 and 'data-state="queued"' in r.text and headers_of(r) == NO_STORE
    assert missing.status_code == 404 and 'data-state="unknown"' in missing.text and headers_of(missing) == NO_STORE


def test_the_prefix_moves_the_routes_or_switches_them_off(tmp_path: Path):
    # Given one hub serving under /admin/jobs-ui and one with no routes
    moved_app, _ = fast_app(secret_key="t")
    moved = Tasks(moved_app, db=str(tmp_path / "a.db"), workers=0, prefix="/admin/jobs-ui", access=ANYONE)
    off_app, _ = fast_app(secret_key="t")
    off = Tasks(off_app, db=str(tmp_path / "b.db"), workers=0, prefix=None)
    jobs = {}
    for hub in (moved, off):
        @hub.task(name="noop")
        def noop() -> None: ...
        jobs[hub] = noop.defer()
    # Then JobStatus polls the moved route, which answers, and the default path is free
    html = to_xml(JobStatus(jobs[moved]))
    assert f'hx-get="/admin/jobs-ui/jobs/{jobs[moved].id}/status"' in html
    with TestClient(moved_app) as cli:
        assert 'data-state="queued"' in cli.get(f"/admin/jobs-ui/jobs/{jobs[moved].id}/status").text
        assert cli.get(f"/_tasks/jobs/{jobs[moved].id}/status").status_code == 404
    # And with no prefix there is no route, and JobStatus shows the state without polling
    assert "hx-get" not in to_xml(JobStatus(jobs[off]))
    with TestClient(off_app) as cli: assert cli.get(f"/_tasks/jobs/{jobs[off].id}/status").status_code == 404
    for hub in (moved, off): hub.store.close()
    with pytest.raises(ValueError, match="prefix"): Tasks(db=str(tmp_path / "c.db"), prefix="jobs/")
    # And a second hub on the same app needs a prefix of its own
    with pytest.raises(ValueError, match="another hub"):
        Tasks(moved_app, db=str(tmp_path / "c.db"), workers=0, prefix="/admin/jobs-ui")


class RecordingStore(SQLiteStore):
    "A real SQLiteStore that remembers which reads it served, and on which thread."

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.reads: list[tuple[str, str]] = []

    def get(self, id: str) -> Any:
        self.reads.append(("get", threading.current_thread().name))
        return super().get(id)

    def summary(self, id: str) -> Any:
        self.reads.append(("summary", threading.current_thread().name))
        return super().summary(id)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    "Serve `app` with uvicorn on a loopback port, in a thread of this process."
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, name="uvicorn")
    th.start()
    try:
        wait_until(lambda: server.started, what="uvicorn started")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)


def test_the_route_reads_a_summary_in_a_thread_without_the_result(db: str):
    # Given a succeeded job whose stored result is 20 MB
    app, rt = fast_app(secret_key="t")
    store = RecordingStore(db)
    tasks = Tasks(app, store=store, workers=0, access=ANYONE)

    @tasks.task
    def big() -> None: ...

    @rt("/ping")
    async def ping() -> str: return "pong"

    job = big.defer()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE fh_jobs SET state='succeeded', finished_at=1, result=? WHERE id=?",
                  ['"' + "x" * 20_000_000 + '"', job.id])
    c.close()
    with serve(app) as url, httpx.Client(base_url=url) as cli:
        store.reads.clear()
        r = cli.get(f"/_tasks/jobs/{job.id}/status")
        # Then the fragment was built from a summary read, off the event loop, that left the result out
        assert r.status_code == 200 and 'data-state="succeeded"' in r.text and len(r.content) < 1000
        assert store.reads == [("summary", store.reads[0][1])] and store.reads[0][1] != "uvicorn"
        assert store.summary(job.id).result is None and store.get(job.id).result == "x" * 20_000_000
        # And while a long commit holds the store, a plain route still answers and the status waits for the store
        got: dict[str, float] = {}

        def status() -> None:
            with httpx.Client(base_url=url) as other:
                got["asked"] = time.perf_counter()
                assert other.get(f"/_tasks/jobs/{job.id}/status").status_code == 200
                got["answered"] = time.perf_counter()

        with store._lock:
            th = threading.Thread(target=status)
            th.start()
            time.sleep(0.2)
            t = time.perf_counter()
            assert cli.get("/ping").text == "pong"
            got["ping"] = time.perf_counter() - t
            time.sleep(0.3)
            got["released"] = time.perf_counter()
        th.join(10)
    store.close()
    # (asked while the store was held, the status answered only once it was free, however long its thread took to start)
    assert got["ping"] < 0.2 and got["asked"] < got["released"] <= got["answered"], got
