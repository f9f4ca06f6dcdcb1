"""Helpers for testing apps that use fh-tasks: drain the queue deterministically, or run jobs eagerly.

    from fh_tasks.testing import drain
    def test_signup(client, tasks):
        client.post('/signup', data=...)
        drain(tasks)                       # runs every due job, retries included, then returns
        assert tasks.jobs(state='succeeded')
"""
from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hub import Tasks

__all__ = ["drain", "eager"]


def drain(tasks: Tasks, *, timeout: float = 30.0, retries_now: bool = True, **worker_kw: Any) -> int:
    """Run a burst worker until no job is due, and return how many outcomes it recorded.

    With `retries_now` (the default) retry backoffs are skipped so retried jobs finish within the call.
    Safe to call from sync code and from inside a running event loop (it uses its own thread and loop).
    """
    queues = tasks.all_queues()
    w = tasks.worker(burst=True, eager=retries_now, queues=queues, poll_interval=0.001, **worker_kw)
    err: list[BaseException] = []

    def run() -> None:
        try: asyncio.run(asyncio.wait_for(w.run(), timeout))
        except BaseException as e: err.append(e)

    th = threading.Thread(target=run, name="fh-tasks-drain")
    th.start()
    th.join()
    if err: raise err[0]
    return w.processed


def eager(tasks: Tasks) -> Tasks:
    "Switch a hub to eager mode (each job runs inline when it is stored) and return it."
    tasks.settings.eager = True
    return tasks
