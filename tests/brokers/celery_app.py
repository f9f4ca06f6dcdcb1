"""The hub the broker tests' worker processes serve (`fh-tasks worker celery_app:tasks`, or `celery -A
celery_app:celery_app worker`): the Celery engine on the broker, status store and namespace the environment names."""
from __future__ import annotations

import asyncio
import os
import signal
import time

from fh_tasks import Tasks, current_job
from fh_tasks.engine import EngineSettings
from fh_tasks.engines.celery import CeleryEngine


def make(broker: str, status: str, namespace: str, db: str = "outbox.db", prefetch: int = 1, **kw: object) -> Tasks:
    "A hub on the Celery engine with this module's tasks registered."
    engine = CeleryEngine(EngineSettings(broker=broker, status=status, db=db, workers=0, **kw),  # type: ignore[arg-type]
                          namespace=namespace, prefetch=prefetch)
    tasks = Tasks(engine=engine, workers=0)

    @tasks.task(name="b.append")
    def append(path: str, text: str) -> str:
        with open(path, "a") as f: f.write(text + "\n")
        return text

    @tasks.task(name="b.die")
    def die(path: str) -> None:
        "Notes its attempt, then kills the process running it (as an OOM kill would)."
        with open(path, "a") as f: f.write(f"{current_job().attempt} {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    @tasks.task(name="b.stubborn", timeout=0.5)
    def stubborn(path: str) -> None:
        "Swallows Celery's soft time limit and keeps going: only the hard limit stops it."
        with open(path, "a") as f: f.write(f"{current_job().attempt}\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try: time.sleep(0.05)
            except BaseException: pass

    @tasks.task(name="b.spin")
    def spin(path: str) -> None:
        "Reports progress until cancelled (then `progress()` raises JobCancelled); notes that it stopped."
        try:
            for i in range(600):
                current_job().progress({"done": i})
                time.sleep(0.05)
        finally:
            with open(path, "a") as f: f.write("stopped\n")

    @tasks.task(name="b.aspin")
    async def aspin(path: str) -> None:
        "Sleeps until cancelled; notes that it stopped."
        try:
            current_job().progress({"started": True})
            await asyncio.sleep(30)
        finally:
            with open(path, "a") as f: f.write("stopped\n")

    return tasks


if os.environ.get("FH_TEST_NS"):
    tasks = make(os.environ["FH_TEST_BROKER"], os.environ["FH_TEST_STATUS"], os.environ["FH_TEST_NS"],
                 prefetch=int(os.environ.get("FH_TEST_PREFETCH", "1")))
    celery_app = tasks.engine.celery  # type: ignore[attr-defined]
