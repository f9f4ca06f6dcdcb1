"""The tasks of the engine contract suite, registered on whatever hub an engine makes.

They live in a module, not in the tests, so that a worker process of any engine can import them; and they
show what they did through their results, their progress and files named by their arguments, never through
memory shared with the test, so the same test holds whether a job runs in the test's process or in another.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fh_tasks import Retry, Task, Tasks, current_job

#: The progress every progress-reporting task reports.
PROGRESS = {"done": 3, "total": 10}
#: Timeout of the two overrunning tasks, in seconds.
TIMEOUT = 0.2


def note(path: str, text: str) -> None:
    "Append one line to `path` (a witness file: what ran, in what order, on which attempt)."
    with open(path, "a") as f: f.write(text + "\n")


def lines(path: str | Path) -> list[str]:
    "The lines a task noted in `path` (none when it never ran)."
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []


@dataclass(frozen=True)
class ContractTasks:
    "The registered tasks, as the hub that registered them returned them."
    echo: Task[Any, Any]
    append: Task[Any, Any]
    fails_unless: Task[Any, Any]
    flaky: Task[Any, Any]
    retry_later: Task[Any, Any]
    sync_overrun: Task[Any, Any]
    async_overrun: Task[Any, Any]
    report_progress: Task[Any, Any]
    progress_then_wait: Task[Any, Any]
    stall_first: Task[Any, Any]


def echo(value: Any) -> Any:
    return value


def append(path: str, text: str, pause: float = 0.0) -> str:
    time.sleep(pause)
    note(path, text)
    return text


def fails_unless(path: str) -> str:
    if not os.path.exists(path): raise FileNotFoundError(f"{path} is not there yet")
    return "found"


def flaky(log: str) -> int:
    attempt = current_job().attempt
    note(log, str(attempt))
    if attempt < 3: raise ConnectionError(f"attempt {attempt} could not connect")
    return attempt


def retry_later(log: str, delay: float) -> int:
    attempt = current_job().attempt
    note(log, f"{attempt} {time.time()!r}")
    if attempt == 1: raise Retry("not ready yet", delay=delay)
    return attempt


def sync_overrun(log: str, seconds: float) -> None:
    note(log, str(current_job().attempt))
    time.sleep(seconds)


async def async_overrun(log: str, seconds: float) -> None:
    note(log, str(current_job().attempt))
    await asyncio.sleep(seconds)


def report_progress() -> str:
    current_job().progress(PROGRESS)
    return "reported"


def progress_then_wait(release: str, seconds: float = 20.0) -> str:
    current_job().progress(PROGRESS)
    deadline = time.monotonic() + seconds
    while not os.path.exists(release):
        if time.monotonic() > deadline: raise TimeoutError(f"{release} did not appear within {seconds}s")
        time.sleep(0.01)
    return "released"


def stall_first() -> dict[str, int]:
    job = current_job()
    if job.attempt == 1:
        job.progress({"pid": os.getpid()})  # tells the test which process to kill
        time.sleep(60)
    return {"attempt": job.attempt, "pid": os.getpid()}


#: Each task's options; its stored name is `contract.<function name>`.
OPTIONS: dict[Any, dict[str, Any]] = {
    echo: {}, append: {}, fails_unless: {},
    flaky: {"retries": 2, "retry_delay": 0.01},
    retry_later: {"retries": 1, "retry_delay": 0.001},
    sync_overrun: {"timeout": TIMEOUT, "retries": 1, "retry_delay": 0.01},
    async_overrun: {"timeout": TIMEOUT, "retries": 1, "retry_delay": 0.01},
    report_progress: {}, progress_then_wait: {}, stall_first: {},
}


def register(tasks: Tasks) -> ContractTasks:
    "Register the contract tasks on `tasks` under stable names (the same in every process)."
    made = {fn.__name__: tasks.task(name=f"contract.{fn.__name__}", **opts)(fn) for fn, opts in OPTIONS.items()}
    return ContractTasks(**made)
