"""The load scenario's job body: one Redis round trip (INCR on a counter in DB 14), then the probe's record. An
argument with `sleep` (seconds) also sleeps that long first: the long jobs of the mixed measure (`bench/mixed.py`).

Sync bodies share one `redis.Redis` per process (a thread-safe pool); async bodies one `redis.asyncio.Redis` per
event loop. The counter is never read back: the round trip is the point.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from .probe import record

__all__ = ["roundtrip", "aroundtrip", "URL"]

DB = 14
URL = f"{os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}/{DB}"
_sync: tuple[int, Any] | None = None
_async: dict[int, Any] = {}
_lock = threading.Lock()


def _client() -> Any:
    global _sync
    if _sync is None or _sync[0] != os.getpid():
        with _lock:
            if _sync is None or _sync[0] != os.getpid():
                import redis
                _sync = (os.getpid(), redis.Redis.from_url(URL))
    return _sync[1]


def roundtrip(arg: dict[str, Any]) -> None:
    "A sync job: one Redis command (after `arg['sleep']` seconds, if given), then record (enqueued, started, ended)."
    started = time.time()
    if arg.get("sleep"): time.sleep(arg["sleep"])
    _client().incr("bench:io")
    record(arg, started)


async def aroundtrip(arg: dict[str, Any]) -> None:
    "An async job: one Redis command on this loop's client (after `arg['sleep']` seconds, if given), then record."
    started = time.time()
    if arg.get("sleep"): await asyncio.sleep(arg["sleep"])
    key = id(asyncio.get_running_loop())
    if (c := _async.get(key)) is None:
        import redis.asyncio
        c = _async[key] = redis.asyncio.Redis.from_url(URL)
    await c.incr("bench:io")
    record(arg, started)
