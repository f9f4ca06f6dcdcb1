"""Tasks the Dramatiq engine's own tests add to the contract tasks: they tell how Dramatiq ran them. Registered on the
test's hub and, by `dramatiq_worker`, on the hub of worker processes."""
from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from fh_tasks import Task, Tasks, current_job


async def where() -> dict[str, Any]:
    "The process, event loop and thread an async task runs on, and the job it runs as."
    await asyncio.sleep(0)
    job = current_job()
    return {"pid": os.getpid(), "loop": id(asyncio.get_running_loop()), "thread": threading.get_ident(),
            "job": job.id, "attempt": job.attempt}


def register(tasks: Tasks) -> Task[Any, Any]:
    return tasks.task(name="dramatiq.where")(where)
