"""Dramatiq with the Redis broker: `dramatiq -p 1 -t 8` (its default 8 threads per process)."""
from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from ..common import PY, flush_redis
from ..io_job import roundtrip
from ..probe import record
from . import Peer, job_arg

DB = 11
URL = f"{os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}/{DB}"

broker = RedisBroker(url=URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def noop(arg: dict[str, Any]) -> None:
    record(arg)


@dramatiq.actor(queue_name="bench", max_retries=0)
def io(arg: dict[str, Any]) -> None:
    roundtrip(arg)


class DramatiqPeer(Peer):
    key = label = "dramatiq"
    concurrency = "`dramatiq -p 1 -t 8` (default 8 threads; 2 processes: `-p 2`)"
    batch_api = "`dramatiq.group([...]).run()` (one message per job)"

    def reset(self) -> None:
        self.rep += 1
        flush_redis(URL)

    def put(self, arg: dict[str, Any]) -> None:
        (io if self.io else noop).send(arg)

    def put_batches(self, n: int, size: int) -> bool:
        for start in range(0, n, size):
            dramatiq.group([(io if self.io else noop).message(job_arg()) for _ in range(min(size, n - start))]).run()
        return True

    def worker_commands(self, procs: int) -> list[list[str]]:
        return [[PY, "-m", "dramatiq", "bench.peers.dramatiq_peer", "-p", str(procs), "-t", "8", "-Q", "bench"]]

    def close(self) -> None:
        broker.client.connection_pool.disconnect()


PEERS = {"dramatiq": DramatiqPeer}
