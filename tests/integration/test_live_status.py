"""Live status over real uvicorn servers on loopback: the fragment, one SSE stream carrying many jobs (in order, ending
by itself once they are final, and at shutdown), the websocket, cancel, and the access rule (another session gets
404; the app's Beforeware runs first, websocket included)."""
from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from integration_support import wait_until
from support import uvicorn_server

pytestmark = pytest.mark.timeout(90)

LIVE_APP = '''
import os, time
from fasthtml.common import Beforeware, RedirectResponse, fast_app
from fh_tasks import JobStatus, Tasks, current_job

def login_required(req, sess):
    if os.environ.get("NEED_LOGIN") and not sess.get("user"): return RedirectResponse("/login", status_code=303)

app, rt = fast_app(secret_key="fh-tasks-tests", before=Beforeware(login_required, skip=[r"/login"]))
def admins_too(req, rec):
    "The app's access rule: an admin (a header, for the test) sees every job; others, their session's own."
    return req.headers.get("x-admin") == "yes" or tasks.owns(req, rec)

tasks = Tasks(app, db=os.environ["JOBS_DB"], workers=int(os.environ.get("WORKERS", "1")),
              access=admins_too if os.environ.get("ADMINS") else None)

@app.on_event("shutdown")
def note_shutdown():
    if os.environ.get("SHUTDOWN_FILE"): open(os.environ["SHUTDOWN_FILE"], "w").write("graceful")

@tasks.task
def steps(n: int, pause: float) -> int:
    for i in range(n):
        time.sleep(pause)
        current_job().progress({"done": i + 1, "total": n, "message": f"step <{i + 1}>"})
    return n

@tasks.task
def spin(kind: str) -> str:
    "Loops until cancelled (or 30 s): reports progress, or checks the flag."
    t0, i = time.time(), 0
    try:
        while time.time() - t0 < 30:
            i += 1
            time.sleep(0.01)
            if kind == "progress": current_job().progress({"done": i, "total": 10_000})
            elif current_job().cancelled: return "saw the flag"
        return "ran out"
    except BaseException as e:
        raise
    finally:
        open(os.environ["JOBS_DB"] + f".{kind}.out", "w").write(f"stopped after {time.time() - t0:.1f}s")

@tasks.task
async def aspin() -> None:
    import asyncio
    try: await asyncio.sleep(30)
    finally: open(os.environ["JOBS_DB"] + ".async.out", "w").write("stopped")

@rt
def spinning(kind: str): return (aspin.defer() if kind == "async" else spin.defer(kind)).id

@rt
def login(sess):
    sess["user"] = "ada"
    return "welcome"

@rt
def go(n: int = 3, pause: float = 0.2): return steps.defer(n, pause).id

@rt
def page(n: int = 3, pause: float = 0.2):
    job = steps.defer(n, pause)
    return JobStatus(job, cancel=True), job
'''


@pytest.fixture
def live_app(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "liveapp.py").write_text(LIVE_APP)

    def serve(**env: str) -> Any:
        return uvicorn_server("liveapp:app", cwd=tmp_path, env={"JOBS_DB": str(tmp_path / "jobs.db"), **env})
    yield serve


def sse_events(resp: httpx.Response) -> Iterator[tuple[str, str]]:
    "(event, data) pairs of an open SSE response, as they arrive."
    event, data = "message", []
    for line in resp.iter_lines():
        if line == "":
            if data or event != "message": yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"): event = line[6:].strip()
        elif line.startswith("data:"): data.append(line[5:].removeprefix(" "))


def state_of(html: str) -> str:
    m = re.search(r'data-state="([a-z]+)"', html)
    assert m, html
    return m.group(1)


def done_of(html: str) -> float:
    m = re.search(r'<progress value="([0-9.]+)"', html)
    return float(m.group(1)) if m else 0.0


def test_one_sse_stream_carries_many_jobs_in_order_and_ends_when_all_are_final(live_app: Any):
    # Given two jobs of one session, each reporting progress
    with live_app() as (url, _), httpx.Client(base_url=url, timeout=30) as ada:
        a, b = ada.get("/go", params={"n": 4, "pause": 0.25}).text, ada.get("/go", params={"n": 2, "pause": 0.3}).text
        seen: dict[str, list[tuple[str, float]]] = {a: [], b: []}
        order: list[str] = []
        t0 = time.monotonic()
        # When the page opens one stream for both
        with ada.stream("GET", "/_tasks/events", params=[("job", a), ("job", b)]) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-store"
            for event, data in sse_events(r):  # to the end of the stream
                order.append(event)
                if event == "fh-tasks-close": continue
                jid = event.removeprefix("fh-job-")
                assert jid in seen, event
                seen[jid].append((state_of(data), done_of(data)))
                assert "step <" not in data  # escaped
        # Then the stream ended by itself, with the close event last, once both jobs were final
        assert order[-1] == "fh-tasks-close" and order.count("fh-tasks-close") == 1 and time.monotonic() - t0 < 20
    rank = {"queued": 0, "running": 1, "succeeded": 2}
    for states in seen.values():
        # And each job's events came in order: never back to an earlier state, the bar never going back
        assert states[-1][0] == "succeeded", states
        assert [rank[s] for s, _ in states] == sorted(rank[s] for s, _ in states), states
        running = [d for s, d in states if s == "running"]
        assert running == sorted(running), states
    # And progress was pushed while the longer job ran (the bar advanced before it ended)
    assert any(0 < d < 1 for s, d in seen[a] if s == "running"), seen[a]


def test_a_session_stream_ends_at_shutdown_and_uvicorn_does_not_hang(live_app: Any, tmp_path: Path):
    # Given a page's open session stream (no job named: it waits for jobs to come)
    flag = tmp_path / "shutdown.txt"
    with live_app(SHUTDOWN_FILE=str(flag)) as (url, proc), httpx.Client(base_url=url, timeout=30) as ada:
        ada.get("/login")
        with ada.stream("GET", "/_tasks/events") as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("retry:")
            # When the server is asked to stop (one SIGTERM, a graceful shutdown)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # Then the stream ends, and the server exits on its own, quickly
            for _ in lines: pass
            proc.wait(15)
            took = time.monotonic() - t0
    # (uvicorn re-raises the signal it handled once it has shut down gracefully: the app's shutdown ran)
    assert proc.returncode in (0, -signal.SIGTERM) and took < 10 and flag.read_text() == "graceful", took


def test_the_stream_of_jobs_already_final_ends_at_once(live_app: Any):
    with live_app() as (url, _), httpx.Client(base_url=url, timeout=30) as ada:
        jid = ada.get("/go", params={"n": 1, "pause": 0}).text
        wait_until(lambda: 'data-state="succeeded"' in ada.get(f"/_tasks/jobs/{jid}/status").text, what="done")
        with ada.stream("GET", "/_tasks/events", params={"job": jid}) as r:
            events = [e for e, _ in sse_events(r)]
    assert events == [f"fh-job-{jid}", "fh-tasks-close"]


def test_another_session_gets_404_everywhere(live_app: Any):
    # Given a job deferred by one session, on a server with no worker (it stays queued)
    import websockets.sync.client as wsc
    from websockets.exceptions import InvalidStatus
    with live_app(WORKERS="0") as (url, _), httpx.Client(base_url=url) as ada, httpx.Client(base_url=url) as eve:
        jid = ada.get("/go").text
        eve.get("/login")  # a session of her own
        # Then its owner sees it, and another session gets the same 404 as for a job that does not exist
        assert ada.get(f"/_tasks/jobs/{jid}/status").status_code == 200
        for who, job in ((eve, jid), (ada, "0" * 32)):
            r = who.get(f"/_tasks/jobs/{job}/status")
            assert r.status_code == 404 and 'data-state="unknown"' in r.text and "steps" not in r.text
            assert who.post(f"/_tasks/jobs/{job}/cancel").status_code == 404
            assert who.get("/_tasks/events", params={"job": job}).status_code == 404
            cookie = "; ".join(f"{k}={v}" for k, v in who.cookies.items())
            with pytest.raises(InvalidStatus) as e:
                wsc.connect(f"{url.replace('http', 'ws')}/_tasks/ws?job={job}", additional_headers={"Cookie": cookie})
            assert e.value.response.status_code == 404
        # And no cookie at all: 404 too
        assert httpx.get(f"{url}/_tasks/jobs/{jid}/status").status_code == 404
        # And the job is still queued: eve's cancel did nothing; ada's cancels it
        assert 'data-state="queued"' in ada.get(f"/_tasks/jobs/{jid}/status").text
        r = ada.post(f"/_tasks/jobs/{jid}/cancel")
        assert r.status_code == 200 and 'data-state="cancelled"' in r.text and "<button" not in r.text


def test_the_apps_beforeware_runs_first_for_streams_and_the_socket(live_app: Any):
    import websockets.sync.client as wsc
    from websockets.exceptions import InvalidStatus
    with live_app(NEED_LOGIN="1") as (url, _), httpx.Client(base_url=url, timeout=30) as ada, \
            httpx.Client(base_url=url) as anon:
        ada.get("/login")
        jid = ada.get("/go", params={"n": 1, "pause": 0}).text
        for path in (f"/_tasks/jobs/{jid}/status", f"/_tasks/events?job={jid}", "/_tasks/static/htmx-ext-sse.js"):
            r = anon.get(path, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == "/login", path
        with pytest.raises(InvalidStatus) as e: wsc.connect(f"{url.replace('http', 'ws')}/_tasks/ws?job={jid}")
        assert e.value.response.status_code == 403
        assert ada.get("/_tasks/static/htmx-ext-sse.js").status_code == 200


def test_the_websocket_pushes_fragments_until_the_jobs_are_final(live_app: Any):
    import websockets.sync.client as wsc
    with live_app() as (url, _), httpx.Client(base_url=url, timeout=30) as ada:
        a, b = ada.get("/go", params={"n": 3, "pause": 0.2}).text, ada.get("/go", params={"n": 1, "pause": 0.1}).text
        cookie = "; ".join(f"{k}={v}" for k, v in ada.cookies.items())
        got: dict[str, list[str]] = {a: [], b: []}
        with wsc.connect(f"{url.replace('http', 'ws')}/_tasks/ws?job={a}&job={b}",
                         additional_headers={"Cookie": cookie}) as ws:
            for msg in ws:
                assert isinstance(msg, str)
                jid = re.search(r'id="job-([0-9a-f]+)"', msg).group(1)  # type: ignore[union-attr]
                got[jid].append(state_of(msg))
            assert ws.close_code == 1000
    assert got[a][-1] == "succeeded" and got[b][-1] == "succeeded" and "running" in got[a], got


def test_the_page_renders_a_polling_fragment_with_a_cancel_button_and_the_route_stops_at_final(live_app: Any):
    with live_app() as (url, _), httpx.Client(base_url=url, timeout=30) as ada:
        html = ada.get("/page", params={"n": 1, "pause": 0}).text
        jid = re.search(r'id="job-([0-9a-f]+)"', html).group(1)  # type: ignore[union-attr]
        assert f'hx-get="/_tasks/jobs/{jid}/status?o=c"' in html and "fh-job-cancel" in html
        assert '<script src="/_tasks/static/htmx-ext-sse.js">' in html and "unpkg" not in html
        r = wait_until(lambda: (x := ada.get(f"/_tasks/jobs/{jid}/status?o=c")).text.count("succeeded") and x,
                       what="succeeded")
        assert "hx-get" not in r.text and "fh-job-cancel" not in r.text and "took" in r.text


@pytest.mark.parametrize("kind", ["progress", "flag", "async"])
def test_cancel_stops_a_running_job(live_app: Any, tmp_path: Path, kind: str):
    # Given a running job: a sync loop reporting progress, a sync loop checking the flag, or an async task
    with live_app() as (url, _), httpx.Client(base_url=url, timeout=30) as ada:
        jid = ada.get("/spinning", params={"kind": kind}).text
        wait_until(lambda: 'data-state="running"' in ada.get(f"/_tasks/jobs/{jid}/status").text, what="running")
        # When its owner presses cancel
        r = ada.post(f"/_tasks/jobs/{jid}/cancel")
        # Then it is cancelled at once, and its code stops soon (it would run 30 s)
        assert r.status_code == 200 and 'data-state="cancelled"' in r.text
        out = tmp_path / f"jobs.db.{kind}.out"
        wait_until(out.exists, timeout=10, what="the task stopped")
        time.sleep(0.5)  # its late outcome is refused: the job stays cancelled
        assert 'data-state="cancelled"' in ada.get(f"/_tasks/jobs/{jid}/status").text


def test_the_app_can_replace_the_access_rule(live_app: Any):
    # Given an app whose rule lets admins see every job, and otherwise keeps the default
    with live_app(ADMINS="1", WORKERS="0") as (url, _), httpx.Client(base_url=url) as ada, \
            httpx.Client(base_url=url) as eve:
        jid = ada.get("/go").text
        path = f"/_tasks/jobs/{jid}/status"
        # Then the owner and an admin see it, and anyone else still gets 404
        assert ada.get(path).status_code == 200 and eve.get(path, headers={"x-admin": "yes"}).status_code == 200
        assert eve.get(path).status_code == 404 and eve.post(f"/_tasks/jobs/{jid}/cancel").status_code == 404
