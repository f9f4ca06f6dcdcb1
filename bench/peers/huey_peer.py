"""huey: SqliteHuey (one SQLite file, huey's defaults) and RedisHuey (blocking pop), consumer with its default 1 thread.

The consumer imports `bench.peers.huey_peer.huey`, built from BENCH_HUEY_KIND / BENCH_HUEY_TARGET.
"""
from __future__ import annotations

import os
from typing import Any

from huey import Huey, RedisHuey, SqliteHuey

from ..common import PY
from ..io_job import roundtrip
from ..probe import record
from . import Peer


def make_huey(kind: str, target: str) -> tuple[Huey, Any, Any]:
    "A huey on `target` (a file for sqlite, a URL for redis), its no-op task and its one-Redis-round-trip task."
    h: Huey = SqliteHuey("bench", filename=target) if kind == "sqlite" else RedisHuey("bench", url=target)

    @h.task(name="noop")
    def noop(arg: dict[str, Any]) -> None:
        record(arg)

    @h.task(name="io")
    def io(arg: dict[str, Any]) -> None:
        roundtrip(arg)

    return h, noop, io


# What the consumer (and the request benchmark's app) use; the harness builds its own per repetition.
huey, noop, io = (make_huey(os.environ["BENCH_HUEY_KIND"], os.environ["BENCH_HUEY_TARGET"])
                  if os.environ.get("BENCH_HUEY_KIND") else (None, None, None))


class HueySqlite(Peer):
    key = label = "huey-sqlite"
    kind = "sqlite"
    concurrency = "`huey_consumer -k thread -w 1` (huey's default: one worker thread); 2 processes: `-k process -w 2`"

    def target(self) -> str:
        return str(self.dir / f"huey-{self.rep}.db")

    def reset(self) -> None:
        self.close()
        self.rep += 1
        self.h, noop, io = make_huey(self.kind, self.target())
        self.task = io if self.io else noop
        self.h.flush()

    def put(self, arg: dict[str, Any]) -> None:
        self.task(arg)

    def worker_env(self) -> dict[str, str]:
        return {"BENCH_HUEY_KIND": self.kind, "BENCH_HUEY_TARGET": self.target()}

    def worker_commands(self, procs: int) -> list[list[str]]:
        kind = ["-k", "thread", "-w", "1"] if procs == 1 else ["-k", "process", "-w", str(procs)]
        return [[PY, "-m", "huey.bin.huey_consumer", "bench.peers.huey_peer.huey", *kind, "-q"]]

    def close(self) -> None:
        h = getattr(self, "h", None)
        if h is not None and self.kind == "sqlite": h.storage.close()
        self.h = None


class HueyRedis(HueySqlite):
    key = label = "huey-redis"
    kind = "redis"
    db = 9

    def target(self) -> str:
        return f"{self.env.redis}/{self.db}"

    def close(self) -> None:
        h = getattr(self, "h", None)
        if h is not None: h.storage.conn.close()
        self.h = None


PEERS = {"huey-sqlite": HueySqlite, "huey-redis": HueyRedis}
