"""Rows that another version of fh-tasks (or a hand edit) left in the store, written here with plain sqlite3: every
reader shows them (`tasks.jobs()`, `get`, `counts`, `fh-tasks ls`, `JobStatus`, the status route) and none raises."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from typing import Any

import pytest
from fastcore.xml import to_xml
from starlette.testclient import TestClient
from support import ROOT

from fh_tasks import JobState, JobStatus

NOW = time.time()
#: id -> the columns that differ from a plain queued job; `X'..'` values are SQL blobs/bytes cast to text.
ROWS: dict[str, dict[str, Any]] = {
    "paused": {"state": "paused"},
    "hostile-state": {"state": "<script>alert(1)</script>"},
    "bad-error": {"state": "failed", "error": "{not json <b>"},
    "list-error": {"state": "failed", "error": '["a", 1]'},
    "odd-error": {"state": "failed", "error": '{"type": 5, "message": {"html": "<img src=x onerror=alert(1)>"}}'},
    "bad-numbers": {"state": "succeeded", "attempts": "many", "max_attempts": 2.5, "created_at": "yesterday",
                    "started_at": "soon", "finished_at": "later"},
    "bad-values": {"state": "running", "result": "not json <i>", "progress": '{"done": <u>', "args": "nope"},
    "bad-utf8": {"state": "succeeded", "task": b"\xffA", "result": b"\xff<s>", "progress": b"\xff<s>"},
    "blob-result": {"state": "succeeded", "result": b"\x00\x01", "error": b"\xfe"},
}


@pytest.fixture
def foreign(site) -> tuple[Any, Any]:
    "A hub on a store holding one row of each kind in ROWS (inserted with sqlite3, not through fh-tasks)."
    # Rows no session deferred: the app shows every job (`access=`), else the status route would answer 404
    app, _, tasks = site(workers=0, access=lambda req, rec: True)
    tasks.counts()  # creates the schema
    with sqlite3.connect(tasks.store.path) as c:
        for jid, cols in ROWS.items():
            row = {"id": jid, "task": "other:version", "queue": "default", "args": '{"kwargs":{}}', "state": "queued",
                   "run_at": NOW, "created_at": NOW, **cols}
            # bytes become text with those bytes (not valid UTF-8), as a C program writing TEXT might leave them
            vals = ", ".join(f"CAST(:{k} AS TEXT)" if isinstance(v, bytes) else f":{k}" for k, v in row.items())
            c.execute(f"INSERT INTO fh_jobs ({', '.join(row)}) VALUES ({vals})", row)
    c.close()
    return app, tasks


def test_every_reader_reads_every_row(foreign):
    app, tasks = foreign
    # When the jobs are listed, Then every row is there
    recs = {r.id: r for r in tasks.jobs()}
    assert set(recs) == set(ROWS)
    # And an unknown state reads as JobState.unknown, its text kept
    assert recs["paused"].state is JobState.unknown and recs["paused"].state_text == "paused"
    assert tasks.get("paused").raw == {"state": "paused"} and not tasks.get("paused").done
    assert {r.id for r in tasks.jobs(state="unknown")} == {"paused", "hostile-state"}
    assert tasks.counts() == {"unknown": 2, "failed": 3, "succeeded": 3, "running": 1}
    # And errors are dicts with a type and a message, whatever was stored
    assert recs["bad-error"].error == {"type": "Error", "message": "{not json <b>"}
    assert recs["list-error"].error == {"type": "Error", "message": "['a', 1]"}
    assert recs["odd-error"].error["message"] == "{'html': '<img src=x onerror=alert(1)>'}"
    # And numbers of the wrong type read as defaults, kept as stored in `raw`
    bad = recs["bad-numbers"]
    assert (bad.attempts, bad.max_attempts, bad.created_at, bad.started_at, bad.finished_at) == (0, 0, 0.0, None, None)
    assert bad.raw["attempts"] == "many" and bad.raw["created_at"] == "yesterday"
    # And values that are not JSON (or not UTF-8) are the stored text
    assert (recs["bad-values"].result, recs["bad-values"].progress, recs["bad-values"].args) == (
        "not json <i>", '{"done": <u>', ["nope"])
    assert recs["bad-utf8"].task == "\ufffdA" and recs["bad-utf8"].result == recs["bad-utf8"].progress == "\ufffd<s>"
    assert recs["blob-result"].result == b"\x00\x01".decode() and recs["blob-result"].error["message"] == "\ufffd"


def test_status_fragments_render_every_row_escaped(foreign):
    app, tasks = foreign
    with TestClient(app) as cli:
        for jid in ROWS:
            # When the status route is asked for each row, Then it answers a fragment for it, escaped
            r = cli.get(f"/_tasks/jobs/{jid}/status")
            assert r.status_code == 200 and f'id="job-{jid}"' in r.text, (jid, r.text)
            for html in (r.text, to_xml(JobStatus(jid, tasks)), to_xml(JobStatus(tasks.get(jid)))):
                assert not any(t in html for t in ("<script", "<img", "<b>", "<i>", "<u>", "<s>")), (jid, html)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in cli.get("/_tasks/jobs/hostile-state/status").text
        assert "Error: {not json &lt;b&gt;" in cli.get("/_tasks/jobs/bad-error/status").text


def test_the_cli_lists_every_row(foreign):
    _, tasks = foreign
    for args in (["ls"], ["ls", "--state", "unknown"], ["stats"], ["show", "paused"], ["show", "bad-numbers"]):
        out = subprocess.run([sys.executable, "-m", "fh_tasks", *args, "--db", tasks.store.path], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, (args, out.stderr)
        if args == ["ls"]: assert all(jid in out.stdout for jid in ROWS)
