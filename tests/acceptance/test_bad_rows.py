"""An `fh-tasks worker` process meets rows it cannot run, written behind the store's back next to good jobs: each
bad row fails alone with a clear error, the good jobs of the same batch run once, and the process stays up."""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from worker_support import enqueue, env_for, make_db, rows, running, start_worker, stop, wait_for, write_modules

pytestmark = pytest.mark.timeout(90)

#: Rows a worker cannot run, and the error each must fail with.
BAD: dict[str, tuple[dict[str, Any], str, str]] = {
    "timeout": ({"timeout": "abc"}, "BadRow", "column timeout is 'abc' (text)"),
    "max_attempts": ({"max_attempts": "x"}, "BadRow", "column max_attempts is 'x' (text)"),
    "attempts": ({"attempts": 1.5}, "BadRow", "column attempts is 1.5 (a real)"),
    "created_at": ({"created_at": "abc"}, "BadRow", "column created_at is 'abc' (text)"),
    "args_blob": ({"args": b'{"args": [1]}'}, "DecodeError", "(a blob), not JSON text"),
    "args_deep": ({"args": '{"args": [' + "[" * 5000 + "]" * 5000 + "]}"}, "DecodeError", "nested too deeply"),
    "args_int": ({"args": 12}, "DecodeError", "arguments are not a JSON object"),
    "not_utf8": ({"args": "SET LATER"}, "BadRow", "column args holds text that is not valid UTF-8"),
}


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_modules(tmp_path)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return make_db(tmp_path / "jobs.db")


def put_row(db: str, id: str, cols: dict[str, Any]) -> None:
    "Insert a job row of `jobsapp:record` with plain sqlite3, due before the good jobs (so claimed in their batch)."
    now = time.time() - 1
    row = {"id": id, "task": "jobsapp:record", "queue": "default", "args": '{"args": [1000]}', "state": "queued",
           "max_attempts": 1, "run_at": now, "created_at": now, **cols}
    with closing(sqlite3.connect(db)) as c, c:
        c.execute(f"INSERT INTO fh_jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        if cols.get("args") == "SET LATER":
            c.execute("UPDATE fh_jobs SET args = CAST(X'7B2261726773223A205BFF5D7D' AS TEXT) WHERE id = ?", (id,))


def states_of(db: str, ids: list[str]) -> dict[str, str]:
    marks = ",".join("?" * len(ids))
    return {str(i): str(s) for i, s in rows(db, f"SELECT id, state FROM fh_jobs WHERE id IN ({marks})", ids)}


def test_worker_process_stays_up_and_runs_the_good_jobs_beside_bad_rows(app_dir, db, tmp_path):
    # Given good jobs (which create the store), and rows with wrongly typed columns next to them
    good = enqueue(db, "jobsapp:record", [((i,), {}) for i in range(6)])
    bad = {name: f"bad-{name}-{uuid.uuid4().hex[:8]}" for name in BAD}
    for name, (cols, _, _) in BAD.items(): put_row(db, bad[name], cols)
    # When a standalone worker (not in burst mode) claims them, all in one batch
    w = start_worker("jobsapp:tasks", app_dir, env_for(app_dir, db), "--concurrency", "32", log=tmp_path / "w.log")
    with running(w):
        wanted = {**{i: "succeeded" for i in good}, **{i: "failed" for i in bad.values()}}
        wait_for(lambda: states_of(db, list(wanted)) == wanted, timeout=30, what="every job final")
        # Then the process is still up, and serves the next job
        assert w.poll() is None, (tmp_path / "w.log").read_text()
        more = enqueue(db, "jobsapp:record", [((99,), {})])
        wait_for(lambda: states_of(db, more) == {more[0]: "succeeded"}, what="the next job")
        assert w.poll() is None
        assert stop(w) == 0
    # And each bad row failed with its clear error, after one attempt
    with closing(sqlite3.connect(db)) as c:
        c.text_factory = lambda b: b.decode("utf-8", "replace")
        stored = {i: json.loads(e) for i, e in c.execute("SELECT id, error FROM fh_jobs WHERE state = 'failed'")}
    assert set(stored) == set(bad.values())
    for name, (_, type_, detail) in BAD.items():
        err = stored[bad[name]]
        assert err["type"] == type_ and detail in err["message"], (name, err)
    # And each good job ran exactly once; no bad row ran
    assert sorted(n for (n,) in rows(db, "SELECT n FROM witness")) == [*range(6), 99]
    # And every failure is in the worker's log, with the job's id
    log = (tmp_path / "w.log").read_text()
    assert all(i in log for i in bad.values()), log
