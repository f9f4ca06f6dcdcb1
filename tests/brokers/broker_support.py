"""Helpers of the broker engines' tests (import as `from broker_support import ...`)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import support

T = TypeVar("T")


def forget(engine: Any) -> None:
    "Delete what a test's Celery engine left: its status keys, and its Kombu keys (Redis) or queues (RabbitMQ)."
    import redis
    try: engine.status.clear()
    except Exception: pass
    if engine.broker_url.startswith("redis"):
        r = redis.Redis.from_url(engine.broker_url)
        try:
            for k in r.scan_iter(match=f"{engine.namespace}:*", count=1000): r.unlink(k)
        except redis.exceptions.ConnectionError: pass
        finally: r.close()
        return
    try:
        with engine.celery.connection_for_write() as conn:
            for q in {engine.queue_name(q) for q in engine.hub.all_queues()}:
                with contextlib.suppress(Exception): conn.channel().queue_delete(q)
                with contextlib.suppress(Exception): conn.channel().exchange_delete(q)  # Celery's, named as the queue
    except Exception: pass


def wait_until(cond: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    "`support.wait_until` for broker round trips: a longer default timeout, polled every 20 ms."
    return support.wait_until(cond, timeout, what, interval=0.02)
