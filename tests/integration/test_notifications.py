"""Notifications when a job ends (opt-in per task): a FastHTML toast for the deferring session, an event on its
live stream, and a signed webhook delivered as a job with retries, against a real receiver on loopback."""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from integration_support import wait_until
from support import uvicorn_server
from test_live_status import sse_events

from fh_tasks.ui.notify import sign, verify_signature

pytestmark = pytest.mark.timeout(90)
SECRET = "s3cret-for-tests"

NOTIFY_APP = '''
import os, time
from fasthtml.common import P, fast_app
from fh_tasks import Tasks

app, rt = fast_app(secret_key="fh-tasks-tests")
tasks = Tasks(app, db=os.environ["JOBS_DB"])
tasks.notify(toast=True, sse=True, webhook=os.environ.get("HOOK_URL"), secret="SECRET", retries=3, retry_delay=0.2,
             timeout=5)

@tasks.task(notify=True)
def noted(fail: bool = False, pause: float = 0.0) -> str:
    time.sleep(pause)
    if fail: raise ValueError("no <b>luck</b>")
    return "done"

@tasks.task
def quiet() -> None: ...

@rt
def go(fail: bool = False, pause: float = 0.0): return noted.defer(fail, pause).id

@rt
def hush(): return quiet.defer().id

@rt
def page(): return P("a page")
'''.replace("SECRET", SECRET)

RECEIVER = '''
import json, os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

LOG = os.environ["HOOK_LOG"]

async def hook(req):
    body = await req.body()
    with open(LOG, "a") as f: f.write(json.dumps({"headers": dict(req.headers), "body": body.decode()}) + "\\n")
    n = sum(1 for _ in open(LOG))
    return PlainTextResponse("not yet", 500) if n <= int(os.environ.get("FAIL_FIRST", "0")) else PlainTextResponse("ok")

app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
'''


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "notifyapp.py").write_text(NOTIFY_APP)
    (tmp_path / "receiver.py").write_text(RECEIVER)
    log = tmp_path / "hooks.jsonl"

    def start(fail_first: int = 0) -> Any:
        from contextlib import ExitStack
        stack = ExitStack()
        hook_url, _ = stack.enter_context(uvicorn_server("receiver:app", cwd=tmp_path,
                                                         env={"HOOK_LOG": str(log), "FAIL_FIRST": str(fail_first)}))
        url, _ = stack.enter_context(uvicorn_server("notifyapp:app", cwd=tmp_path, env={
            "JOBS_DB": str(tmp_path / "jobs.db"), "HOOK_URL": f"{hook_url}/hook"}))
        return stack, url, log
    yield start


def hooks_of(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_the_webhook_is_signed_retried_and_replay_safe(servers: Any):
    # Given a receiver that fails its first two requests
    stack, url, log = servers(fail_first=2)
    with stack, httpx.Client(base_url=url, timeout=30) as ada:
        # When a job of a task that opted in fails, and a job of a task that did not succeeds
        jid = ada.get("/go", params={"fail": "true"}).text
        ada.get("/hush")
        # Then the receiver gets the POST three times (two failures retried), for that job only
        got = wait_until(lambda: h if len(h := hooks_of(log)) >= 3 else None, timeout=20, what="3 deliveries")
        time.sleep(1.0)
        assert len(hooks_of(log)) == 3
    bodies = [json.loads(h["body"]) for h in got]
    assert {b["id"] for b in bodies} == {jid} and bodies[-1]["state"] == "failed"
    assert bodies[-1]["error"]["type"] == "ValueError" and bodies[-1]["error"]["message"] == "no <b>luck</b>"
    # And each attempt carries the same delivery id, a fresh timestamp, and a valid HMAC-SHA256 signature
    assert len({h["headers"]["x-fhtasks-delivery"] for h in got}) == 1
    for h in got:
        hd, body = h["headers"], h["body"].encode()
        ts = int(hd["x-fhtasks-timestamp"])
        assert abs(time.time() - ts) < 60
        mac = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        assert hd["x-fhtasks-signature"] == f"sha256={mac}" and hd["content-type"] == "application/json"
        assert verify_signature(SECRET, body, hd)
        # And a tampered body, a wrong secret, or a replay after the tolerance is refused
        assert not verify_signature(SECRET, body + b" ", hd)
        assert not verify_signature("other", body, hd)
        assert not verify_signature(SECRET, body, hd, now=ts + 301)
        assert not verify_signature(SECRET, body, {**hd, "x-fhtasks-timestamp": str(ts + 1)})
    assert sign(SECRET, 1, b"x") == "sha256=" + hmac.new(SECRET.encode(), b"1.x", hashlib.sha256).hexdigest()


def test_the_deferring_session_gets_a_toast_and_another_does_not(servers: Any):
    stack, url, _ = servers()
    with stack, httpx.Client(base_url=url, timeout=30) as ada, httpx.Client(base_url=url) as eve:
        eve.get("/page")
        jid = ada.get("/go").text
        wait_until(lambda: 'data-state="succeeded"' in ada.get(f"/_tasks/jobs/{jid}/status").text, what="done")
        # When each opens a page, Then the deferring session sees the toast, once
        page = ada.get("/page").text
        assert 'class="fh-toast fh-toast-success"' in page and "noted: succeeded" in page
        assert "noted: succeeded" not in ada.get("/page").text
        assert "noted" not in eve.get("/page").text
        # And a failure is an error toast, its text escaped
        ada.get("/go", params={"fail": "true"})
        page = wait_until(lambda: t if 'fh-toast fh-toast-error"' in (t := ada.get("/page").text) else None,
                          what="error toast")
        assert "no &lt;b&gt;luck&lt;/b&gt;" in page and "<b>luck" not in page


def test_the_session_stream_carries_the_notification_event(servers: Any):
    stack, url, _ = servers()
    with stack, httpx.Client(base_url=url, timeout=30) as ada:
        ada.get("/page")
        with ada.stream("GET", "/_tasks/events") as r:
            jid = ada.get("/go", params={"pause": 0.3}).text
            events: list[tuple[str, str]] = []
            for ev, data in sse_events(r):
                events.append((ev, data))
                if ev == "fh-tasks-notify": break
    kinds = [e for e, _ in events]
    assert f"fh-job-{jid}" in kinds and kinds[-1] == "fh-tasks-notify"
    note = events[-1][1]
    assert f'data-job="{jid}"' in note and "noted: succeeded" in note and "fh-tasks-note-success" in note
