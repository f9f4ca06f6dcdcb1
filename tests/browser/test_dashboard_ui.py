"""The jobs dashboard in Chromium: open the overview, follow a failed job, press Retry, see it succeed live; light and
dark, phone width. With UPDATE_SCREENSHOTS=1 the screenshots are written to docs/ (the README shows them)."""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from support import ROOT, uvicorn_server

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

# Pico CSS 2.1.1 (MIT), the stylesheet FastHTML's default `hdrs` load from a CDN the tests cannot reach (the copy
# `make demo` serves).
PICO = ROOT / "examples" / "vendor" / "pico-2.1.1.min.css"
PNG = b"\x89PNG\r\n\x1a\n"
DOCS = ROOT / "docs"

APP = '''
import os, time
from pathlib import Path
from fasthtml.common import fast_app, P
from fh_tasks import Tasks

app, rt = fast_app(secret_key="fh-tasks-tests")
tasks = Tasks(app, db=os.environ["JOBS_DB"])
FLAG = Path(os.environ["FAIL_FLAG"])

@tasks.task(queue="payments")
def charge(order: int, card_token: str) -> dict:
    if FLAG.exists(): raise RuntimeError(f"card declined for order {order} (gateway said <b>no</b>)")
    time.sleep(1.5)  # slow enough to be seen running
    return {"order": order, "charged": True}

@tasks.task(queue="mail")
def send_email(to: str) -> None: time.sleep(0.01)

@tasks.task(retries=1, retry_delay=0.01)
def resize(path: str) -> None: raise OSError(f"cannot read {path}")

tasks.dashboard("/tasks", local_only=True, stream_seconds=3)

@rt
def make(): return charge.defer(42, card_token="tok_live_secret").id

@rt
def fill():
    for i in range(24): send_email.defer(f"user{i}@example.com")
    resize.defer("/uploads/cat.png")
    return "ok"
'''


@contextmanager
def app(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "dashapp.py").write_text(APP)
    env = {"JOBS_DB": str(tmp_path / "jobs.db"), "FAIL_FLAG": str(tmp_path / "fail")}
    with uvicorn_server("dashapp:app", cwd=tmp_path, env=env) as (url, _):
        yield url


def _pico(route: Route) -> None:
    route.fulfill(path=PICO, content_type="text/css")


def shoot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1": shutil.copy(path, DOCS / f"{name}.png")


@pytest.mark.browser
def test_follow_a_failed_job_retry_it_and_see_it_succeed_live(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.route(re.compile(r"/pico(\.min)?\.css$"), _pico)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "/tasks/" in m.text else None)
    (tmp_path / "fail").write_text("1")
    with app(tmp_path) as url, httpx.Client(base_url=url) as http:
        # Given jobs of several tasks, and a payment whose gateway fails
        assert http.get("/fill").text == "ok"
        jid = http.get("/make").text
        for _ in range(200):
            if 'data-state="failed"' in http.get(f"/tasks/jobs/{jid}").text: break
            page.wait_for_timeout(50)
        # When the overview is opened
        page.goto(f"{url}/tasks")
        expect(page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()
        expect(page.locator("#fh-dash-count-failed strong")).to_have_text(re.compile(r"[1-9]"))
        expect(page.locator("[data-fh-dash]")).to_have_attribute("data-live-mode", "events", timeout=5_000)
        expect(page.locator("#fh-dash-count-succeeded strong")).to_have_text("24", timeout=10_000)
        shoot(page, tmp_path, "dashboard-overview-light")
        page.emulate_media(color_scheme="dark")
        shoot(page, tmp_path, "dashboard-overview-dark")
        page.emulate_media(color_scheme="light")
        # And the failed jobs are followed, then the payment
        page.locator("#fh-dash-count-failed").click()
        expect(page).to_have_url(re.compile(r"/tasks/jobs\?state=failed$"))
        page.locator(f'a[href="/tasks/jobs/{jid}"]').click()
        expect(page.locator("#fh-dash-job")).to_have_attribute("data-state", "failed")
        # Then its arguments are shown with the secret redacted, and its error escaped
        expect(page.locator(".fh-dash-args")).to_contain_text('"card_token": "[redacted]"')
        expect(page.locator("#fh-dash-last-error")).to_contain_text("gateway said <b>no</b>")
        shoot(page, tmp_path, "dashboard-job-light")
        page.emulate_media(color_scheme="dark")
        shoot(page, tmp_path, "dashboard-job-dark")
        page.emulate_media(color_scheme="light")
        # When the gateway is back and Retry is pressed
        (tmp_path / "fail").unlink()
        page.get_by_role("button", name="Retry").click()
        # Then the page says so, shows the job waiting or running, and then succeeded without a reload
        expect(page.locator(".fh-dash-notice")).to_have_text("The job was queued again.")
        expect(page.locator("#fh-dash-job")).to_have_attribute("data-state", re.compile("queued|running"))
        expect(page.locator("#fh-dash-job")).to_have_attribute("data-state", "succeeded", timeout=10_000)
        expect(page.locator("#fh-dash-job")).to_contain_text("succeeded")
        # And at phone width nothing spills sideways
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(f"{url}/tasks")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        shoot(page, tmp_path, "dashboard-overview-phone")
    assert not errors, errors
