"""RQ: `rq worker` (forks a work-horse per job, its default) and `rq worker -w rq.worker.SimpleWorker` (in-process)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue

from ..common import PY, flush_redis
from ..io_job import roundtrip
from ..probe import record
from . import Peer, job_arg

DB = 12
URL = f"{os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}/{DB}"
RQ = str(Path(PY).parent / "rq")


def noop(arg: dict[str, Any]) -> None:
    record(arg)


def io(arg: dict[str, Any]) -> None:
    roundtrip(arg)


class RqPeer(Peer):
    key = label = "rq"
    concurrency = ("`rq worker` (default `Worker`: one job at a time, forks a work-horse per job); "
                   "2 processes: two workers")
    batch_api = "`Queue.enqueue_many([...])` (one Redis pipeline per batch)"
    worker_class: str | None = None
    measures = frozenset({"enqueue", "drain", "pickup"})  # a fork per job: the load scenario would outlast its budget

    def reset(self) -> None:
        self.close()
        self.rep += 1
        flush_redis(URL)
        self.conn = Redis.from_url(URL)
        self.q = Queue("bench", connection=self.conn)

    def put(self, arg: dict[str, Any]) -> None:
        self.q.enqueue(io if self.io else noop, arg)

    def put_batches(self, n: int, size: int) -> bool:
        for start in range(0, n, size):
            self.q.enqueue_many([Queue.prepare_data(noop, (job_arg(),)) for _ in range(min(size, n - start))])
        return True

    def worker_commands(self, procs: int) -> list[list[str]]:
        cls = ["-w", self.worker_class] if self.worker_class else []
        return [[RQ, "worker", "-u", URL, "-q", *cls, "bench"] for _ in range(procs)]

    def close(self) -> None:
        c = getattr(self, "conn", None)
        if c is not None: c.close()
        self.conn = None


class RqSimplePeer(RqPeer):
    key = label = "rq-simple"
    concurrency = "`rq worker -w rq.worker.SimpleWorker` (one job at a time, no fork); 2 processes: two workers"
    worker_class = "rq.worker.SimpleWorker"
    measures = frozenset({"enqueue", "drain", "pickup", "load"})


PEERS = {"rq": RqPeer, "rq-simple": RqSimplePeer}
