"""The jobs dashboard over HTTP: every page and action, its gate (auth, local-only), CSRF, headers, redaction and
escaping, keyset paging and its query plans, attempt history, paused queues honoured by workers, metrics."""
from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fasthtml.common import RedirectResponse, fast_app
from starlette.testclient import TestClient
from support import follow_pages, uvicorn_server

from fh_tasks import Tasks
from fh_tasks.engines.sqlite import SQLiteEngine
from fh_tasks.testing import drain

pytestmark = pytest.mark.timeout(60)
ADA = {"x-user": "ada"}
HOSTILE = '<img src=x onerror="alert(1)">'


def allow_ada(req: Any) -> bool:
    return req.headers.get("x-user") == "ada"


@pytest.fixture
def dash(make_tasks) -> Callable[..., tuple[Any, Tasks, TestClient]]:
    "make(**dashboard_options) -> (app, tasks, client logged in as ada): a hub with a dashboard at /tasks."
    def make(engine: Any = None, **kw: Any) -> tuple[Any, Tasks, TestClient]:
        app, _ = fast_app(secret_key="fh-tasks-tests")
        tasks = make_tasks(app, workers=0, **({"engine": engine} if engine is not None else {}))
        kw.setdefault("auth", allow_ada)
        tasks.dashboard("/tasks", **kw)
        return app, tasks, TestClient(app, headers=ADA)
    return make


def csrf(client: TestClient, path: str = "/tasks") -> str:
    "Open a page (which sets the CSRF cookie) and return the token its forms carry."
    r = client.get(path)
    assert r.status_code == 200, r.text
    token = client.cookies.get("fh_tasks_csrf")
    assert token and f'value="{token}"' in r.text
    return str(token)


def post(client: TestClient, path: str, token: str | None, **form: str) -> httpx.Response:
    data = {**form, **({"csrf": token} if token is not None else {})}
    return client.post(path, data=data, follow_redirects=False)


def test_it_refuses_to_mount_without_auth_unless_local_only(make_tasks):
    app, _ = fast_app(secret_key="fh-tasks-tests")
    tasks = make_tasks(app, workers=0)
    with pytest.raises(ValueError, match="needs auth="): tasks.dashboard("/tasks")
    with pytest.raises(ValueError, match="path must look like"): tasks.dashboard("tasks/", auth=allow_ada)
    tasks.dashboard("/tasks", local_only=True)
    assert any(getattr(r, "path", "") == "/tasks" for r in app.routes)


def test_every_page_needs_auth_and_sends_strict_headers(dash):
    app, tasks, ada = dash()

    @tasks.task
    def add(a: int, b: int) -> int: return a + b

    job = add.defer(1, 2)
    drain(tasks)
    pages = ["/tasks", "/tasks/jobs", "/tasks/jobs?state=succeeded", f"/tasks/jobs/{job.id}", "/tasks/metrics",
             "/tasks/static/js", "/tasks/static/css"]
    anon = TestClient(app)
    for p in pages:
        # Without the user, every page is refused
        r = anon.get(p)
        assert r.status_code == 403 and "succeeded" not in r.text and "a + b" not in r.text, p
        # With the user, every page answers, and is never cached
        r = ada.get(p)
        assert r.status_code == 200, (p, r.text)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == ("no-cache" if "/static/" in p else "no-store"), p
    for p in pages[:4]:
        r = ada.get(p)
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp, csp
        assert "<script>" not in r.text.replace("<script src=", "")  # no inline script of ours
        assert 'src="/tasks/static/js"' in r.text and 'href="/tasks/static/css"' in r.text
    assert ada.get("/tasks/static/hub").status_code == 404
    # Every action is a POST: a GET is refused
    assert ada.get(f"/tasks/jobs/{job.id}/delete").status_code == 405


def test_auth_may_answer_with_its_own_response_and_the_apps_beforeware_runs_first(make_tasks):
    def login_first(req):  # no annotation: FastHTML injects the request by its name
        return None if req.headers.get("x-user") else RedirectResponse("/login", status_code=303)

    app, _ = fast_app(secret_key="fh-tasks-tests", before=login_first)
    tasks = make_tasks(app, workers=0)
    tasks.dashboard("/tasks", auth=lambda req: RedirectResponse("/no", 303) if req.headers["x-user"] != "ada" else 1)
    cli = TestClient(app, follow_redirects=False)
    r = cli.get("/tasks")
    assert r.headers.get("location") == "/login", (r.status_code, r.text)  # the app's Beforeware
    assert cli.get("/tasks", headers={"x-user": "bob"}).headers["location"] == "/no"  # the dashboard's auth
    assert cli.get("/tasks", headers=ADA).status_code == 200


def test_csrf_is_required_for_every_action(dash):
    app, tasks, ada = dash()

    @tasks.task
    def flaky() -> None: raise RuntimeError("no")

    job = flaky.defer()
    drain(tasks)
    token = csrf(ada)
    actions = [(f"/tasks/jobs/{job.id}/retry", {}), (f"/tasks/jobs/{job.id}/cancel", {}),
               (f"/tasks/jobs/{job.id}/delete", {}), ("/tasks/tasks/retry-failed", {"task": flaky.name}),
               ("/tasks/queues/pause", {"queue": "default"}), ("/tasks/queues/resume", {"queue": "default"})]
    for path, form in actions:
        # Without a token, with a wrong one, or from another site: refused, and nothing changes
        assert post(ada, path, None, **form).status_code == 403, path
        assert post(ada, path, "forged", **form).status_code == 403, path
        r = ada.post(path, data={**form, "csrf": token}, headers={"origin": "https://evil.example"},
                     follow_redirects=False)
        assert r.status_code == 403, path
    assert tasks.get(job.id).state.value == "failed" and not tasks.store.paused_queues(fresh=True)
    # Another client (no cookie) with ada's token is refused too
    other = TestClient(app, headers=ADA)
    assert post(other, f"/tasks/jobs/{job.id}/retry", token).status_code == 403


def test_actions_retry_cancel_delete_retry_all_and_pause(dash):
    app, tasks, ada = dash()
    fail = {"on": True}

    @tasks.task
    def sometimes(n: int) -> int:
        if fail["on"]: raise ValueError(f"failing {n}")
        return n

    @tasks.task(queue="slow")
    def later() -> str: return "done"

    jobs = [sometimes.defer(i) for i in range(3)]
    drain(tasks)
    assert {tasks.get(j.id).state.value for j in jobs} == {"failed"}
    token = csrf(ada)
    fail["on"] = False
    # Retry one job: it runs again and succeeds
    r = post(ada, f"/tasks/jobs/{jobs[0].id}/retry", token)
    assert r.status_code == 303 and r.headers["location"] == f"/tasks/jobs/{jobs[0].id}?done=retried"
    drain(tasks)
    assert tasks.get(jobs[0].id).state.value == "succeeded"
    assert "The job was queued again." in ada.get(r.headers["location"]).text
    # Retry all failed of a task
    r = post(ada, "/tasks/tasks/retry-failed", token, task=sometimes.name)
    assert r.headers["location"] == "/tasks?done=retried-all"
    drain(tasks)
    assert {tasks.get(j.id).state.value for j in jobs} == {"succeeded"}
    # Delete a finished job
    r = post(ada, f"/tasks/jobs/{jobs[1].id}/delete", token)
    assert r.headers["location"] == "/tasks/jobs?done=deleted" and tasks.get(jobs[1].id) is None
    assert ada.get(f"/tasks/jobs/{jobs[1].id}").status_code == 404
    # Pause a queue: workers take none of its jobs; cancel one of them; resume: the other runs
    assert post(ada, "/tasks/queues/pause", token, queue="slow").headers["location"] == "/tasks?done=paused"
    a, b = later.defer(), later.defer()
    drain(tasks)
    assert tasks.get(a.id).state.value == "queued" and tasks.get(b.id).state.value == "queued"
    assert "paused" in ada.get("/tasks").text
    assert post(ada, f"/tasks/jobs/{a.id}/cancel", token).headers["location"].endswith("?done=cancelled")
    assert tasks.get(a.id).state.value == "cancelled"
    # Cancelling it again, or deleting a queued job, is refused (it is not in a state that allows it)
    assert post(ada, f"/tasks/jobs/{a.id}/cancel", token).headers["location"].endswith("?done=refused")
    assert post(ada, f"/tasks/jobs/{b.id}/delete", token).headers["location"].endswith("?done=refused")
    post(ada, "/tasks/queues/resume", token, queue="slow")
    drain(tasks)
    assert tasks.get(b.id).state.value == "succeeded"


def test_a_paused_queue_is_honoured_by_a_worker_in_another_process_of_the_store(make_tasks, db):
    # Given a queue paused through one hub, and a job in it
    app, _ = fast_app(secret_key="fh-tasks-tests")
    web = make_tasks(app, workers=0)
    worker_hub = make_tasks(workers=0)

    @web.task(queue="q")
    def job() -> int: return 1

    worker_hub.task(job.fn, name=job.name, queue="q")
    web.engine.pause("q")
    j = job.defer()
    # When another hub's worker drains, Then it leaves the job queued; once resumed, it runs it
    drain(worker_hub)
    assert worker_hub.get(j.id).state.value == "queued"
    web.engine.resume("q")
    time.sleep(1.05)  # the other process reads the paused set at most once a second
    drain(worker_hub)
    assert worker_hub.get(j.id).state.value == "succeeded"


def test_attempt_history_shows_every_failed_attempt_with_its_traceback(dash):
    app, tasks, ada = dash()
    runs = {"n": 0}

    @tasks.task(retries=2, retry_delay=0.001)
    def third_time_lucky() -> str:
        runs["n"] += 1
        if runs["n"] < 3: raise KeyError(f"missing <b>{runs['n']}</b>")
        return "ok"

    j = third_time_lucky.defer()
    drain(tasks)
    assert tasks.get(j.id).state.value == "succeeded"
    attempts = tasks.engine.attempts(j.id)
    assert [(a["attempt"], a["state"], a["error"]["type"]) for a in attempts] == [(1, "retrying", "KeyError"),
                                                                                 (2, "retrying", "KeyError")]
    page = ada.get(f"/tasks/jobs/{j.id}").text
    assert "Failed attempts" in page and page.count("Traceback") >= 2 and "missing &lt;b&gt;1&lt;/b&gt;" in page
    assert "<b>1</b>" not in page


def test_secrets_are_redacted_and_hostile_text_is_escaped(dash):
    app, tasks, ada = dash()

    @tasks.task(name=HOSTILE, queue=HOSTILE)
    def hostile(payload: dict, url: str) -> None:
        raise RuntimeError(f"{HOSTILE} password=hunter2 {url}")

    j = hostile.defer({"user": "ada", "nested": [{"apiKey": "sk-live-1"}], "Token": "t0k"},
                      "postgres://ada:s3cret@db/x")
    drain(tasks)
    pages = [ada.get(p).text for p in ("/tasks", "/tasks/jobs", f"/tasks/jobs/{j.id}",
                                       "/tasks/jobs?state=failed&task=" + HOSTILE)]
    for text in pages:
        assert "<img" not in text, text[text.find("<img") - 200:text.find("<img") + 100]
        for secret in ("hunter2", "sk-live-1", "t0k", "s3cret"): assert secret not in text
    assert "&lt;img src=x onerror=" in pages[0] and "[redacted]" in pages[2] and "ada" in pages[2]
    m = ada.get("/tasks/metrics").text
    assert 'task="<img src=x onerror=\\"alert(1)\\">"' in m  # Prometheus label escaping


def test_keyset_pages_cover_every_job_once_and_filters_apply(dash):
    app, tasks, ada = dash()

    @tasks.task
    def a(i: int) -> int: return i

    @tasks.task(queue="other")
    def b(i: int) -> int: return i

    ids = {a.defer(i).id for i in range(70)} | {b.defer(i).id for i in range(50)}
    seen = follow_pages(ada)
    assert len(seen) == len(set(seen)) == 120 and set(seen) == ids
    # Filters: by task, queue, state and time
    rows, nxt = tasks.engine.page(task=b.name, limit=100)
    assert len(rows) == 50 and nxt is None and {r.task for r in rows} == {b.name}
    rows, _ = tasks.engine.page(queue="default", limit=100)
    assert len(rows) == 70
    assert tasks.engine.page(state="succeeded")[0] == []
    assert len(tasks.engine.page(state="queued", limit=200)[0]) == 120
    assert len(tasks.engine.page(since=time.time() - 60, limit=200)[0]) == 120
    assert tasks.engine.page(since=time.time() + 3600)[0] == []
    assert "No job matches." in ada.get("/tasks/jobs?state=failed").text


def test_the_job_list_queries_use_their_indexes(make_tasks, db):
    # Given a store with jobs of several tasks, most of them succeeded
    tasks = make_tasks(workers=0)
    store = tasks.store
    store.counts()
    with sqlite3.connect(db) as c:
        c.executemany("INSERT INTO fh_jobs (id, task, queue, args, state, run_at, created_at, finished_at) "
                      "VALUES (?, ?, 'default', '[[],{}]', ?, 0, ?, ?)",
                      [(f"j{i}", f"t{i % 5}", "failed" if i % 50 == 0 else "succeeded", i, i) for i in range(5000)])
    c.close()

    def plan(**kw: Any) -> str:
        sql, params = store.page_sql(**kw)
        assert sql is not None
        with sqlite3.connect(db) as c:
            out = " | ".join(r[3] for r in c.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        c.close()
        return out

    # Then: newest first straight off the table (no sort); by task through its index in seq order; by a rare
    # state through the state index; by a common one off the table; the outer query reads rows by seq
    p = plan()
    assert "SEARCH fh_jobs USING INTEGER PRIMARY KEY (rowid<?)" in p and "TEMP B-TREE" not in p, p
    p = plan(task="t1", before=4000)
    assert "USING COVERING INDEX fh_jobs_task (task=? AND seq<?)" in p and "TEMP B-TREE" not in p, p
    p = plan(state="failed")
    assert "INDEX fh_jobs_state (state=?" in p, p
    p = plan(state="succeeded")
    assert "fh_jobs_state" not in p and "TEMP B-TREE" not in p and "PRIMARY KEY (rowid<?)" in p, p
    p = plan(since=2000.0)
    assert "SEARCH fh_jobs USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in p, p
    assert "SEARCH fh_jobs USING INTEGER PRIMARY KEY (rowid=?)" in plan(queue="default")


def test_an_engine_without_stats_or_admin_says_so(dash, db):
    class Plain(SQLiteEngine):
        capabilities = replace(SQLiteEngine.capabilities, stats=False, admin=False, events=False)

    app, tasks, ada = dash(engine=Plain(tasks_settings(db)))

    @tasks.task
    def boom() -> None: raise OSError("x")

    j = boom.defer()
    drain(tasks)
    text = ada.get("/tasks").text
    assert "Throughput, queues and workers: not available on the sqlite engine (capability &#x27;stats&#x27;)" \
        in text or "capability 'stats'" in text
    assert 'data-events=""' in text
    detail = ada.get(f"/tasks/jobs/{j.id}").text
    assert "Delete: not available" in detail and "Attempt history: not available" in detail
    assert "pages by offset" in ada.get("/tasks/jobs").text
    token = csrf(ada, f"/tasks/jobs/{j.id}")
    assert post(ada, f"/tasks/jobs/{j.id}/delete", token).headers["location"].endswith("?done=unsupported")
    assert tasks.get(j.id) is not None
    assert ada.get("/tasks/metrics").status_code == 404 and ada.get("/tasks/events").status_code == 404


def tasks_settings(db: str) -> Any:
    from fh_tasks.engine import EngineSettings
    return EngineSettings(db=db, workers=0)


def test_metrics_in_prometheus_text_and_run_counters_survive_pruning(dash):
    app, tasks, ada = dash()

    @tasks.task
    def ok() -> None: pass

    @tasks.task
    def bad() -> None: raise ValueError("x")

    for _ in range(3): ok.defer()
    bad.defer()
    drain(tasks)
    text = tasks.metrics()
    assert f'fh_tasks_runs_total{{task="{ok.name}",outcome="succeeded"}} 3' in text
    assert f'fh_tasks_runs_total{{task="{bad.name}",outcome="failed"}} 1' in text
    assert f'fh_tasks_jobs{{task="{bad.name}",state="failed"}} 1' in text
    assert 'fh_tasks_recent_run_seconds_count 4' in text and "# TYPE fh_tasks_recent_run_seconds histogram" in text
    # Every sample line is `name{labels} value`
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{.*\})? -?[0-9.e+-]+', line), line
    # Pruning the finished jobs keeps the run counters
    assert tasks.prune(-1) == 4
    text = tasks.metrics()
    assert f'fh_tasks_runs_total{{task="{ok.name}",outcome="succeeded"}} 3' in text
    assert f'fh_tasks_runs_total{{task="{bad.name}",outcome="failed"}} 1' in text
    assert "fh_tasks_jobs{" not in text


def test_overview_shows_counts_throughput_queues_and_workers(dash):
    app, tasks, ada = dash()

    @tasks.task
    def ok() -> None: pass

    @tasks.task(queue="mail")
    def mail() -> None: pass

    ok.defer()
    drain(tasks)
    mail.defer()
    text = ada.get("/tasks").text
    assert 'id="fh-dash-count-succeeded"' in text and "<svg" in text and "1 succeeded, 0 failed attempts" in text
    assert re.search(r'href="/tasks/jobs\?queue=mail">mail</a>\s*</th>\s*<td class="num">1</td>', text), text
    assert "Pause" in text


def test_events_stream_announces_job_changes(dash):
    app, tasks, ada = dash(stream_seconds=1.0)

    @tasks.task
    def ok() -> None: pass

    with ada.stream("GET", "/tasks/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store"
        lines = r.iter_lines()
        assert next(lines) == "retry: 1000"
        ok.defer()
        got = [line for line in lines if line.startswith("event:") or line.startswith("data:")]
    assert "event: job" in got and any('"kind": "stored"' in g for g in got)


def test_local_only_answers_loopback_only(tmp_path):
    (tmp_path / "localapp.py").write_text(
        "import os\nfrom fasthtml.common import fast_app\nfrom fh_tasks import Tasks\n"
        "app, rt = fast_app(secret_key='fh-tasks-tests')\ntasks = Tasks(app, db=os.environ['JOBS_DB'])\n"
        "tasks.dashboard('/tasks', local_only=True)\n")
    with uvicorn_server("localapp:app", cwd=tmp_path, env={"JOBS_DB": str(tmp_path / "jobs.db")}) as (url, _):
        assert httpx.get(f"{url}/tasks").status_code == 200
        r = httpx.get(f"{url}/tasks", headers={"x-forwarded-for": "203.0.113.9"})
        assert r.status_code == 403 and "local_only" in r.text


def test_a_job_lost_with_its_worker_shows_the_lost_attempt(dash):
    app, tasks, ada = dash()

    @tasks.task(retries=2)
    def long() -> None: pass

    j = long.defer()
    # Given a worker that claimed the job and died (its lease ran out)
    [claim] = tasks.store.claim("dead-worker", ["default"], 1, 0.01)
    time.sleep(0.05)
    # When its lease is swept, Then the job is queued again and the lost attempt is in its history, once
    assert tasks.store.expire() == [(j.id, "queued")]
    tasks.store.expire()
    [lost] = tasks.engine.attempts(j.id)
    assert (lost["attempt"], lost["state"], lost["worker"], lost["error"]["type"]) == (1, "queued", "dead-worker",
                                                                                     "WorkerLost")
    assert "WorkerLost" in ada.get(f"/tasks/jobs/{j.id}").text
    assert claim.attempt == 1


def test_an_async_auth_and_odd_query_values(dash):
    async def only_ada(req: Any) -> bool: return req.headers.get("x-user") == "ada"

    app, tasks, ada = dash(auth=only_ada)
    assert TestClient(app, headers={"x-user": "bob"}).get("/tasks").status_code == 403
    # Unknown filters and keys are ignored, never reflected unescaped, never an error
    r = ada.get("/tasks/jobs", params={"state": "<script>", "since": "1y", "before": "x'--", "task": "<b>t</b>"})
    assert r.status_code == 200 and "<script>" not in r.text and "<b>t</b>" not in r.text
    assert ada.get("/tasks/jobs/does-not-exist").status_code == 404
    assert ada.get("/tasks?done=<i>x</i>").text.count("<i>x</i>") == 0
