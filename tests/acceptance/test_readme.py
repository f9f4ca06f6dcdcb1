"""The README's first example, pasted into a file, works under a real uvicorn."""
from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
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


def complete_programs() -> list[tuple[str, str]]:
    "Every python block of the README and the docs that is a whole FastHTML program (it makes an app and serves it)."
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            if "fast_app(" in block and re.search(r"^serve\(\)\s*$", block, re.M):
                found.append((f"{doc.relative_to(ROOT)}#{i + 1}", block))
    return found


def test_the_readme_and_the_docs_have_complete_programs() -> None:
    names = [name for name, _ in complete_programs()]
    assert "README.md#1" in names and "docs/index.md#1" in names


@pytest.mark.parametrize("name,program", complete_programs(), ids=[n for n, _ in complete_programs()])
def test_every_complete_program_in_the_docs_runs_and_its_jobs_succeed(name: str, program: str, tmp_path: Path) -> None:
    # Given the program saved as app.py, When its home page is requested from a real server
    (tmp_path / "app.py").write_text(program)
    with uvicorn_server("app:app", cwd=tmp_path) as (url, _):
        r = httpx.get(url + "/")
        assert r.status_code == 200, r.text
        # Then every job it stored (in any store file it made) runs to success
        deadline = time.monotonic() + 15
        while True:
            states = [s for db in tmp_path.glob("*.db") for (s,) in _states(db)]
            if states and all(s == "succeeded" for s in states): break
            assert time.monotonic() < deadline, f"{name}: jobs {states}"
            time.sleep(0.05)


def _states(db: Path) -> list[tuple[str]]:
    with sqlite3.connect(db) as c:
        try: return c.execute("SELECT state FROM fh_jobs").fetchall()
        except sqlite3.OperationalError: return []  # not a job store (the program's own data)
