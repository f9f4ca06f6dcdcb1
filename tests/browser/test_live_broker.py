"""Live status on a broker engine, in headless Chromium: the progress example's page on the Celery engine (Redis broker
and status store, a namespace of the test's own), its job run by a real Celery worker process (`fh-tasks worker`).
The page shows queued -> running -> succeeded and the bar advances without a reload, pushed over SSE from the status
store's events stream; then the jobs dashboard, on the same engine, shows the job, its worker and the figures."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from browser.test_live_browser import failed_requests, send_and_see_the_bar_move
from support import ROOT, uvicorn_server

from fh_tasks.engine import EngineSettings

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

APP = '''
import os, time
from fasthtml.common import *
from fh_tasks import JobStatus, Tasks, current_job
from fh_tasks.engine import EngineSettings
from fh_tasks.engines.celery import CeleryEngine
from fh_tasks.ui import JobEvents, Notifications

app, rt = fast_app(secret_key="fh-tasks-tests")
url = os.environ["FH_TEST_REDIS"]
engine = CeleryEngine(EngineSettings(broker=url, status=url, db="outbox.db", workers=0),
                      namespace=os.environ["FH_TEST_NS"])
tasks = Tasks(app, engine=engine, workers=0)
tasks.notify(sse=True)
tasks.dashboard("/tasks", local_only=True)
EMAILS, DELAY = 40, 0.08

@tasks.task(notify=True)
def send_emails(n: int) -> dict:
    job = current_job()
    for i in range(n):
        time.sleep(DELAY)
        job.progress({"done": i + 1, "total": n, "message": f"{i + 1} of {n} sent"})
    return {"sent": n}

@rt
def send():
    job = send_emails.defer(EMAILS)
    return JobStatus(job, live="sse", cancel=True, result=True), job

@rt
def index():
    return Titled(f"Send {EMAILS} emails",
        P(Button(f"Send {EMAILS} emails", hx_post=send.to(), hx_target="#jobs", hx_swap="afterbegin")),
        JobEvents(Div(id="jobs"), Notifications(), hub=tasks, cancel=True, result=True))
'''


@pytest.fixture
def broker_app(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """The app's module in tmp_path, served by uvicorn, and a Celery worker process (prefork, 1 child) serving the same
    module from a directory of its own (its outbox file is its own). Yields (url, worker, worker log)."""
    (tmp_path / "broker_progress.py").write_text(APP)
    url = f"{redis_url.rsplit('/', 1)[0]}/14"
    ns = f"t{uuid.uuid4().hex[:12]}"
    env = {"FH_TEST_REDIS": url, "FH_TEST_NS": ns}
    wdir = tmp_path / "worker"
    wdir.mkdir()
    log = wdir / "worker.log"
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "fh_tasks", "worker", "broker_progress:tasks", "--concurrency", "1",
             "--log-level", "info"], cwd=wdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
                 "PYTHONUNBUFFERED": "1"})
    try:
        with uvicorn_server("broker_progress:app", cwd=tmp_path, env=env) as (base, _):
            yield base, worker, log
    finally:
        if worker.poll() is None:
            try: os.killpg(worker.pid, signal.SIGKILL)
            except ProcessLookupError: pass
        worker.wait(10)
        from fh_tasks.engines.celery import CeleryEngine
        e = CeleryEngine(EngineSettings(broker=url, status=url, db=str(tmp_path / "cleanup.db"), workers=0),
                         namespace=ns)
        e.status.clear()
        for k in e.status.redis.scan_iter(match=f"{ns}:*", count=1000): e.status.redis.unlink(k)
        e.close()


def test_a_job_on_celery_goes_queued_running_succeeded_and_the_bar_advances_over_sse(
        page: Page, broker_app: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    from playwright.sync_api import expect

    url, worker, log = broker_app
    failed = failed_requests(page, url)
    # When the button is pressed (the job goes through the outbox to Redis, and runs in the worker process), Then
    # the bar moves while it runs, pushed from the status store's events stream
    job = send_and_see_the_bar_move(page, url, running=20_000, moving=15_000)
    expect(job.locator(".fh-job-cancel")).to_be_visible()
    # And it ends succeeded, with its result and the page's notification
    expect(job).to_have_attribute("data-state", "succeeded", timeout=20_000)
    expect(job.locator(".fh-job-result")).to_have_text('{"sent": 40}')
    expect(page.locator("#fh-tasks-notifications .fh-tasks-note")).to_contain_text("send_emails: succeeded")
    seen: list[list[Any]] = page.evaluate("window.__seen")
    assert page.evaluate("window.__loaded") is True and failed == []
    states = [s for s, _ in seen]
    firsts = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
    assert firsts == ["queued", "running", "succeeded"], (seen, log.read_text()[-2000:])
    values = [v for s, v in seen if s == "running" and v is not None]
    assert values == sorted(values) and len(set(values)) >= 5, seen
    # And the dashboard, on the same engine, shows the job succeeded, the worker live and the run in the figures
    jid = (job.get_attribute("id") or "")[4:]
    page.goto(f"{url}/tasks")
    expect(page.locator("#fh-dash-throughput")).to_contain_text("1 succeeded, 0 failed attempts")
    expect(page.locator("#fh-dash-workers")).to_contain_text("live")
    expect(page.locator("#fh-dash-count-succeeded")).to_contain_text("1")
    page.goto(f"{url}/tasks/jobs?state=succeeded")
    expect(page.locator(f'a[href="/tasks/jobs/{jid}"]')).to_be_visible()
    assert "celery engine" in page.content() and worker.poll() is None
    page.goto("about:blank")  # the page's event streams end: the server stops at once
