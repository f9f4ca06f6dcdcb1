"""The seed's dashboard in a real browser: press the button, see the submit answer, then the polled row."""
from __future__ import annotations

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
def test_dashboard_button_shows_submit_then_polled_row(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # Given the dashboard polling every 500 ms, and a slow service answering after 300 ms
    with dashboard(tmp_path, SLOW_API_DELAY="0.3", DASHBOARD_POLL="500ms") as url:
        page.goto(url)
        expect(page.get_by_role("heading", name="Background Task Dashboard")).to_be_visible()
        # When the button is pressed
        page.get_by_role("button", name="Press to call slow service").click()
        # Then the submit answer appears in #res, with the job's live status
        expect(page.locator("#res")).to_contain_text("Request submitted at", timeout=5_000)
        status = page.locator("#res .fh-job")
        job_id = (status.get_attribute("id") or "").removeprefix("job-")
        assert len(job_id) == 32, job_id
        # And the polled list shows the row the job stored, and the status reaches succeeded
        expect(page.locator("li", has_text=job_id)).to_be_visible(timeout=15_000)
        expect(page.locator(f"#job-{job_id}")).to_have_attribute("data-state", "succeeded", timeout=15_000)
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(PNG) and len(data) > 1_000
