"""The Dramatiq engine under the contract suite, on Redis and on RabbitMQ (imported by engines_support; it adds its
engines to `ENGINES`).

Each test gets a namespace of its own (status store keys and Dramatiq queue names `<namespace>.<queue>`), on Redis
database `TEST_DB`, and deletes them at the end. Worker processes are `python -m fh_tasks worker contract_worker:tasks`
(a `dramatiq.Worker` with 4 threads), each in a working directory of its own: they share only the broker and the
status store with the test. A hub made with workers (the default, as `site()` does) starts one, standing in for the
app's in-process workers (broker engines run none).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engines_support import DB_ENV, ENGINE_ENV, ENGINES, WORKER_PATH, WORKER_TARGET, Engine, Unavailable, WorkerProcess

from fh_tasks import Tasks
from fh_tasks.engine import EngineSettings

#: The Redis database of the Dramatiq tests (the benchmarks use 9-13, the Celery tests 14).
TEST_DB = 15
NS_ENV, BROKER_ENV, STATUS_ENV = "FH_TASKS_CONTRACT_NS", "FH_TASKS_CONTRACT_BROKER", "FH_TASKS_CONTRACT_STATUS"
#: Dramatiq/Redis takes a worker for dead after 2 s without heartbeats and checks on every command (tests only: the
#: check runs KEYS). Our lease brings a lost job back by itself; this returns its prefetched messages sooner.
OPTIONS: dict[str, Any] = {"heartbeat_timeout": 2.0, "maintenance_chance": 1.0}


def redis_url(db: int = TEST_DB) -> str:
    "The test Redis (FH_TASKS_REDIS_URL, else 127.0.0.1:6379) with database `db`."
    u = urlsplit(os.environ.get("FH_TASKS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    return f"{u.scheme}://{u.netloc}/{db}"


def amqp_url() -> str:
    "The test RabbitMQ (FH_TASKS_AMQP_URL, else guest:guest@127.0.0.1:5672, vhost /)."
    return os.environ.get("FH_TASKS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def answers(url: str) -> str | None:
    "None when the server at `url` accepts a connection (and Redis answers PING), else why not."
    u = urlsplit(url)
    port = u.port or (6379 if u.scheme.startswith("redis") else 5672)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", port), 1) as s:
            if u.scheme.startswith("redis"):
                s.sendall(b"PING\r\n")
                if not s.recv(16).startswith(b"+PONG"): return f"{url}: no PONG"
    except OSError as e:
        return f"nothing answers at {u.hostname}:{port} ({e})"
    return None


def dramatiq_engine(settings: EngineSettings, namespace: str, **kw: Any) -> Any:
    "A `DramatiqEngine` with the tests' broker options."
    from fh_tasks.engines.dramatiq import DramatiqEngine
    return DramatiqEngine(settings, namespace=namespace, **{**OPTIONS, **kw})


class DramatiqEngine(Engine):
    "The Dramatiq engine on one broker; the status store on the test Redis."

    name = ""
    broker = ""
    #: The status store (the test Redis unless a test says otherwise).
    status = ""

    def __init__(self, dir: Path) -> None:
        self.status = self.status or redis_url()
        if importlib.util.find_spec("dramatiq") is None:
            raise Unavailable(f"the {self.name} engine needs dramatiq: pip install -e '.[dev]'")
        for url in {self.broker, self.status}:
            if (why := answers(url)) is not None: raise Unavailable(f"{self.name}: {why}")
        super().__init__(dir)
        self.namespace = f"t{uuid.uuid4().hex[:12]}"
        self.app_worker: WorkerProcess | None = None

    def settings(self, db: str, **kw: Any) -> EngineSettings:
        return EngineSettings(db=db, broker=self.broker, status=self.status, **kw)

    def make(self, app: Any = None, **kw: Any) -> Tasks:
        workers = kw.pop("workers", 1)
        s = self.settings(str(self.dir / "outbox.db"), grace=kw.pop("grace", 2.0), workers=0)
        hub = Tasks(app, engine=dramatiq_engine(s, self.namespace), workers=0, **kw)
        self.hubs.append(hub)
        if workers and self.app_worker is None: self.app_worker = self.start_worker()
        return hub

    def start_worker(self, *, lease: float = 1.0, concurrency: int = 4, target: str = WORKER_TARGET,
                     command: list[str] | None = None) -> WorkerProcess:
        """`fh-tasks worker target` (or `command`, e.g. Dramatiq's own CLI), in a directory of its own, in a session
        of its own (`kill` ends its children too)."""
        n = len(self.workers)
        cwd = self.dir / f"worker-{n}"  # its own directory: the outbox file there is its own
        cwd.mkdir(exist_ok=True)
        log = self.dir / f"worker-{n}.log"
        env = {**os.environ, "PYTHONPATH": WORKER_PATH, "PYTHONUNBUFFERED": "1",
               ENGINE_ENV: self.name, DB_ENV: str(cwd / "outbox.db"), NS_ENV: self.namespace,
               BROKER_ENV: self.broker, STATUS_ENV: self.status}
        with open(log, "ab") as out:
            argv = command or [sys.executable, "-m", "fh_tasks", "worker", target, "--lease", str(lease),
                               "--concurrency", str(concurrency), "--grace", "2", "--log-level", "info"]
            p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        w = WorkerProcess(p, log)
        self.workers.append(w)
        return w

    def kill(self, worker: WorkerProcess) -> int:
        "SIGKILL the worker process and whatever it started."
        if worker.alive():
            with contextlib.suppress(ProcessLookupError): os.killpg(worker.popen.pid, signal.SIGKILL)
        return worker.popen.wait(10)

    @staticmethod
    def worker_hub() -> Tasks:
        s = EngineSettings(db=os.environ[DB_ENV], broker=os.environ[BROKER_ENV], status=os.environ[STATUS_ENV],
                           workers=0)
        return Tasks(engine=dramatiq_engine(s, os.environ[NS_ENV]), workers=0)

    def close(self) -> None:
        for w in self.workers:
            if w.alive(): self.kill(w)
        queues = {q for h in self.hubs for q in h.all_queues()}
        for h in self.hubs: h.close()
        with contextlib.suppress(Exception): cleanup(self.namespace, self.broker, self.status, queues)


def cleanup(namespace: str, broker: str, status: str, queues: set[str]) -> None:
    "Delete what a test left in the status store and the broker under `namespace`."
    import redis
    for url in {u for u in (broker, status) if u.startswith("redis")}:
        r = redis.Redis.from_url(url)
        try:
            for pattern in (f"{{{namespace}}}:*", f"dramatiq:{namespace}.*", f"dramatiq:__acks__.*.{namespace}.*"):
                for k in r.scan_iter(match=pattern, count=1000): r.unlink(k)
        finally: r.close()
    if broker.startswith("amqp"):
        import pika
        conn = pika.BlockingConnection(pika.URLParameters(broker))
        try:
            ch = conn.channel()
            for q in queues | {"default"}:
                for name in (f"{namespace}.{q}", f"{namespace}.{q}.DQ", f"{namespace}.{q}.XQ"): ch.queue_delete(name)
        finally: conn.close()


class DramatiqRedis(DramatiqEngine):
    name, broker = "dramatiq-redis", redis_url()


class DramatiqRabbitMQ(DramatiqEngine):
    name, broker = "dramatiq-rabbitmq", amqp_url()


ENGINES.update({DramatiqRedis.name: DramatiqRedis, DramatiqRabbitMQ.name: DramatiqRabbitMQ})
