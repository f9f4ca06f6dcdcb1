"""Celery with the Redis broker (no result backend), prefork pool: 1 child for one process, 2 for two."""
from __future__ import annotations

import os
from typing import Any

from celery import Celery, group

from ..common import PY, flush_redis
from ..io_job import roundtrip
from ..probe import record
from . import Peer

DB = 10
BROKER = f"{os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}/{DB}"

def plain_app(name: str, url: str, *, current: bool = False, backend: str | None = None,
              **conf: Any) -> tuple[Celery, Any, Any]:
    """Plain Celery on broker `url` (results in `backend`, if given) with the benchmark's two tasks: (app, the no-op
    task, the task making one Redis round trip). `current`: Celery's current app. `conf`: more of Celery's settings."""
    app = Celery(name, broker=url, backend=backend, set_as_current=current)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                    task_default_queue="bench", **conf)

    @app.task(name="noop")
    def noop(arg: dict[str, Any]) -> None:
        record(arg)

    @app.task(name="io")
    def io(arg: dict[str, Any]) -> None:
        roundtrip(arg)

    return app, noop, io


#: Celery's defaults: early acks, prefetch ×4, no result backend.
app, noop, io = plain_app("bench", BROKER, current=True)


class CeleryPeer(Peer):
    key = label = "celery"
    concurrency = "`celery worker -P prefork -c 1` (one pool child; 2 processes: `-c 2`), default prefetch ×4"
    batch_api = "`group(noop.s(...) ...).apply_async()` (one producer, one message per job)"

    #: Its broker (flushed before each repetition), its app as `celery -A` names it, its (no-op, round-trip) tasks.
    url, app, tasks = BROKER, "bench.peers.celery_peer:app", (noop, io)

    def reset(self) -> None:
        self.rep += 1
        flush_redis(self.url)

    def task(self) -> Any:
        "The Celery task `put` sends: the no-op job, or (`io`) the one with a Redis round trip."
        return self.tasks[1] if self.io else self.tasks[0]

    def put(self, arg: dict[str, Any]) -> None:
        self.task().delay(arg)

    def put_batches(self, n: int, size: int) -> bool:
        from . import job_arg
        task = self.task()
        for start in range(0, n, size):
            group(task.s(job_arg()) for _ in range(min(size, n - start))).apply_async()
        return True

    def worker_commands(self, procs: int) -> list[list[str]]:
        return [[PY, "-m", "celery", "-A", self.app, "worker", "-P", "prefork", "-c", str(procs), "-l", "WARNING",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"]]

    def host_commands(self, hosts: int) -> list[list[str]]:
        "One worker per host as `worker_commands(1)`, each with a node name of its own (`-n`), as on separate hosts."
        return [[*self.worker_commands(1)[0], "-n", f"bench{i}@%h"] for i in range(hosts)]


PEERS = {"celery": CeleryPeer}
