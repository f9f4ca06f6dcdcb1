"""The jobs dashboard on the broker engines (capabilities `stats` and `admin` on the Redis status store).

The engine-independent tests of tests/integration/test_dashboard.py run here again, on a hub whose engine is Celery
(Redis broker and status store) and Dramatiq (Redis), each in a namespace of its own, their jobs run by
`fh_tasks.testing.drain` (the engine's own consumer, in the test's process). Then what only a broker engine has: keyset
pages over the status store's indexes (a filter of several indexes read within a bounded budget per page), and a real
Celery worker process that lists itself with its running jobs and honours a paused queue."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import forget, wait_until
from celery_app import make
from fasthtml.common import fast_app
from integration.test_dashboard import (  # noqa: F401  (the same tests, collected here on this module's `dash`)
    allow_ada,
    csrf,
    post,
    test_actions_retry_cancel_delete_retry_all_and_pause,
    test_an_async_auth_and_odd_query_values,
    test_attempt_history_shows_every_failed_attempt_with_its_traceback,
    test_events_stream_announces_job_changes,
    test_every_page_needs_auth_and_sends_strict_headers,
    test_metrics_in_prometheus_text_and_run_counters_survive_pruning,
    test_overview_shows_counts_throughput_queues_and_workers,
    test_secrets_are_redacted_and_hostile_text_is_escaped,
)
from starlette.testclient import TestClient
from support import follow_pages

from fh_tasks import JobState, Tasks
from fh_tasks.engine import EngineSettings
from fh_tasks.engines import status as status_mod

pytestmark = pytest.mark.timeout(90)
ADA = {"x-user": "ada"}
def engine_of(kind: str, url: str, namespace: str, db: str) -> Any:
    settings = EngineSettings(broker=url, status=url, db=db, workers=0)
    if kind == "celery":
        from fh_tasks.engines.celery import CeleryEngine
        return CeleryEngine(settings, namespace=namespace)
    from fh_tasks.engines.dramatiq import DramatiqEngine
    return DramatiqEngine(settings, namespace=namespace)


@pytest.fixture(params=["celery", "dramatiq"])
def dash(request: pytest.FixtureRequest, test_redis: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    "As test_dashboard's `dash`: make(**dashboard_options) -> (app, tasks, client as ada), on a broker engine."
    made: list[Tasks] = []

    def make_dash(engine: Any = None, **kw: Any) -> tuple[Any, Tasks, TestClient]:
        assert engine is None, "the broker tests make their own engine"
        app, _ = fast_app(secret_key="fh-tasks-tests")
        eng = engine_of(request.param, test_redis, f"t{uuid.uuid4().hex[:12]}", str(tmp_path / "outbox.db"))
        tasks = Tasks(app, engine=eng, workers=0)
        made.append(tasks)
        kw.setdefault("auth", allow_ada)
        tasks.dashboard("/tasks", **kw)
        return app, tasks, TestClient(app, headers=ADA)

    yield make_dash
    for t in made:
        forget(t.engine)
        t.close()


def test_keyset_pages_cover_every_job_once_under_every_filter(dash: Callable[..., Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    app, tasks, ada = dash()

    @tasks.task
    def a(i: int) -> int: return i

    @tasks.task(queue="other")
    def b(i: int) -> int: return i

    other = {b.with_options(queue="default").defer(i).id for i in range(5)}  # task b on queue default: the oldest
    ids = {a.defer(i).id for i in range(70)} | {b.defer(i).id for i in range(50)}
    # Following the pages' "Next page" links shows every job once, newest first
    seen = follow_pages(ada)
    assert len(seen) == len(set(seen)) == 125 and set(seen) == ids | other
    e = tasks.engine

    def every(limit: int, **f: Any) -> list[str]:
        out: list[str] = []
        key = None
        while True:
            rows, key = e.page(limit=limit, before=key, **f)
            out += [r.id for r in rows]
            if key is None: return out
    # Filters by one index, by several (intersected), and by time; a page of 7 at a time
    assert len(every(7, task=b.name)) == 55 and len(every(7, queue="other")) == 50
    assert set(every(7, task=b.name, queue="default")) == other
    assert len(every(7, state="queued", task=a.name, queue="default")) == 70
    assert every(7, state="succeeded") == [] and every(7, state="no-such-state") == []
    assert len(every(50, since=time.time() - 60)) == 125 and every(7, since=time.time() + 3600) == []
    newest = every(200)
    assert newest[:5] == [r.id for r in e.page(limit=5)[0]] and newest[-1] in other  # newest first
    # A filter of several indexes examines a bounded number of entries per page: short pages, then the rest
    monkeypatch.setattr(status_mod, "PAGE_BUDGET", 10)
    rows, key = e.page(task=b.name, queue="default", limit=50)
    assert rows == [] and key is not None  # the 10 newest jobs of task b are on queue other
    assert set(every(50, task=b.name, queue="default")) == other
    # A job deleted under the cursor: the next page goes on from its place
    rows, key = e.page(task=a.name, limit=10)
    e.status.redis.zrem(e.status.key("task", a.name), rows[-1].id)
    rest, _ = e.page(task=a.name, before=key, limit=100)
    assert len(rest) == 60 and not {r.id for r in rest} & {r.id for r in rows}


@pytest.fixture
def celery_site(test_redis: str, namespace: str, tmp_path: Path) -> Iterator[tuple[Tasks, TestClient]]:
    "The tests/brokers Celery hub (celery_app.make) with a dashboard, and a client as ada."
    app, _ = fast_app(secret_key="fh-tasks-tests")
    tasks = make(test_redis, test_redis, namespace, db=str(tmp_path / "outbox.db"))
    tasks.init_app(app)
    tasks.dashboard("/tasks", auth=allow_ada)
    try: yield tasks, TestClient(app, headers=ADA)
    finally:
        forget(tasks.engine)
        tasks.close()


def test_a_celery_worker_lists_itself_with_its_running_jobs_and_honours_a_paused_queue(
        celery_site: tuple[Tasks, TestClient], start_worker: Any, test_redis: str, namespace: str,
        tmp_path: Path) -> None:
    tasks, ada = celery_site
    append, spin = tasks.registry["b.append"], tasks.registry["b.spin"]
    out, stopped = tmp_path / "ran", tmp_path / "stopped"
    # Given a Celery worker process (prefork, 2 children): it lists itself on the overview, live
    worker = start_worker({"FH_TEST_BROKER": test_redis, "FH_TEST_STATUS": test_redis, "FH_TEST_NS": namespace})
    w = wait_until(lambda: tasks.engine.overview().workers, what="the worker's heartbeat", timeout=30)
    [(info, running)] = w
    assert info.live and info.concurrency == 2 and "default" in info.queues and running == 0, worker.tail()
    assert info.id in ada.get("/tasks").text[:100_000] or info.id[:12] in ada.get("/tasks").text
    # When a job runs, the worker shows it running
    job = spin.defer(str(stopped))
    wait_until(lambda: tasks.get(job.id).state is JobState.running, what="the job to start")
    wait_until(lambda: tasks.engine.overview().workers[0][1] == 1, what="the worker to show its running job")
    assert tasks.cancel(job.id, running=True)
    # When the default queue is paused (from the dashboard) and jobs are deferred to it
    token = csrf(ada)
    assert post(ada, "/tasks/queues/pause", token, queue="default").headers["location"] == "/tasks?done=paused"
    time.sleep(status_mod.PAUSED_TTL + 0.2)  # every process sees the pause within this long
    ids = [append.defer(str(out), str(i)).id for i in range(3)]
    # Then the worker receives them but runs none: they stay queued, shown as the paused queue's depth
    time.sleep(2.0)
    assert [tasks.get(i).state for i in ids] == [JobState.queued] * 3 and not out.exists(), worker.tail()
    o = tasks.engine.overview()
    assert "default" in o.paused and ("default", 3) in [(q, n) for q, n, _ in o.queues]
    assert "fh_tasks_queue_paused{queue=\"default\"} 1" in ada.get("/tasks/metrics").text
    # When it is resumed, Then they run, once each
    assert post(ada, "/tasks/queues/resume", token, queue="default").headers["location"] == "/tasks?done=resumed"
    wait_until(lambda: all(tasks.get(i).state is JobState.succeeded for i in ids), what="the held jobs to run")
    assert sorted(out.read_text().split()) == ["0", "1", "2"] and all(tasks.get(i).attempts == 1 for i in ids)
    # And a worker that stops cleanly leaves the list at once
    worker.stop()
    assert tasks.engine.overview().workers == []
