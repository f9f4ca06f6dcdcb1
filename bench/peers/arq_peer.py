"""arq: one asyncio worker per process with its default `max_jobs=10` and `poll_delay=0.5`."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

from ..common import PY, flush_redis
from ..io_job import aroundtrip
from ..probe import record
from . import Peer, job_arg

DB = 13
URL = f"{os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}/{DB}"
ARQ = str(Path(PY).parent / "arq")


async def noop(ctx: dict[str, Any], arg: dict[str, Any]) -> None:
    record(arg)


async def io(ctx: dict[str, Any], arg: dict[str, Any]) -> None:
    await aroundtrip(arg)


class WorkerSettings:
    "What `arq bench.peers.arq_peer.WorkerSettings` runs."
    functions = [noop, io]
    redis_settings = RedisSettings.from_dsn(URL)


class ArqPeer(Peer):
    key = label = "arq"
    concurrency = ("`arq WorkerSettings` (one asyncio worker, default max_jobs=10, poll_delay=0.5 s); "
                   "2 processes: two workers")

    def reset(self) -> None:
        self.close()
        self.rep += 1
        flush_redis(URL)
        self.loop = asyncio.new_event_loop()
        self.pool: ArqRedis = self.loop.run_until_complete(create_pool(WorkerSettings.redis_settings))

    def put(self, arg: dict[str, Any]) -> None:
        self.loop.run_until_complete(self.pool.enqueue_job("io" if self.io else "noop", arg))

    def put_many(self, n: int) -> None:
        async def go() -> None:
            for _ in range(n): await self.pool.enqueue_job("io" if self.io else "noop", job_arg())
        self.loop.run_until_complete(go())

    def worker_commands(self, procs: int) -> list[list[str]]:
        return [[ARQ, "bench.peers.arq_peer.WorkerSettings"] for _ in range(procs)]

    def close(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.run_until_complete(self.pool.aclose())
            loop.close()
        self.loop = None


PEERS = {"arq": ArqPeer}
