"""The README's first example, pasted into a file, works under a real uvicorn."""
from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import httpx
from support import ROOT, uvicorn_server


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    return blocks[0]


def test_readme_example_runs_a_durable_job(tmp_path: Path) -> None:
    # Given the README example saved as app.py (serve() does nothing when imported by uvicorn)
    (tmp_path / "app.py").write_text(readme_example())
    # When its page is requested from a real server
    with uvicorn_server("app:app", cwd=tmp_path) as (url, _):
        r = httpx.get(url + "/")
        assert r.status_code == 200 and "Signup successful!" in r.text
        # Then a job was stored in ./fh_tasks.db and runs to success
        deadline = time.monotonic() + 10
        state = None
        while time.monotonic() < deadline:
            with sqlite3.connect(tmp_path / "fh_tasks.db") as c:
                row = c.execute("SELECT state, task, args FROM fh_jobs").fetchone()
            state = row and row[0]
            if state == "succeeded": break
            time.sleep(0.05)
    assert state == "succeeded"
    assert row[1] == "app:send_welcome_email" and "ada@example.com" in row[2]
