"""The Celery engine beyond the contract suite: the outbox while the broker is down, a worker killed under a job,
hard time limits, `celery -A ... worker`, eager mode and clear configuration errors. Real Redis and Celery
worker processes; each test in a namespace of its own."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import forget, wait_until
from celery_app import make
from fasthtml.common import P, fast_app
from starlette.testclient import TestClient
from support import ROOT

from fh_tasks import JobState, Tasks
from fh_tasks.engine import EngineSettings
from fh_tasks.engines.celery import CeleryEngine
from fh_tasks.errors import FhTasksError, Unsupported


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def hub_of(tmp_path: Path, namespace: str) -> Iterator[Callable[..., Tasks]]:
    "hub_of(url, **settings): a hub on the Celery engine with broker and status store at `url` (closed at the end)."
    made: list[Tasks] = []

    def hub(url: str, **kw: Any) -> Tasks:
        h = make(url, url, namespace, db=str(tmp_path / "outbox.db"), **kw)
        made.append(h)
        return h

    yield hub
    for h in made:
        forget(h.engine)
        h.close()


def worker_env(url: str, namespace: str) -> dict[str, str]:
    return {"FH_TEST_BROKER": url, "FH_TEST_STATUS": url, "FH_TEST_NS": namespace}


def test_requests_answer_while_the_broker_is_down_and_their_jobs_run_once_it_is_back(
        outage: Any, start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given an app on the Celery engine whose broker the test can take away, and a worker
    tasks = make(outage.url, outage.status, namespace, db=str(tmp_path / "outbox.db"))
    out = tmp_path / "ran"
    app, rt = fast_app()
    tasks.init_app(app)
    append = tasks.registry["b.append"]

    @rt("/go/{n}")
    def go(n: str):
        job = append.defer(str(out), n)
        return P(job.id, id="job"), job

    worker = start_worker({"FH_TEST_BROKER": outage.worker_url, "FH_TEST_STATUS": outage.status,
                           "FH_TEST_NS": namespace}, concurrency=1)
    try:
        with TestClient(app) as client:
            first = re.findall(r'id="job">(\w+)<', client.get("/go/up").text)[0]
            wait_until(lambda: (r := tasks.get(first)) and r.done, what="the first job", timeout=60)
            # When the broker goes away and requests defer jobs
            outage.stop()
            ids, slowest = [], 0.0
            for i in range(5):
                t0 = time.perf_counter()
                r = client.get(f"/go/{i}")
                slowest = max(slowest, time.perf_counter() - t0)
                assert r.status_code == 200
                ids += re.findall(r'id="job">(\w+)<', r.text)
            # Then every request answered at once, and its job is stored (in the outbox), queued
            assert slowest < 0.5, slowest
            assert [tasks.get(i).state for i in ids] == [JobState.queued] * 5  # type: ignore[union-attr]
            outbox = tasks.engine.outbox  # type: ignore[attr-defined]
            assert [j.id for j in outbox.pending_jobs()] == ids
            wait_until(lambda: outbox.last_error, what="the relay to meet the broker down")
            # When the broker is back, Then the relay sends the jobs and they run, in order, once each
            outage.start()
            wait_until(lambda: all((r := tasks.get(i)) and r.done for i in ids), what="the jobs to run", timeout=90)
        assert lines(out) == ["up", "0", "1", "2", "3", "4"], worker.tail()
        assert outbox.pending_jobs() == [] and all(tasks.get(i).attempts == 1 for i in ids)  # type: ignore[union-attr]
    finally:
        forget(tasks.engine)
        tasks.close()


def test_a_job_sent_again_after_a_relay_crash_runs_once(test_redis: str, hub_of: Callable[..., Tasks],
                                                         start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given a job a request deferred, sent by the relay while no worker runs
    tasks = hub_of(test_redis)
    out = tmp_path / "ran"
    app, rt = fast_app()
    tasks.init_app(app)

    @rt("/go")
    def go():
        job = tasks.registry["b.append"].defer(str(out), "once")
        return P(job.id, id="job"), job

    with TestClient(app) as client:
        (id,) = re.findall(r'id="job">(\w+)<', client.get("/go").text)
    outbox = tasks.engine.outbox  # type: ignore[attr-defined]
    wait_until(lambda: not outbox.pending_jobs(), what="the relay to send it")
    outbox.stop()  # (its thread would find the row below within a second, and send it before this test does)
    # When the relay crashed before marking it sent (the row is pending again) and sends it a second time
    with sqlite3.connect(tmp_path / "outbox.db") as c: c.execute("UPDATE fh_outbox SET sent_at = NULL")
    assert [j.id for j in outbox.pending_jobs()] == [id]
    assert outbox.relay_once() == 1
    # Then a worker receives two messages for it, and runs it once
    worker = start_worker(worker_env(test_redis, namespace), concurrency=2)
    rec = wait_until(lambda: (r := tasks.get(id)) and r.done and r, what="the job to run")
    time.sleep(1.0)  # time for the second copy to arrive (and be dropped)
    assert (rec.state, rec.attempts) == (JobState.succeeded, 1) and lines(out) == ["once"], worker.tail()


def test_a_job_whose_worker_process_dies_runs_again_a_bounded_number_of_times(
        test_redis: str, hub_of: Callable[..., Tasks], start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given a task that kills the process running it, on every attempt (it has no retries)
    tasks = hub_of(test_redis)
    log = tmp_path / "attempts"
    worker = start_worker(worker_env(test_redis, namespace), concurrency=1, lease=2.0)
    # When it runs
    job = tasks.registry["b.die"].defer(str(log))
    rec = job.wait(60)
    # Then each death gave it another attempt, in a new pool process, up to 3 attempts; then it failed: WorkerLost
    seen = [line.split() for line in lines(log)]
    assert [a for a, _ in seen] == ["1", "2", "3"], worker.tail()
    assert len({pid for _, pid in seen}) == 3
    assert (rec.state, rec.attempts) == (JobState.failed, 3) and rec.error["type"] == "WorkerLost"  # type: ignore[index]
    # And the worker itself lived on, and runs the next job
    assert tasks.registry["b.append"].defer(str(tmp_path / "after"), "fine").result(30) == "fine"


def test_a_task_that_outlives_its_hard_time_limit_fails_with_task_timeout(
        test_redis: str, hub_of: Callable[..., Tasks], start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given a task with a 0.5 s timeout that swallows the soft time limit, deferred with one retry
    tasks = hub_of(test_redis)
    log = tmp_path / "attempts"
    worker = start_worker(worker_env(test_redis, namespace), concurrency=1)
    # When it runs, Then each time the hard limit kills its pool process, the worker's main process records the
    # attempt as timed out; the first is retried, the second fails the job
    t0 = time.monotonic()
    rec = tasks.registry["b.stubborn"].with_options(retries=1, retry_delay=0.01).defer(str(log)).wait(60)
    assert (rec.state, rec.attempts) == (JobState.failed, 2), worker.tail()
    assert rec.error is not None and rec.error["type"] == "TaskTimeout" and "0.5s timeout" in rec.error["message"]
    assert lines(log) == ["1", "2"] and time.monotonic() - t0 < 40


@pytest.mark.parametrize("task", ["b.spin", "b.aspin"])
def test_a_running_job_is_cancelled_and_stops(task: str, test_redis: str, hub_of: Callable[..., Tasks],
                                              start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given a job running in a worker process (a sync task reporting progress, or an async one)
    tasks = hub_of(test_redis)
    log = tmp_path / "stopped"
    worker = start_worker(worker_env(test_redis, namespace), concurrency=1)
    job = tasks.registry[task].defer(str(log))
    wait_until(lambda: (r := job.get()) and r.progress is not None, what="the job to run", timeout=60)
    # When it is cancelled
    assert tasks.cancel(job.id) is False  # it is not queued any more
    assert tasks.cancel(job.id, running=True) is True
    # Then it is cancelled at once, and its attempt stops soon after (the sync one at its next progress report)
    rec = job.get()
    assert rec is not None and (rec.state, rec.attempts) == (JobState.cancelled, 1)
    wait_until(lambda: lines(log) == ["stopped"], what="the attempt to stop", timeout=10)
    # And the worker goes on to the next job; the cancelled one stays cancelled
    assert tasks.registry["b.append"].defer(str(tmp_path / "next"), "next").result(30) == "next", worker.tail()
    assert job.get().state == JobState.cancelled  # type: ignore[union-attr]


@pytest.mark.parametrize("prefetch", [1, 3])
def test_a_worker_holds_the_messages_its_prefetch_allows(prefetch: int, test_redis: str, hub_of: Callable[..., Tasks],
                                                         start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given a worker with one pool process, running a long job, and 5 more jobs queued behind it
    tasks = hub_of(test_redis, prefetch=prefetch)
    worker = start_worker({**worker_env(test_redis, namespace), "FH_TEST_PREFETCH": str(prefetch)}, concurrency=1)
    long = tasks.registry["b.spin"].defer(str(tmp_path / "stopped"))
    wait_until(lambda: (r := long.get()) and r.progress is not None, what="the long job to run", timeout=60)
    rest = [tasks.registry["b.append"].defer(str(tmp_path / "out"), str(i)) for i in range(5)]
    # Then the worker takes from the broker the running job and prefetch - 1 more, no other (Kombu's Redis list of
    # the default queue holds the rest)
    import redis
    r = redis.Redis.from_url(test_redis)
    queue = f"{namespace}:{namespace}.default"
    wait_until(lambda: r.llen(queue) == 5 - (prefetch - 1), what=f"{prefetch - 1} message(s) to be prefetched",
               timeout=30)
    time.sleep(0.5)
    assert r.llen(queue) == 5 - (prefetch - 1), worker.tail()
    # And once the long job ends, every job runs
    assert tasks.cancel(long.id, running=True)
    assert [j.result(30) for j in rest] == [str(i) for i in range(5)], worker.tail()
    r.close()


def test_celery_cli_worker_runs_the_hubs_jobs_and_warns_of_unenforced_timeouts(
        test_redis: str, hub_of: Callable[..., Tasks], start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given `celery -A celery_app:celery_app worker` on the threads pool (which enforces no time limits)
    tasks = hub_of(test_redis)
    worker = start_worker(worker_env(test_redis, namespace), celery_cli=True, pool="threads")
    # When a job is deferred, Then it runs there
    assert tasks.registry["b.append"].defer(str(tmp_path / "out"), "via celery -A").result(60) == "via celery -A"
    # And the worker said which tasks' timeouts it cannot enforce
    assert "does not enforce time limits: the timeouts of b.stubborn" in worker.tail(200)


def test_eager_mode_runs_jobs_inline_with_retries(test_redis: str, namespace: str, tmp_path: Path) -> None:
    # Given a hub in eager mode and a task that fails once
    engine = CeleryEngine(EngineSettings(broker=test_redis, db=str(tmp_path / "o.db"), eager=True),
                          namespace=namespace)
    tasks = Tasks(engine=engine)
    calls: list[int] = []

    @tasks.task(retries=1, retry_delay=60)
    def once_flaky() -> str:
        calls.append(1)
        if len(calls) == 1: raise ConnectionError("first")
        return "ok"

    try:
        # When it is deferred, Then it ran to success before defer() returned, its retry without the backoff
        rec = once_flaky.defer().get()
        assert rec is not None and (rec.state, rec.attempts, rec.result) == (JobState.succeeded, 2, "ok")
    finally:
        forget(engine)
        tasks.close()


def test_a_result_over_max_result_fails_its_job(test_redis: str, namespace: str, tmp_path: Path) -> None:
    # Given a hub (eager) whose results may take 100 bytes, and a task returning more
    engine = CeleryEngine(EngineSettings(broker=test_redis, db=str(tmp_path / "o.db"), eager=True),
                          namespace=namespace)
    tasks = Tasks(engine=engine, max_result=100)

    @tasks.task(retries=2)
    def big() -> str:
        return "x" * 1000

    try:
        # When it runs, Then it fails at once (no retry), with ResultError naming the limit
        rec = big.defer().get()
        assert rec is not None and (rec.state, rec.attempts, rec.result) == (JobState.failed, 1, None)
        assert rec.error is not None and rec.error["type"] == "ResultError" and "max_result" in rec.error["message"]
    finally:
        forget(engine)
        tasks.close()


def test_clear_configuration_errors(tmp_path: Path) -> None:
    # A broker Celery cannot use with fh-tasks
    with pytest.raises(ValueError, match="needs a redis:// or amqp:// broker"):
        Tasks(engine="celery", broker="sqs://queue", db=str(tmp_path / "o.db"))
    # A prefetch that is not a whole number of messages
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="prefetch must be a whole number of messages >= 1"):
            CeleryEngine(EngineSettings(broker="redis://127.0.0.1:1/0", db=str(tmp_path / "o.db")), prefetch=bad)
    # A process-pool task
    tasks = Tasks(engine="celery", broker="redis://127.0.0.1:1/0", db=str(tmp_path / "o.db"))
    with pytest.raises(Unsupported, match="celery engine cannot run process=True tasks"):
        tasks.task(process=True)(lambda: None)
    # Nothing connects at construction: a broker that is down does not stop an app from starting
    assert tasks.engine.name == "celery"
    tasks.close()
    # And without Celery installed, the message says what to install
    code = ("import sys; sys.modules['celery'] = None\nfrom fh_tasks import Tasks\n"
            "try: Tasks(engine='celery')\nexcept Exception as e: print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.startswith(FhTasksError.__name__) and "pip install 'fh-tasks[celery]'" in out, out


def test_defer_outside_a_request_with_the_broker_down_keeps_the_job_in_the_outbox(
        private_redis: Any, hub_of: Callable[..., Tasks], start_worker: Any, namespace: str, tmp_path: Path) -> None:
    # Given a hub whose Redis is down
    tasks = hub_of(private_redis.url)
    private_redis.stop()
    # When a job is deferred outside a request, Then defer() returns (no error), and the job is stored, queued
    job = tasks.registry["b.append"].defer(str(tmp_path / "out"), "later")
    assert job.get().state == JobState.queued  # type: ignore[union-attr]
    with pytest.raises(FhTasksError, match="cannot be reached"):
        tasks.counts()
    # And once Redis is back, the relay sends it and a worker runs it
    private_redis.start()
    start_worker(worker_env(private_redis.url, namespace), concurrency=1)
    assert job.result(90) == "later"
