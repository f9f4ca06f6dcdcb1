"""The seed's examples (examples/*.py) on fh-tasks, driven over HTTP against real uvicorn servers on loopback."""
from __future__ import annotations

import re
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from support import ROOT, demo, uvicorn_server, wait_until

from fh_tasks.encoding import decode_args, decode_value

EXAMPLES = ROOT / "examples"
HX = {"HX-Request": "1"}
T = TypeVar("T")


def wait_for(probe: Callable[[], T], timeout: float = 15.0, what: str = "the condition") -> T:
    "`support.wait_until` with the examples' defaults (15 s, polled every 50 ms)."
    return wait_until(probe, timeout, what, interval=0.05)


def job_rows(db: Path) -> list[dict[str, Any]]:
    "Every job in the SQLite file, oldest first."
    if not db.exists(): return []
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM fh_jobs ORDER BY seq")]


def all_final(db: Path, n: int) -> list[dict[str, Any]]:
    "The jobs, once there are `n` and every one is final; else []."
    rows = job_rows(db)
    done = len(rows) == n and all(r["state"] in ("succeeded", "failed", "cancelled") for r in rows)
    return rows if done else []


@contextmanager
def example(name: str, tmp_path: Path, **env: str) -> Iterator[str]:
    "Serve examples/<name>.py under uvicorn with its job store in tmp_path; yields the base URL."
    env = {"FH_TASKS_DB": str(tmp_path / "jobs.db"), "PYTHONUNBUFFERED": "1", **env}
    with uvicorn_server(f"{name}:app", cwd=tmp_path, env=env, extra=["--app-dir", str(EXAMPLES)]) as (url, _):
        yield url


# -- counter.py ------------------------------------------------------------------------------------

def test_counter_job_counts_in_the_terminal_after_the_page(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Given the simple example on a real server
    with example("counter", tmp_path) as url:
        # When its page is visited
        r = httpx.get(url + "/")
        assert r.status_code == 200 and "Simple Background Task Example" in r.text
        # Then the page came before the counting: the job was stored with its argument and has not finished
        [job] = job_rows(tmp_path / "jobs.db")
        assert job["task"] == "counter:counter" and decode_args(job["args"]) == ([], {"loops": 5})
        assert job["state"] in ("queued", "running")
        # And it runs to the end (0+1+2+3+4 s of sleeps)
        [job] = wait_for(lambda: all_final(tmp_path / "jobs.db", 1), timeout=30, what="the counter job finishing")
    assert job["state"] == "succeeded" and job["attempts"] == 1
    # And it printed 0..4 to the server's terminal, in order
    printed = [line for line in capfd.readouterr().out.splitlines() if line.strip().isdigit()]
    assert printed == ["0", "1", "2", "3", "4"]


# -- slow_api.py + dashboard.py -------------------------------------------------------------------

@contextmanager
def dashboard(tmp_path: Path, delay: str = "1") -> Iterator[str]:
    with example("slow_api", tmp_path, SLOW_API_DELAY=delay) as slow_url, \
         example("dashboard", tmp_path, SLOW_API_URL=slow_url, DASHBOARD_DB=str(tmp_path / "dash.db")) as url:
        yield url


def submit(url: str, client: httpx.Client | None = None) -> tuple[int, str]:
    """Press the button (htmx POST /submit, in `client`'s session if given); returns the request time (the
    `data-request-time` beside the human time shown) and the job id."""
    r = (client.post if client is not None else httpx.post)(url + "/submit", headers=HX)
    assert r.status_code == 200, r.text
    shown = re.search(r'<p data-request-time="(\d+)">Request submitted at (\d\d:\d\d:\d\d)</p>', r.text)
    job = re.search(r'id="job-([0-9a-f]+)"', r.text)
    assert shown and job, r.text
    assert shown.group(2) == time.strftime("%H:%M:%S", time.localtime(int(shown.group(1))))
    return int(shown.group(1)), job.group(1)


def row_of(listing: str, job_id: str) -> tuple[int, int] | None:
    "The (request_time, response_time) of the job's row in the polled list (its data- attributes), if shown."
    li = re.search(rf'<li [^>]*data-job="{job_id}"[^>]*>([^<]*)</li>', listing)
    if li is None: return None
    req, resp = (int(re.search(rf'{k}="(\d+)"', li.group(0)).group(1))  # type: ignore[union-attr]
                 for k in ("data-request-time", "data-response-time"))
    assert f"Requested at {time.strftime('%H:%M:%S', time.localtime(req))}, answered at" in li.group(1), li.group(0)
    return req, resp


def test_dashboard_page_is_the_seeds(tmp_path: Path) -> None:
    # Given the dashboard with its slow service
    with dashboard(tmp_path) as url:
        # When the page is loaded
        r = httpx.get(url + "/")
    # Then it has the button posting to /submit, the result slot, and the list polled every 5 s
    assert r.status_code == 200
    assert "<title>Background Task Dashboard</title>" in r.text and "Press to call slow service" in r.text
    assert 'hx-post="/submit"' in r.text and 'hx-target="#res"' in r.text and 'id="res"' in r.text
    assert 'hx-get="/show_tstamps"' in r.text and 'hx-trigger="every 5s"' in r.text
    # And the live list of the browser's jobs, on one SSE stream, with the extension served by the app
    assert 'sse-connect="/_tasks/events?o=r"' in r.text and '<ul id="jobs"></ul>' in r.text
    assert '<script src="/_tasks/static/htmx-ext-sse.js"></script>' in r.text


def test_dashboard_submit_returns_before_the_slow_call_and_the_row_appears(tmp_path: Path) -> None:
    # Given the dashboard, with a slow service that takes 2 s to answer
    with dashboard(tmp_path, delay="2") as url, httpx.Client() as browser:
        # When the button is pressed
        request_time, job_id = submit(url, browser)
        # Then the answer came back while the job was still waiting for the slow service
        [job] = job_rows(tmp_path / "jobs.db")
        assert job["id"] == job_id and job["state"] in ("queued", "running")
        assert job_id not in httpx.get(url + "/show_tstamps", headers=HX).text
        # And the polled list shows the row the job stored from the slow service's answer
        row = wait_for(lambda: row_of(httpx.get(url + "/show_tstamps", headers=HX).text, job_id), what="the row")
        assert row[0] == request_time and row[1] >= request_time
        # And the job's live status fragment ends at succeeded, for the browser that submitted it only
        status = wait_for(lambda: (t := browser.get(f"{url}/_tasks/jobs/{job_id}/status", headers=HX).text)
                          .count('data-state="succeeded"') and t, what="succeeded")
        assert "hx-trigger" not in status and "calling the slow service" not in status
        assert httpx.get(f"{url}/_tasks/jobs/{job_id}/status", headers=HX).status_code == 404


def test_dashboard_two_quick_submits_get_two_rows(tmp_path: Path) -> None:
    # Given the dashboard with a fast slow service
    with dashboard(tmp_path, delay="0.05") as url:
        # When the button is pressed twice in a row (usually within the same second)
        first, second = submit(url), submit(url)
        # Then each press gets its own row: the rows are keyed by job, not by the second they were sent in
        wait_for(lambda: len(all_final(tmp_path / "jobs.db", 2)) == 2, what="both jobs finishing")
        listing = httpx.get(url + "/show_tstamps", headers=HX).text
    assert listing.count("<li ") == 2
    for request_time, job_id in (first, second):
        assert (r := row_of(listing, job_id)) is not None and r[0] == request_time


def test_dashboard_submit_shows_the_jobs_state_from_the_start(tmp_path: Path) -> None:
    # Given the dashboard
    with dashboard(tmp_path, delay="0.05") as url:
        # When the button is pressed
        r = httpx.post(url + "/submit", headers=HX)
    # Then the fragment adds the job, queued, to the live list, swapped by the page's SSE stream
    assert 'data-state="queued"' in r.text and 'hx-swap-oob="afterbegin:#jobs"' in r.text
    assert re.search(r'sse-swap="fh-job-[0-9a-f]{32}"', r.text) and "every" not in r.text


# -- signup.py ------------------------------------------------------------------------------------

def test_signup_runs_both_jobs_in_order(tmp_path: Path) -> None:
    # Given the signup example
    with example("signup", tmp_path) as url:
        # When someone signs up
        r = httpx.post(url + "/signup", data={"email": "ada@example.com", "username": "ada"})
        assert r.status_code == 200 and "Signup successful!" in r.text
        welcome, admin = wait_for(lambda: all_final(tmp_path / "jobs.db", 2), what="both jobs finishing")
    # Then the welcome email went first and the admin notification started only after it succeeded
    assert welcome["task"] == "signup:send_welcome_email" and admin["task"] == "signup:send_admin_notification"
    assert welcome["state"] == admin["state"] == "succeeded"
    assert admin["parent"] == welcome["id"] and admin["started_at"] >= welcome["finished_at"]
    assert decode_value(welcome["result"]) == "ada@example.com" and decode_value(admin["result"]) == "ada"


def test_signup_failing_welcome_email_cancels_the_notification(tmp_path: Path) -> None:
    # Given the signup example
    with example("signup", tmp_path) as url:
        # When the address is not an email address
        r = httpx.post(url + "/signup", data={"email": "not-an-address", "username": "bob"})
        assert r.status_code == 200
        welcome, admin = wait_for(lambda: all_final(tmp_path / "jobs.db", 2), what="both jobs finishing")
    # Then the welcome email failed with its error, and the notification after it never started
    error = decode_value(welcome["error"])
    assert welcome["state"] == "failed" and error["type"] == "ValueError" and "not an email address" in error["message"]
    assert admin["state"] == "cancelled" and admin["started_at"] is None and admin["attempts"] == 0


def test_signup_independent_jobs_do_not_stop_each_other(tmp_path: Path) -> None:
    # Given the signup example's second route, which returns two separate jobs
    with example("signup", tmp_path) as url:
        # When the welcome email cannot be sent
        r = httpx.post(url + "/signup_independent", data={"email": "not-an-address", "username": "cy"})
        assert r.status_code == 200 and "Signup successful!" in r.text
        welcome, admin = wait_for(lambda: all_final(tmp_path / "jobs.db", 2), what="both jobs finishing")
    # Then its failure does not stop the admin notification
    assert welcome["task"] == "signup:send_welcome_email" and welcome["state"] == "failed"
    assert admin["task"] == "signup:send_admin_notification" and admin["state"] == "succeeded"
    assert admin["parent"] is None


# -- demo.py (make demo) --------------------------------------------------------------------------

def children(pid: int) -> dict[int, str]:
    "The live child processes of `pid`, with their command lines."
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        if int(fields[1]) == pid:
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            out[int(stat.parent.name)] = cmd
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_serves_both_and_one_signal_stops_both(tmp_path: Path, sig: signal.Signals) -> None:
    # Given `make demo`'s script on free ports, with its files in tmp_path
    with demo(tmp_path) as (proc, port, slow_port):
        # When it has started: it prints the link, the dashboard answers and its jobs reach the slow service
        wait_for(lambda: f"http://127.0.0.1:{port}" in (tmp_path / "demo.log").read_text(), what="the link")
        url = f"http://127.0.0.1:{port}"
        assert "Background Task Dashboard" in httpx.get(url + "/").text
        _, job_id = submit(url)
        wait_for(lambda: job_id in httpx.get(url + "/show_tstamps", headers=HX).text, what="the row appearing")
        kids = children(proc.pid)
        assert sorted(c.split("uvicorn ")[1].split()[0] for c in kids.values()) == ["demo:app", "slow_api:app"]
        # And when it gets one signal
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    # Then both servers are gone and the ports are free
    assert [pid for pid in kids if Path(f"/proc/{pid}").exists()] == []
    for p in (port, slow_port):
        with pytest.raises(httpx.ConnectError): httpx.get(f"http://127.0.0.1:{p}/", timeout=1)


# -- two examples at once -------------------------------------------------------------------------

def test_two_examples_at_once_keep_their_own_stores_and_each_job_succeeds(tmp_path: Path) -> None:
    # Given the signup example and the dashboard (with its slow service) served at once from the same folder,
    # with FH_TASKS_DB empty: each example picks its own store file
    env = dict(FH_TASKS_DB="", PYTHONUNBUFFERED="1", SLOW_API_DELAY="0.05", DASHBOARD_DB=str(tmp_path / "dash.db"))
    args = dict(cwd=tmp_path, extra=["--app-dir", str(EXAMPLES)])
    with uvicorn_server("slow_api:app", env=env, **args) as (slow_url, _), \
         uvicorn_server("signup:app", env=env, **args) as (signup_url, _), \
         uvicorn_server("dashboard:app", env={**env, "SLOW_API_URL": slow_url}, **args) as (dash_url, _):
        # When each gets a request that defers jobs
        assert httpx.post(signup_url + "/signup", data={"email": "ada@example.com", "username": "ada"}).is_success
        assert httpx.post(dash_url + "/submit", headers=HX).is_success
        # Then each store holds only its own example's jobs, and every one of them succeeds
        signup_jobs = wait_for(lambda: all_final(tmp_path / "signup.db", 2), what="the signup jobs finishing")
        [dash_job] = wait_for(lambda: all_final(tmp_path / "dashboard_jobs.db", 1), what="the dashboard job finishing")
    assert [j["task"] for j in signup_jobs] == ["signup:send_welcome_email", "signup:send_admin_notification"]
    assert all(j["state"] == "succeeded" for j in signup_jobs)
    assert dash_job["task"] == "dashboard:task_submit" and dash_job["state"] == "succeeded"
    assert not (tmp_path / "fh_tasks.db").exists()
