"""The seed's dashboard in a real browser: press the button, see the submit answer, the job's live status (pushed over
SSE), the polled row in human times, and the toast when the job ends."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support import ROOT, uvicorn_server

if TYPE_CHECKING:
    from playwright.sync_api import Page

EXAMPLES = ROOT / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


@contextmanager
def dashboard(tmp_path: Path, **env: str) -> Iterator[str]:
    "examples/slow_api.py and examples/dashboard.py under uvicorn, files in tmp_path; yields the dashboard's URL."
    env = {"FH_TASKS_DB": str(tmp_path / "jobs.db"), "DASHBOARD_DB": str(tmp_path / "dash.db"), **env}
    app_dir = ["--app-dir", str(EXAMPLES)]
    with uvicorn_server("slow_api:app", cwd=tmp_path, env=env, extra=app_dir) as (slow, _), \
         uvicorn_server("dashboard:app", cwd=tmp_path, env={**env, "SLOW_API_URL": slow}, extra=app_dir) as (url, _):
        yield url


@pytest.mark.browser
def test_dashboard_button_shows_submit_then_polled_row(page: Page, tmp_path: Path, shots: Path) -> None:
    from playwright.sync_api import expect

    # Given the dashboard polling every 500 ms, and a slow service answering after 300 ms
    with dashboard(tmp_path, SLOW_API_DELAY="0.3", DASHBOARD_POLL="500ms") as url:
        page.goto(url)
        expect(page.get_by_role("heading", name="Background Task Dashboard")).to_be_visible()
        # When the button is pressed
        page.get_by_role("button", name="Press to call slow service").click()
        # Then the submit answer appears in #res, and the job's live status in the list of this browser's jobs
        expect(page.locator("#res")).to_contain_text("Request submitted at", timeout=5_000)
        status = page.locator("#jobs .fh-job")
        job_id = (status.get_attribute("id") or "").removeprefix("job-")
        assert len(job_id) == 32, job_id
        # And the status reaches succeeded with the answer, and the polled list shows the row the job stored
        expect(page.locator(f"#job-{job_id}")).to_have_attribute("data-state", "succeeded", timeout=15_000)
        expect(page.locator(f"#job-{job_id} .fh-job-result")).to_contain_text("response_time")
        expect(page.locator(f'li[data-job="{job_id}"]')).to_contain_text("Requested at", timeout=15_000)
        # And the next polled answer brings this browser's toast
        expect(page.locator(".fh-toast-success")).to_contain_text("task_submit: succeeded", timeout=15_000)
        shot = shots / "live-dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(PNG) and len(data) > 1_000


@pytest.mark.browser
def test_make_demo_works_on_a_machine_without_internet(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import Route, expect
    from support import demo

    # Given `make demo`'s script on free ports, and a browser that reaches nothing but this machine (no CDN)
    loopback = re.compile(r"^https?://127\.0\.0\.1:\d+/")
    asked: list[str] = []

    def offline(route: Route) -> None:
        asked.append(route.request.url)
        if loopback.match(route.request.url): route.continue_()
        else: route.abort()

    page.route("**/*", offline)  # registered last: it answers before the fixture's CDN stand-ins
    with demo(tmp_path, slow_delay="0.2") as (_, port, _):
        # When the page is opened and its button pressed
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_role("button", name="Press to call slow service").click()
        # Then htmx, served by the demo itself, posts it and keeps the job's status live until it succeeds
        expect(page.locator("#res")).to_contain_text("Request submitted at", timeout=5_000)
        job = page.locator("#jobs .fh-job").first
        expect(job).to_have_attribute("data-state", "succeeded", timeout=15_000)
        # And the page is styled by the demo's own Pico
        assert page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--pico-font-family')")
        assert any(u.endswith("/_demo/vendor/htmx") for u in asked)
        assert any(u.endswith("/_demo/vendor/pico") for u in asked)
        assert not [u for u in asked if "htmx.org@" in u or "/pico@" in u], asked
