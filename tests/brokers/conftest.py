"""Fixtures of the broker engines' own tests: a status store in a namespace of its own, a private redis-server
that a test may stop and start again, and Celery worker processes serving `celery_app`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Proxy, RedisServer
from support import CI, ROOT

from fh_tasks.engines.status import StatusStore

HERE = Path(__file__).resolve().parent
#: The Redis database of these tests, as of the Celery contract tests (the benchmarks flush 6-13); each test has a
#: namespace of its own in it.
TEST_DB = 14


def _base(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0]


@pytest.fixture
def test_redis(redis_url: str) -> str:
    "The shared test Redis, database `TEST_DB` (each test uses a namespace of its own)."
    return f"{_base(redis_url)}/{TEST_DB}"


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def status(test_redis: str, namespace: str) -> Iterator[StatusStore]:
    s = StatusStore(test_redis, namespace=namespace, engine="test", retention=3600.0)
    try: yield s
    finally:
        s.clear()
        s.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    d = tmp_path / "redis"
    d.mkdir()
    server = RedisServer(d)
    server.start()
    try: yield server
    finally: server.stop()


class Worker:
    "A worker process serving `celery_app` (tests/brokers), started in a directory of its own."

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.log = cwd / "worker.log"
        e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), str(ROOT / "tests")]),
             "PYTHONUNBUFFERED": "1", **env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=e, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            try: os.killpg(self.proc.pid, 9)
            except ProcessLookupError: pass
        self.proc.wait(10)

    def stop(self) -> int:
        "SIGTERM (Celery's warm shutdown); SIGKILL after 15 s."
        if self.proc.poll() is None:
            self.proc.terminate()
            try: return self.proc.wait(15)
            except subprocess.TimeoutExpired: self.kill()
        return self.proc.wait(10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[object]:
    "start_worker(env, *, celery_cli=False, concurrency=2, lease=1.0, pool=...): a worker serving brokers/celery_app."
    made: list[Worker] = []

    def start(env: dict[str, str], *, celery_cli: bool = False, concurrency: int = 2, lease: float = 1.0,
              pool: str = "prefork") -> Worker:
        cwd = tmp_path / f"worker-{len(made)}"
        if celery_cli:
            argv = [sys.executable, "-m", "celery", "-A", "celery_app:celery_app", "worker", "-P", pool, "-c",
                    str(concurrency), "-l", "INFO", "-n", f"w{len(made)}-{uuid.uuid4().hex[:6]}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat"]
        else:
            argv = [sys.executable, "-m", "fh_tasks", "worker", "celery_app:tasks", "--concurrency", str(concurrency),
                    "--lease", str(lease), "--log-level", "info"]
        w = Worker(argv, cwd, env)
        made.append(w)
        return w

    yield start
    for w in made: w.kill()


class Outage:
    "A broker the test can take away: `url` for the app, `worker_url` for worker processes, `stop()`, `start()`."

    def __init__(self, url: str, worker_url: str, status: str, server: RedisServer | Proxy) -> None:
        self.url, self.worker_url, self.status, self.server = url, worker_url, status, server

    def stop(self) -> None: self.server.stop()

    def start(self) -> None: self.server.start()


@pytest.fixture(params=["redis", "rabbitmq"])
def outage(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[Outage]:
    """A private redis-server as broker and status store (it forgets everything when stopped), or the test RabbitMQ
    behind a relay (the status store in the test Redis)."""
    if request.param == "redis":
        d = tmp_path / "redis"
        d.mkdir()
        server: RedisServer | Proxy = RedisServer(d)
        server.start()
        out = Outage(server.url, server.url, server.url, server)
    else:
        from urllib.parse import urlsplit
        amqp = os.environ.get("FH_TASKS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
        u = urlsplit(amqp)
        try: socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), 1).close()
        except OSError as e:
            if CI: raise RuntimeError(f"RabbitMQ is required under CI and does not answer at {amqp}: {e}") from e
            pytest.skip(f"no RabbitMQ at {amqp}")
        server = Proxy((u.hostname or "127.0.0.1", u.port or 5672))
        server.start()
        creds = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
        out = Outage(f"{u.scheme}://{creds}127.0.0.1:{server.port}{u.path}", amqp, f"{_base(redis_url)}/{TEST_DB}",
                     server)
    try: yield out
    finally: server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The dashboard's hostile-text test names a queue after its hostile HTML, which Dramatiq refuses by design
    (queue names are letters, digits and '._-'): it runs on Celery only, deselected on Dramatiq instead of skipped."""
    gone = [i for i in items if "hostile_text" in i.name and "[dramatiq" in i.name]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [i for i in items if i not in gone]

