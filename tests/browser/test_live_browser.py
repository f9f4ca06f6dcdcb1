"""examples/progress.py in headless Chromium, with no CDN reachable (our scripts are served by the app): start a job and
watch queued -> running -> succeeded and the bar advance without a reload, over SSE and over a websocket; cancel a
running job from the page. Screenshots go to docs/ (the README shows one)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import ROOT, free_port, uvicorn_server

if TYPE_CHECKING:
    from playwright.sync_api import Page

EXAMPLES = ROOT / "examples"
pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

# Records every state and bar value the job's element shows, from the DOM, as htmx swaps it.
WATCH = """() => {
  window.__seen = []; window.__loaded = true;
  const note = () => {
    const el = document.querySelector('#jobs .fh-job');
    if (!el) return;
    const bar = el.querySelector('progress');
    const v = bar && bar.hasAttribute('value') ? Number(bar.getAttribute('value')) : null;
    const last = window.__seen[window.__seen.length - 1];
    if (!last || last[0] !== el.dataset.state || last[1] !== v) window.__seen.push([el.dataset.state, v]);
  };
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true});
}"""


@contextmanager
def progress_app(tmp_path: Path, port: int | None = None, **env: str) -> Iterator[str]:
    env = {"FH_TASKS_DB": str(tmp_path / "jobs.db"), **env}
    with uvicorn_server("progress:app", cwd=tmp_path, env=env, port=port,
                        extra=["--app-dir", str(EXAMPLES)]) as (url, _):
        yield url


def failed_requests(page: Page, url: str) -> list[str]:
    "Requests to the app (loopback) that failed: every script and style of ours must load."
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url) if r.url.startswith(url) else None)
    return failed


def send_and_see_the_bar_move(page: Page, url: str, running: float, moving: float) -> Any:
    """On the progress page at `url`: press "Send 40 emails", see the job running (within `running` ms) and its bar
    move past 30 % while under 90 % (within `moving` ms), the page never reloaded. Returns the job's locator."""
    from playwright.sync_api import expect
    page.goto(url)
    expect(page.get_by_role("heading", name="Send 40 emails")).to_be_visible()
    page.evaluate(WATCH)
    page.get_by_role("button", name="Send 40 emails").click()
    job = page.locator("#jobs .fh-job")
    expect(job).to_have_attribute("data-state", "running", timeout=running)
    page.wait_for_function("() => { const b = document.querySelector('#jobs progress[value]');"
                           " return b && Number(b.value) > 0.3 && Number(b.value) < 0.9; }", timeout=moving)
    return job


@pytest.mark.parametrize("live", ["sse", "ws"])
def test_a_job_goes_queued_running_succeeded_and_the_bar_advances_without_a_reload(page: Page, tmp_path: Path,
                                                                                   shots: Path, live: str) -> None:
    from playwright.sync_api import expect

    # Given the progress example sending 40 emails, 0.08 s each
    with progress_app(tmp_path, EMAILS="40", EMAIL_DELAY="0.08") as url:
        failed = failed_requests(page, url)
        # When the button is pressed, Then the bar moves while it runs (pushed: nothing polls), and a screenshot
        # shows it mid-way
        job = send_and_see_the_bar_move(page, f"{url}/?live={live}", running=10_000, moving=10_000)
        expect(job.locator(".fh-job-times")).to_contain_text("left")
        expect(job.locator(".fh-job-cancel")).to_be_visible()
        page.screenshot(path=str(shots / f"live-status-{live}.png"))
        # And it ends succeeded, with its result, and the page's notification
        expect(job).to_have_attribute("data-state", "succeeded", timeout=20_000)
        expect(job.locator(".fh-job-result")).to_have_text('{"sent": 40}')
        expect(page.locator("#fh-tasks-notifications .fh-tasks-note")).to_contain_text("send_emails: succeeded")
        seen: list[list[Any]] = page.evaluate("window.__seen")
        loaded = page.evaluate("window.__loaded")
        assert "hx-get" not in (job.get_attribute("hx-get") or "") and job.get_attribute("hx-trigger") is None
    # And the states came in order, the bar only went forward through many values, and the page never reloaded
    states = [s for s, _ in seen]
    firsts = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
    assert firsts == ["queued", "running", "succeeded"], seen
    values = [v for s, v in seen if s == "running" and v is not None]
    assert values == sorted(values) and len(set(values)) >= 5, seen
    assert loaded is True and failed == []


def test_cancel_a_running_job_from_the_page(page: Page, tmp_path: Path, shots: Path) -> None:
    from playwright.sync_api import expect

    # Given a long send (2,000 emails) running on the page
    with progress_app(tmp_path, EMAILS="2000", EMAIL_DELAY="0.05") as url:
        page.goto(url)
        page.get_by_role("button", name="Send 2000 emails").click()
        job = page.locator("#jobs .fh-job")
        page.wait_for_function("() => { const b = document.querySelector('#jobs progress[value]');"
                               " return b && Number(b.value) > 0.005; }", timeout=15_000)
        # When its cancel button is pressed
        job.locator(".fh-job-cancel").click()
        # Then it shows cancelled, without the button, and it stays cancelled (the task stopped: no more progress)
        expect(job).to_have_attribute("data-state", "cancelled", timeout=5_000)
        expect(job.locator(".fh-job-cancel")).to_have_count(0)
        page.screenshot(path=str(shots / "live-status-cancelled.png"))
        page.wait_for_timeout(1_500)
        expect(job).to_have_attribute("data-state", "cancelled")
        status = page.request.get(f"{url}/_tasks/jobs/{job.get_attribute('id', timeout=1_000)[4:]}/status")  # type: ignore[index]
        assert status.status == 200 and 'data-state="cancelled"' in status.text()


POLL_APP = '''
import os, time
from fasthtml.common import Titled, fast_app
from fh_tasks import JobStatus, Tasks

app, rt = fast_app(secret_key="fh-tasks-tests")
tasks = Tasks(app, db=os.environ["FH_TASKS_DB"], workers=0)   # no worker: the job stays queued

@tasks.task
def idle() -> None: ...

@rt
def index():
    job = idle.defer()
    return Titled("Polling", JobStatus(job, every="300ms")), job
'''


def test_a_polled_status_the_server_no_longer_shows_stops_polling(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # Given a page polling a queued job's status every 300 ms
    (tmp_path / "pollapp.py").write_text(POLL_APP)
    with uvicorn_server("pollapp:app", cwd=tmp_path, env={"FH_TASKS_DB": str(tmp_path / "jobs.db")}) as (url, _):
        polls: list[int] = []
        page.on("response", lambda r: polls.append(r.status) if "/_tasks/jobs/" in r.url else None)
        page.goto(url)
        job = page.locator(".fh-job")
        expect(job).to_have_attribute("data-state", "queued")
        page.wait_for_timeout(1_000)
        assert polls and set(polls) == {200}, polls
        # When the session is lost (its cookie cleared), so the route answers 404
        page.context.clear_cookies()
        # Then the element shows the 404's final fragment and stops polling
        expect(job).to_have_attribute("data-state", "unknown", timeout=5_000)
        n = len(polls)
        page.wait_for_timeout(1_200)
    assert polls[-1] == 404 and len(polls) == n, polls


def test_after_a_server_restart_the_page_catches_up_without_a_reload(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # Given a running send (60 emails, 0.1 s each) on the page, over SSE
    port, env = free_port(), {"EMAILS": "60", "EMAIL_DELAY": "0.1"}
    with progress_app(tmp_path, port=port, **env) as url:
        page.goto(url)
        page.evaluate(WATCH)
        page.get_by_role("button", name="Send 60 emails").click()
        job = page.locator("#jobs .fh-job")
        page.wait_for_function("() => { const b = document.querySelector('#jobs progress[value]');"
                               " return b && Number(b.value) > 0; }", timeout=15_000)
    # When the server stops (its stream ends; the job finishes during the graceful shutdown, while no server
    # answers) and a new one starts on the same port and store
    assert job.get_attribute("data-state") == "running"
    with progress_app(tmp_path, port=port, **env):
        # Then the page reconnects by itself and shows the job succeeded, without a reload
        expect(job).to_have_attribute("data-state", "succeeded", timeout=20_000)
        assert page.evaluate("window.__loaded") is True


HOLD_APP = '''
import os, time
from fasthtml.common import *
from fh_tasks import JobStatus, Tasks
from fh_tasks.ui import JobEvents

# A page may let elements settle slowly (CSS transitions): htmx's default settle delay is 20 ms.
app, rt = fast_app(hdrs=[Meta(name="htmx-config", content='{"defaultSettleDelay": 400}')])
tasks = Tasks(app, db=os.environ["FH_TASKS_DB"])

@tasks.task
def hold(flag: str) -> str:
    while not os.path.exists(flag): time.sleep(0.01)
    return "released"

@rt
def send():
    job = hold.defer(os.environ["FLAG"])
    return JobStatus(job, live="sse"), job

@rt
def index():
    return Titled("Hold", Button("Start", hx_post=send.to(), hx_target="#jobs", hx_swap="afterbegin"),
                  JobEvents(Div(id="jobs"), hub=tasks))
'''


def test_two_changes_pushed_back_to_back_both_reach_the_page(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    from fh_tasks.store.sqlite import SQLiteStore

    # Given a job running on a page that follows it over SSE
    (tmp_path / "holdapp.py").write_text(HOLD_APP)
    db, flag = tmp_path / "jobs.db", tmp_path / "release"
    with uvicorn_server("holdapp:app", cwd=tmp_path, env={"FH_TASKS_DB": str(db), "FLAG": str(flag)}) as (url, _):
        page.goto(url)
        page.get_by_role("button", name="Start").click()
        job = page.locator("#jobs .fh-job")
        expect(job).to_have_attribute("data-state", "running", timeout=10_000)
        jid = (job.get_attribute("id") or "")[4:]
        # When changes are pushed while the element the previous one swapped in is still settling (the job's end
        # 0.1 s after a progress write), Then each reaches the page
        store = SQLiteStore(db)
        try:
            for progress in ("0.6", "0.7"):
                assert store.set_progress(jid, 1, progress)
                page.wait_for_function(f"() => document.querySelector('#jobs progress[value=\"{progress}000\"]')",
                                       timeout=5_000)
            time.sleep(0.1)
            assert store.cancel_running(jid)
        finally:
            store.close()
            flag.touch()
        # (the last one too: the job shows cancelled, not the progress before it)
        expect(job).to_have_attribute("data-state", "cancelled", timeout=5_000)
