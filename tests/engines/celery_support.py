"""The Celery engine under the contract suite, on Redis and on RabbitMQ (imported by engines_support; it adds
its engines to `ENGINES`).

Each test gets a namespace of its own (status store keys, Celery queues and, on Redis, Kombu's keys), on Redis
database `TEST_DB`, and deletes it at the end. Worker processes are `python -m fh_tasks worker contract_worker:tasks`
(Celery's own prefork worker, one pool child), each in a working directory of its own: they share only the broker
and the status store with the test. A hub made with workers (the default, as `site()` does) starts one.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engines_support import DB_ENV, ENGINE_ENV, ENGINES, WORKER_PATH, WORKER_TARGET, Engine, Unavailable, WorkerProcess

from fh_tasks import Tasks
from fh_tasks.engine import EngineSettings

#: The Redis database of the Celery tests (the benchmarks flush 6-13); each test has its own namespace in it.
TEST_DB = 14
NS_ENV, BROKER_ENV, STATUS_ENV = "FH_TASKS_CONTRACT_NS", "FH_TASKS_CONTRACT_BROKER", "FH_TASKS_CONTRACT_STATUS"


def redis_url(db: int = TEST_DB) -> str:
    "The test Redis (FH_TASKS_REDIS_URL, else 127.0.0.1:6379) with database `db`."
    u = urlsplit(os.environ.get("FH_TASKS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    return f"{u.scheme}://{u.netloc}/{db}"


def amqp_url() -> str:
    "The test RabbitMQ (FH_TASKS_AMQP_URL, else guest:guest@127.0.0.1:5672)."
    return os.environ.get("FH_TASKS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


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


def child_pids(pid: int) -> list[int]:
    "The children of process `pid` (Linux)."
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try: out += [int(p) for p in (task / "children").read_text().split()]
        except OSError: pass
    return out


class CeleryWorkerProcess(WorkerProcess):
    "`fh-tasks worker` on the Celery engine: the jobs run in its pool child, whose pid is `pid`."

    @property
    def pid(self) -> int:
        deadline = time.monotonic() + 10
        while not (kids := child_pids(self.popen.pid)) and time.monotonic() < deadline and self.alive():
            time.sleep(0.02)
        return kids[0] if kids else self.popen.pid


class CeleryEngine(Engine):
    "The Celery engine on one broker; the status store on the test Redis."

    name = ""
    broker = ""

    def __init__(self, dir: Path) -> None:
        for url in {self.broker, redis_url()}:
            if (why := answers(url)) is not None: raise Unavailable(f"the {self.name} engine needs {why}")
        super().__init__(dir)
        self.namespace = f"t{uuid.uuid4().hex[:12]}"
        self.app_worker: WorkerProcess | None = None

    def settings(self, db: str, **kw: Any) -> EngineSettings:
        return EngineSettings(db=db, broker=self.broker, status=redis_url(), **kw)

    def make(self, app: Any = None, **kw: Any) -> Tasks:
        from fh_tasks.engines.celery import CeleryEngine as Celery
        workers = kw.pop("workers", 1)
        s = self.settings(str(self.dir / "outbox.db"), grace=kw.pop("grace", 2.0), workers=0)
        hub = Tasks(app, engine=Celery(s, namespace=self.namespace), workers=0, **kw)
        self.hubs.append(hub)
        if workers and self.app_worker is None: self.app_worker = self.start_worker(concurrency=2)
        return hub

    def start_worker(self, *, lease: float | None = None, concurrency: int = 4) -> WorkerProcess:  # type: ignore[override]
        """A prefork worker. Given a lease (as the kill tests do), it has one pool child, so that `pid` names the
        process that runs the jobs."""
        if lease is not None: concurrency = 1
        lease = 1.0 if lease is None else lease
        n = len(self.workers)
        cwd = self.dir / f"worker-{n}"
        cwd.mkdir(exist_ok=True)
        log = self.dir / f"worker-{n}.log"
        env = {**os.environ, "PYTHONPATH": WORKER_PATH, "PYTHONUNBUFFERED": "1",
               ENGINE_ENV: self.name, DB_ENV: str(cwd / "outbox.db"), NS_ENV: self.namespace,
               BROKER_ENV: self.broker, STATUS_ENV: redis_url()}
        with open(log, "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", "fh_tasks", "worker", WORKER_TARGET, "--lease", str(lease),
                                  "--concurrency", str(concurrency), "--log-level", "info"],
                                 cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        w = CeleryWorkerProcess(p, log)
        self.workers.append(w)
        return w

    def kill(self, worker: WorkerProcess) -> int:
        "SIGKILL the worker's main process and its pool children."
        if worker.alive():
            try: os.killpg(worker.popen.pid, signal.SIGKILL)
            except ProcessLookupError: pass
        return worker.popen.wait(10)

    @staticmethod
    def worker_hub() -> Tasks:
        from fh_tasks.engines.celery import CeleryEngine as Celery
        s = EngineSettings(db=os.environ[DB_ENV], broker=os.environ[BROKER_ENV], status=os.environ[STATUS_ENV],
                           workers=0)
        return Tasks(engine=Celery(s, namespace=os.environ[NS_ENV]), workers=0)

    def close(self) -> None:
        for w in self.workers:
            if w.alive(): self.kill(w)
        for h in self.hubs: h.close()
        if self.hubs: cleanup(self.hubs[0].engine)


class CeleryRedis(CeleryEngine):
    name, broker = "celery-redis", redis_url()


class CeleryRabbitMQ(CeleryEngine):
    name, broker = "celery-rabbitmq", amqp_url()


def cleanup(engine: Any) -> None:
    "Delete what a test's namespace left: its status store keys, its Kombu keys (Redis) or queues (RabbitMQ)."
    import redis
    engine.status.clear()
    if engine.broker_url.startswith("redis"):
        r = redis.Redis.from_url(engine.broker_url)
        for k in r.scan_iter(match=f"{engine.namespace}:*", count=1000): r.unlink(k)
        r.close()
        return
    with engine.celery.connection_for_write() as conn:
        for q in {engine.queue_name(q) for q in engine.hub.all_queues()}:
            for delete in ("queue_delete", "exchange_delete"):  # Celery's exchange is named as its queue
                try: getattr(conn.channel(), delete)(q)
                except Exception: pass


ENGINES.update({"celery-redis": CeleryRedis, "celery-rabbitmq": CeleryRabbitMQ})
