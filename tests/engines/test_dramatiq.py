"""The Dramatiq engine beyond the contract suite, on real brokers (Redis and RabbitMQ): jobs travel as Dramatiq messages
named by their ids, Dramatiq's own retries and limits never apply, workers are `fh-tasks worker` or Dramatiq's CLI,
a killed worker's prefetched messages are not lost, and requests keep working while the broker is down."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq_tasks
import pytest
from contract_tasks import TIMEOUT, lines, register
from dramatiq_support import DramatiqEngine, amqp_url, redis_url
from engines_support import ENGINES, Unavailable, site, wait_until
from fasthtml.common import P
from servers import Proxy, RedisServer
from starlette.testclient import TestClient
from support import CI

from fh_tasks import JobState, Tasks
from fh_tasks.engine import EngineSettings
from fh_tasks.errors import FhTasksError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses Linux process groups")


@pytest.fixture(params=["dramatiq-redis", "dramatiq-rabbitmq"])
def dq(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DramatiqEngine]:
    "The Dramatiq engine on each broker, with this test's namespace; its hubs and worker processes end with it."
    yield from _engine(ENGINES[request.param], tmp_path)


def _engine(cls: type[Any], tmp_path: Path) -> Iterator[Any]:
    try: e = cls(tmp_path)
    except Unavailable as why:
        if CI: raise
        pytest.skip(str(why))
    try: yield e
    finally: e.close()


def _job_ids(html: str) -> list[str]:
    return re.findall(r'id="job">([0-9a-f]{32})<', html)


def _done(tasks: Tasks, ids: list[str], timeout: float = 30.0) -> list[Any]:
    "The records of `ids` once all are final."
    return wait_until(lambda: all((r := tasks.get(i)) and r.done for i in ids) and [tasks.get(i) for i in ids],
                      timeout, f"jobs {ids} to finish")


# -- jobs are Dramatiq messages ----------------------------------------------------------------------------------------
def test_a_handlers_job_runs_in_a_worker_process(dq: DramatiqEngine) -> None:
    # Given an app with no worker of its own, and a worker process in another directory
    app, rt, tasks, t = site(dq, workers=0)

    @rt("/go")
    def go():
        job = t.echo.defer({"n": 7})
        return P(job.id, id="job"), job

    worker = dq.start_worker()
    with TestClient(app) as client:
        # When a handler returns a job
        (id,) = _job_ids(client.get("/go").text)
        # Then the worker process runs it to success, with its result stored
        (rec,) = _done(tasks, [id])
    assert (rec.state, rec.result, rec.attempts, rec.error) == (JobState.succeeded, {"n": 7}, 1, None), worker.tail()
    assert rec.worker == f"{socket.gethostname()}:{worker.pid}"


def _messages(e: DramatiqEngine, tasks: Tasks, queue: str) -> list[dict[str, Any]]:
    "The messages waiting in a Dramatiq queue of the test's namespace, as the broker holds them (left there)."
    name = f"{e.namespace}.{queue}"
    if e.broker.startswith("redis"):
        import redis
        r = redis.Redis.from_url(e.broker)
        try: return [json.loads(r.hget(f"dramatiq:{name}.msgs", i)) for i in r.lrange(f"dramatiq:{name}", 0, -1)]
        finally: r.close()
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(e.broker))
    try:
        ch, out = conn.channel(), []
        while (got := ch.basic_get(name, auto_ack=False))[0] is not None: out.append(json.loads(got[2]))
        return out  # unacked: back in the queue when the connection closes
    finally: conn.close()


def _counts(e: DramatiqEngine, tasks: Tasks, queue: str) -> tuple[int, int, int]:
    "Messages ready in a Dramatiq queue, its delay queue and its dead-letter queue."
    name = f"{e.namespace}.{queue}"
    broker: Any = tasks.engine.broker
    if e.broker.startswith("redis"):
        r = broker.client
        return r.llen(f"dramatiq:{name}"), r.llen(f"dramatiq:{name}.DQ"), r.zcard(f"dramatiq:{name}.XQ")
    return tuple(broker.get_queue_message_counts(name))


def test_each_attempt_is_one_dramatiq_message_named_by_the_job_id(dq: DramatiqEngine, tmp_path: Path) -> None:
    # Given no worker running
    tasks = dq.make(workers=0)
    t = register(tasks)
    # When a job is deferred, with positional and keyword arguments
    job = t.append.defer(str(tmp_path / "log"), "hello", pause=0.5)
    # Then the broker holds one message for it: the job id as message id, the task's stored name as actor, the
    # arguments as they were given, and none of Dramatiq's retry, time-limit or delay options
    (msg,) = _messages(dq, tasks, "default")
    assert (msg["message_id"], msg["actor_name"], msg["queue_name"]) == (job.id, "contract.append",
                                                                       f"{dq.namespace}.default")
    assert (msg["args"], msg["kwargs"]) == ([str(tmp_path / "log"), "hello"], {"pause": 0.5})
    assert not {"max_retries", "retries", "time_limit", "eta", "traceback"} & set(msg["options"])
    # And a job deferred with a delay is no message yet: the status store keeps it until it is due
    later = t.echo.with_options(delay=60).defer("later")
    assert [m["message_id"] for m in _messages(dq, tasks, "default")] == [job.id]
    assert tasks.get(later.id).state == JobState.scheduled


def test_dramatiq_itself_retries_nothing_and_limits_nothing(dq: DramatiqEngine, tmp_path: Path) -> None:
    # Given the engine's broker: none of Dramatiq's default middleware that retries, ages or limits messages
    from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, TimeLimit
    tasks = dq.make(workers=0)
    t = register(tasks)
    stack = tasks.engine.broker.middleware
    assert not [m for m in stack if isinstance(m, (Retries, AgeLimit, Callbacks, Pipelines))]
    assert [m.time_limit for m in stack if isinstance(m, TimeLimit)] == [float("inf")]  # not Dramatiq's 10 minutes
    # When a task with no retries fails in a worker
    worker = dq.start_worker()
    job = t.fails_unless.defer(str(tmp_path / "never"))
    rec = job.wait(20)
    # Then it failed once, for good: no retry waits in Dramatiq's delay queue, nothing in its dead-letter queue
    assert (rec.state, rec.attempts, rec.error["type"]) == (JobState.failed, 1, "FileNotFoundError"), worker.tail()
    time.sleep(0.5)
    assert _counts(dq, tasks, "default") == (0, 0, 0)
    assert tasks.get(job.id).attempts == 1


@pytest.mark.parametrize("cli", ["fh-tasks", "dramatiq"])
def test_either_cli_runs_the_jobs_with_time_limits_and_one_event_loop(dq: DramatiqEngine, tmp_path: Path,
                                                                     cli: str) -> None:
    # Given a worker process started by `fh-tasks worker`, or by Dramatiq's own CLI on the same module
    tasks = dq.make(workers=0)
    t, where = register(tasks), dramatiq_tasks.register(tasks)
    if cli == "fh-tasks": worker = dq.start_worker(target="dramatiq_worker:tasks")
    else:
        cmd = [sys.executable, "-m", "dramatiq", "dramatiq_worker", "--processes", "1", "--threads", "4"]
        worker = dq.start_worker(command=cmd)
    log = str(tmp_path / "attempts")
    # When jobs run there: a plain one, a sync one past its timeout, and two async ones
    ok, slow, w1, w2 = t.echo.defer(cli), t.sync_overrun.defer(log, 1.0), where.defer(), where.defer()
    # Then the plain one succeeds
    assert ok.result(30) == cli, worker.tail()
    # And the slow one is cut at its own timeout on both attempts (Dramatiq's time limit, not its 10 minutes)
    rec = slow.wait(30)
    assert (rec.state, rec.attempts, rec.error["type"]) == (JobState.failed, 2, "TaskTimeout"), worker.tail()
    assert f"{TIMEOUT}s timeout" in rec.error["message"] and lines(log) == ["1", "2"]
    # And the async ones ran in that process, on its one event loop (the AsyncIO middleware's), as their own jobs
    a, b = w1.result(30), w2.result(30)
    assert a["pid"] == b["pid"] != os.getpid()
    assert (a["loop"], a["thread"]) == (b["loop"], b["thread"])
    assert (a["job"], b["job"], a["attempt"]) == (w1.id, w2.id, 1)


def test_messages_a_killed_worker_had_prefetched_run_in_the_next(dq: DramatiqEngine) -> None:
    # Given a worker with one thread, running a job that stalls, with the next job prefetched behind it
    tasks = dq.make(workers=0)
    t = register(tasks)
    stalled, behind = t.stall_first.defer(), t.echo.defer("behind")
    first = dq.start_worker(concurrency=1, lease=1.0)
    wait_until(lambda: (r := tasks.get(stalled.id)) and r.progress, what="the stalled job to start")
    assert tasks.get(behind.id).state == JobState.queued
    assert _counts(dq, tasks, "default")[0] == 0, "the next job is not held by the worker"
    # When that worker is SIGKILLed and another starts
    dq.kill(first)
    second = dq.start_worker(concurrency=1, lease=1.0)
    # Then the broker gives the prefetched message back (RabbitMQ at once; Redis once the dead worker misses its
    # heartbeats) and it runs; the stalled job runs again as its second attempt
    assert behind.result(30) == "behind", second.tail()
    rec = stalled.wait(30)
    assert (rec.state, rec.attempts, rec.result["pid"]) == (JobState.succeeded, 2, second.pid)


def test_a_stopped_worker_finishes_its_job_and_a_second_signal_gives_it_back(dq: DramatiqEngine,
                                                                             tmp_path: Path) -> None:
    # Given a worker with a long lease (30 s), running a job that waits for a file
    tasks = dq.make(workers=0)
    t = register(tasks)
    release = tmp_path / "release"
    first = dq.start_worker(lease=30.0)
    job = t.progress_then_wait.defer(str(release))
    wait_until(lambda: (r := tasks.get(job.id)) and r.progress, what="the job to start")
    # When it gets SIGTERM, Then it takes nothing new but lets the running job finish (grace: 2 s), and exits
    os.kill(first.pid, signal.SIGTERM)
    wait_until(lambda: "no new jobs" in first.tail(), what="the worker to take the signal")
    time.sleep(0.3)
    late = t.echo.defer("after the stop")
    time.sleep(0.3)
    release.touch()
    assert first.popen.wait(15) == 0, first.tail()
    assert (job.wait(5).state, tasks.get(late.id).state) == (JobState.succeeded, JobState.queued)
    # Given another worker running a job that stalls
    second = dq.start_worker(lease=30.0)
    assert late.result(20) == "after the stop"
    stalled = t.stall_first.defer()
    wait_until(lambda: (r := tasks.get(stalled.id)) and r.progress, what="the stalled job to start")
    # When it gets SIGTERM twice, Then it exits at once and the job goes back, long before its lease would end
    t0 = time.monotonic()
    os.kill(second.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(second.pid, signal.SIGTERM)
    assert second.popen.wait(15) == 0, second.tail()
    third = dq.start_worker(lease=30.0)
    rec = stalled.wait(20)
    assert (rec.state, rec.attempts, rec.result["pid"]) == (JobState.succeeded, 2, third.pid), third.tail()
    assert time.monotonic() - t0 < 15


# -- the broker goes away ----------------------------------------------------------------------------------------------
@pytest.fixture(params=["redis", "rabbitmq"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[DramatiqEngine, Any]]:
    """The Dramatiq engine on a broker the test can take away: a private redis-server (broker and status store, the
    default setup), or the test RabbitMQ behind a relay (the status store in the test Redis)."""
    if request.param == "redis":
        if shutil.which("redis-server") is None:
            if CI: pytest.fail("redis-server is required under CI")
            pytest.skip("redis-server is not installed")
        server: Any = RedisServer(tmp_path)
        server.start()
        cls = type("PrivateRedis", (DramatiqEngine,), {"name": "dramatiq-redis", "broker": server.url,
                                                        "status": server.url})
    else:
        from urllib.parse import urlsplit
        u = urlsplit(amqp_url())
        server = Proxy((u.hostname or "127.0.0.1", u.port or 5672))
        server.start()
        broker = amqp_url().replace(f"{u.hostname}:{u.port or 5672}", f"127.0.0.1:{server.port}", 1)
        if u.port is None: broker = amqp_url().replace(str(u.hostname), f"127.0.0.1:{server.port}", 1)
        cls = type("RelayedRabbitMQ", (DramatiqEngine,), {"name": "dramatiq-rabbitmq", "broker": broker,
                                                           "status": redis_url()})
    try:
        for e in _engine(cls, tmp_path): yield e, server
    finally: server.stop()


def test_requests_succeed_while_the_broker_is_down_and_their_jobs_run_after(outage: tuple[DramatiqEngine, Any],
                                                                          tmp_path: Path) -> None:
    dq, server = outage
    # Given an app and a worker process with one thread (it runs jobs in the order they were published), working
    app, rt, tasks, t = site(dq, workers=0)
    log = str(tmp_path / "ran")

    @rt("/go/{n}")
    def go(n: int):
        job = t.append.defer(log, f"job {n}")
        return P(job.id, id="job"), job

    worker = dq.start_worker(concurrency=1)
    with TestClient(app) as client:
        (first,) = _job_ids(client.get("/go/0").text)
        _done(tasks, [first])
        # When the broker goes away
        server.stop()
        # Then requests still answer at once, each with its job stored (in the outbox) and shown as queued
        ids, slowest = [], 0.0
        for n in range(1, 4):
            t0 = time.perf_counter()
            r = client.get(f"/go/{n}")
            slowest = max(slowest, time.perf_counter() - t0)
            assert r.status_code == 200
            ids += _job_ids(r.text)
        assert len(ids) == 3 and slowest < 1.0, slowest
        assert [tasks.get(i).state for i in ids] == [JobState.queued] * 3
        assert lines(log) == ["job 0"]
        # And when the broker is back, the jobs run, in order, each once
        server.start()
        try: recs = _done(tasks, ids, 60)
        except AssertionError as e:
            ob = tasks.engine.outbox
            raise AssertionError(f"{e}\noutbox: {ob.pending_jobs()} {ob.last_error}\nworker:\n{worker.tail(40)}") \
                from None
    assert [r.state for r in recs] == [JobState.succeeded] * 3, worker.tail()
    assert lines(log) == ["job 0", "job 1", "job 2", "job 3"]
    assert worker.alive(), worker.tail()
    assert tasks.engine.outbox.pending_jobs() == []


def test_a_job_delivered_while_the_status_store_is_down_runs_once_it_is_back(tmp_path: Path) -> None:
    # Given RabbitMQ, and the status store on a private redis-server that keeps nothing on disk
    if shutil.which("redis-server") is None:
        if CI: pytest.fail("redis-server is required under CI")
        pytest.skip("redis-server is not installed")
    status = RedisServer(tmp_path)
    status.start()
    cls = type("PrivateStatus", (DramatiqEngine,), {"name": "dramatiq-rabbitmq", "broker": amqp_url(),
                                                     "status": status.url})
    try:
        for dq in _engine(cls, tmp_path): _status_outage(dq, status)
    finally: status.stop()


def _status_outage(dq: DramatiqEngine, status: RedisServer) -> None:
    tasks = dq.make(workers=0)
    t = register(tasks)
    job = t.echo.defer({"survives": True})
    # When Redis goes away (and comes back empty) while the job's message waits, and a worker takes it meanwhile
    status.stop()
    worker = dq.start_worker()
    wait_until(lambda: "waits in this worker's outbox" in worker.tail(50), 30, "the worker to keep the job")
    status.start()
    # Then the worker's outbox brings the job back (its record made again from the message) and it runs
    rec = wait_until(lambda: (r := tasks.get(job.id)) and r.done and r, 30, "the job to finish")
    assert (rec.state, rec.result, rec.attempts) == (JobState.succeeded, {"survives": True}, 1), worker.tail()


# -- configuration -----------------------------------------------------------------------------------------------------
def test_configuration_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dramatiq
    from dramatiq.middleware import Retries

    from fh_tasks.engines.dramatiq import DramatiqEngine as Dramatiq
    settings = EngineSettings(broker="redis://127.0.0.1:6379/15", db=str(tmp_path / "o.db"))
    # Named by a string, the engine is made on its own Redis broker (nothing connects yet), the status store beside it
    from dramatiq.brokers.redis import RedisBroker
    hub = Tasks(engine="dramatiq", broker=settings.broker, db=settings.db)
    try:
        assert isinstance(hub.engine, Dramatiq) and isinstance(hub.engine.broker, RedisBroker)
        assert hub.engine.status_url == settings.broker and hub.engine.namespace == "fh"
        assert hub.engine.queue_name("default") == "fh.default"
    finally: hub.close()
    # A broker URL that is neither Redis nor AMQP
    with pytest.raises(ValueError, match="redis:// or amqp://"):
        Dramatiq(EngineSettings(broker="kafka://127.0.0.1:9092", status=settings.broker, db=settings.db))
    # Dramatiq's retries next to ours
    with pytest.raises(ValueError, match="Retries middleware"):
        Dramatiq(settings, middleware=[Retries()])
    # A queue Dramatiq cannot name, at registration
    tasks = Tasks(engine=Dramatiq(settings, namespace="tcfg"), workers=0)
    try:
        with pytest.raises(ValueError, match="Dramatiq queue name"):
            tasks.task(name="cfg.bad", queue="two words")(lambda: None)
            tasks.engine.sync_tasks()
    finally: tasks.close()
    # Pickled messages
    monkeypatch.setattr(dramatiq.message, "global_encoder", dramatiq.PickleEncoder())
    with pytest.raises(FhTasksError, match="JSONEncoder"):
        Dramatiq(settings)


def test_dramatiq_missing_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a Python where dramatiq cannot be imported
    for name in [m for m in sys.modules if m == "dramatiq" or m.startswith("dramatiq.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "fh_tasks.engines.dramatiq", raising=False)
    monkeypatch.setitem(sys.modules, "dramatiq", None)
    # When a hub asks for the engine, Then the error names the extra to install
    with pytest.raises(FhTasksError, match=re.escape("pip install 'fh-tasks[dramatiq]'")):
        Tasks(engine="dramatiq", broker="redis://127.0.0.1:6379/15", db=str(tmp_path / "o.db"))
