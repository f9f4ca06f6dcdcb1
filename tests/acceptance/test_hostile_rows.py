"""Rows written straight into a real store with sqlite3, behind fh-tasks' back, next to good jobs: wrong types in
every column, NULLs, megabytes, 5,000 levels of nesting, unknown states and tasks, malformed error/result/progress.
A worker process keeps serving the good jobs and stays up; `jobs()`, `get()`, `counts()`, the status route and the
CLI (`ls`, `show`, `stats`) never raise or print a traceback."""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Any
from urllib.parse import quote

import pytest
from worker_support import cli, enqueue, env_for, make_db, rows, running, start_worker, stop, wait_for

from fh_tasks import Tasks
from fh_tasks.ui.status import JOB_ID

pytestmark = pytest.mark.timeout(180)

APP = '''
import os, sqlite3, threading
from fh_tasks import Tasks, current_job
from fh_tasks.store.sqlite import SQLiteStore

DB = os.environ["JOBS_DB"]
tasks = Tasks(store=SQLiteStore(DB), lease=2.0, grace=2)
_local = threading.local()


@tasks.task
def good(n: int) -> int:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = sqlite3.connect(DB, timeout=30, isolation_level=None)
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)",
              (n, current_job().id, current_job().attempt, os.getpid()))
    return n


@tasks.task(name="echo")
def echo(*args, **kwargs) -> int:
    return len(args) + len(kwargs)
'''

NOW = time.time()
MB = 1_000_000
DEEP_LIST = "[" * 5000 + "]" * 5000
DEEP_DICT = '{"a": ' * 5000 + "1" + "}" * 5000
#: id -> the columns that differ from an ordinary queued `echo` job.
HOSTILE: dict[str, dict[str, Any]] = {
    "attempts-text": {"attempts": "many"},
    "max-attempts-text": {"max_attempts": "lots"},
    "attempts-negative": {"attempts": -5, "max_attempts": -1},
    "attempts-huge": {"attempts": 2**63 - 1},
    "timeout-text": {"timeout": "soon"},
    "timeout-blob": {"timeout": b"\x00"},
    "run-at-text": {"run_at": "now"},
    "run-at-blob": {"run_at": b"\x01"},
    "created-at-text": {"created_at": "yesterday"},
    "args-blob": {"args": b"\x00\xff\xfe binary"},
    "args-int": {"args": 42},
    "args-real": {"args": 1.5},
    "args-huge": {"args": json.dumps({"args": ["x" * (5 * MB)]})},
    "args-deep-list": {"args": '{"args": [' + DEEP_LIST + "]}"},
    "args-deep-dict": {"args": '{"kwargs": {"a": ' + DEEP_DICT + "}}"},
    "args-not-json": {"args": "{nope"},
    "state-unknown": {"state": "zombie"},
    "state-blob": {"state": b"\x01"},
    "state-int": {"state": 7},
    "task-unknown": {"task": "nope:nope"},
    "task-blob": {"task": b"\x00task"},
    "queue-blob": {"queue": b"q"},
    "lost-text": {"lost": "maybe"},
    "excused-text": {"excused": "some"},
    "failed-error-malformed": {"state": "failed", "attempts": 1, "finished_at": NOW, "error": "{not json"},
    "failed-error-shape": {"state": "failed", "attempts": 1, "finished_at": NOW, "error": "[1, 2, 3]"},
    "failed-error-blob": {"state": "failed", "attempts": 1, "finished_at": NOW, "error": b"\xff\x00"},
    "failed-error-deep": {"state": "failed", "attempts": 1, "finished_at": NOW, "error": DEEP_DICT},
    "failed-error-huge": {"state": "failed", "attempts": 1, "finished_at": NOW, "error": json.dumps(
        {"type": "E" * 1000, "message": "m" * (3 * MB), "traceback": "t" * MB})},
    "failed-error-fields": {"state": "failed", "attempts": 1, "finished_at": NOW,
                            "error": json.dumps({"type": [1], "message": {"a": None}, "traceback": 5})},
    "succeeded-result-malformed": {"state": "succeeded", "attempts": 1, "finished_at": NOW, "result": "{bad"},
    "succeeded-result-deep": {"state": "succeeded", "attempts": 1, "finished_at": NOW, "result": DEEP_LIST},
    "succeeded-result-huge": {"state": "succeeded", "attempts": 1, "finished_at": NOW,
                              "result": json.dumps("r" * (3 * MB))},
    "succeeded-result-blob": {"state": "succeeded", "attempts": 1, "finished_at": NOW, "result": b"\x00"},
    "succeeded-times-wrong": {"state": "succeeded", "attempts": 1, "finished_at": "later", "started_at": b"\x02"},
    "succeeded-all-null": {"state": "succeeded", "attempts": 1},
    "running-no-lease": {"state": "running", "attempts": 1, "progress": "{{{"},
    "running-ghost": {"state": "running", "attempts": 1, "worker": "ghost:1:x", "lease_until": NOW + 3600,
                      "progress": DEEP_LIST},
    "running-progress-huge": {"state": "running", "attempts": 1, "worker": "ghost:1:x", "lease_until": NOW + 3600,
                              "progress": json.dumps({"done": "x" * MB, "total": None})},
    "running-progress-blob": {"state": "running", "attempts": 1, "worker": b"\x03", "lease_until": "never",
                              "progress": b"\x00\x01"},
    "waiting-orphan": {"state": "waiting", "parent": "no-such-parent"},
    "\x1b[31mred\x07": {},
    "a/b/../c": {},
    "<img src=x onerror=alert(1)>": {"state": "failed", "attempts": 1, "finished_at": NOW,
                                  "error": json.dumps({"type": "<b>", "message": "<script>alert(2)</script>"})},
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    "A store holding good jobs and every hostile row; the app module a worker serves."
    d = tmp_path_factory.mktemp("hostile")
    (d / "hostileapp.py").write_text(APP)
    db = make_db(d / "jobs.db")
    before = enqueue(db, "hostileapp:good", [((i,), {}) for i in range(10)])
    with sqlite3.connect(db) as c:
        for id, cols in HOSTILE.items():
            row = {"id": id, "task": "echo", "queue": "default", "args": '{"args": [1]}', "state": "queued",
                   "attempts": 0, "max_attempts": 1, "run_at": NOW, "created_at": NOW, **cols}
            sql = f"INSERT INTO fh_jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
            c.execute(sql, list(row.values()))
    after = enqueue(db, "hostileapp:good", [((i,), {}) for i in range(10, 20)])
    return {"dir": d, "db": db, "env": env_for(d, db), "good": before + after}


def test_a_worker_serves_the_good_jobs_beside_them_and_stays_up(site):
    # Given good jobs queued before and after the hostile rows
    db, d, env = site["db"], site["dir"], site["env"]
    log = d / "worker.log"
    # When a worker process serves the store, and more good jobs come while it runs
    with running(start_worker("hostileapp:tasks", d, env, log=log)) as w:
        more = enqueue(db, "hostileapp:good", [((i,), {}) for i in range(20, 30)])
        ids = site["good"] + more
        marks = ",".join("?" * len(ids))
        # Then every good job succeeds
        wait_for(lambda: rows(db, f"SELECT count(*) FROM fh_jobs WHERE state='succeeded' AND id IN ({marks})",
                              ids) == [(30,)], timeout=60, what="the good jobs succeeded")
        # And the worker is still up, and stops cleanly
        time.sleep(1.0)
        assert w.poll() is None, log.read_text()[-5000:]
        assert stop(w) == 0, log.read_text()[-5000:]
    assert rows(db, f"SELECT count(DISTINCT job) FROM witness WHERE job IN ({marks})", ids) == [(30,)]
    for r in rows(db, f"SELECT id, state, attempts, substr(error, 1, 100) FROM fh_jobs WHERE id NOT IN ({marks})", ids):
        print("hostile row after the worker:", r)
    # And no hostile row it took is left running (it either ran or failed with a stored error)
    left = {r[0] for r in rows(db, "SELECT id FROM fh_jobs WHERE state = 'running'")}
    assert left <= {"running-ghost", "running-progress-huge"}, left  # (their lease, held by nobody, runs for an hour)


def test_jobs_get_and_counts_never_raise(site):
    hub = Tasks(db=site["db"], workers=0, retention=None)
    try:
        listed = hub.jobs(limit=1000)
        assert {r.id for r in listed} >= set(HOSTILE) | set(site["good"])
        for id in HOSTILE: assert hub.get(id) is not None, id
        for state in ("queued", "running", "failed", "succeeded", "waiting"): hub.jobs(state=state, limit=1000)
        counts = hub.counts()
        assert sum(counts.values()) == len(listed)
    finally:
        hub.store.close()


def test_the_status_route_renders_every_row(site):
    from fasthtml.common import fast_app
    from starlette.testclient import TestClient
    app, _ = fast_app()
    # (every row is shown to everybody here: the default rule shows a job only to the session that deferred it)
    hub = Tasks(app, db=site["db"], workers=0, retention=None, access=lambda req, rec: True)
    try:
        with TestClient(app) as client:
            for id in HOSTILE:
                r = client.get(f"/_tasks/jobs/{quote(id, safe='')}/status")
                # (an id outside the shape of ids, [A-Za-z0-9_.-]{1,128}, is answered as unknown: a clean 404 fragment
                # that does not echo it)
                shaped = JOB_ID.fullmatch(id) is not None
                assert r.status_code == (200 if shaped else 404), (id, r.status_code, r.text[:500])
                assert shaped or id not in r.text, id
                assert not any(not c.isprintable() and c not in "\n\t" for c in r.text), (id, r.text[:500])
                assert "<script>" not in r.text and "<img" not in r.text, id
                assert len(r.text) < 100_000, (id, len(r.text))
    finally:
        hub.store.close()


@pytest.mark.parametrize("args", [["ls", "--limit", "1000"], ["ls", "--state", "failed", "--limit", "1000"],
                                  ["ls", "--state", "running"], ["stats"]])
def test_the_cli_lists_and_counts_without_a_traceback(site, args):
    out = cli(site["dir"], site["env"], *args, "--db", site["db"], timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout


def test_the_cli_shows_every_row_without_a_traceback(site, capsys, monkeypatch):
    # The console script once (a process of its own), then its entry point in this process for every other row:
    # the same code, without a Python start-up per row.
    from fh_tasks.cli import main
    first, *rest = HOSTILE
    out = cli(site["dir"], site["env"], "show", first, "--db", site["db"], timeout=60)
    bad: dict[str, str] = {}
    if out.returncode != 0 or "Traceback" in out.stderr + out.stdout or "\x1b" in out.stdout:
        bad[first] = f"exit {out.returncode}: {out.stderr[-400:]}"
    monkeypatch.chdir(site["dir"])
    for id in rest:
        try: rc = main(["show", id, "--db", str(site["db"])])
        except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
        got = capsys.readouterr()
        if rc != 0 or "Traceback" in got.err + got.out or "\x1b" in got.out:
            bad[id] = f"exit {rc}: {got.err[-400:]}"
    assert bad == {}
