"""What the engine contract suite needs from an engine under test, and the SQLite engine's answer.

Every test in tests/engines speaks only fh-tasks' public API, plus the few calls of `Engine` below: make a hub
on the engine's store, drain its jobs, start and kill a real worker process. Adding an engine (Celery,
Dramatiq) means one more `Engine` subclass in `ENGINES` and its name in the `engine` fixture's params.

Worker processes serve `contract_worker:tasks`: the hub `worker_hub()` builds from the environment the engine
sets (`FH_TASKS_CONTRACT_ENGINE`, `FH_TASKS_CONTRACT_DB`), with the tasks of `contract_tasks` registered.
This module is imported by those processes too, so it must not import pytest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import support
from contract_tasks import ContractTasks, register

from fh_tasks import Tasks
from fh_tasks.testing import drain

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENGINE_ENV, DB_ENV = "FH_TASKS_CONTRACT_ENGINE", "FH_TASKS_CONTRACT_DB"
# What a worker process imports from: the package, these modules, and tests/ (pytest's `pythonpath`).
WORKER_PATH = os.pathsep.join([str(ROOT), str(HERE), str(HERE.parent)])
#: The module:attribute worker processes serve.
WORKER_TARGET = "contract_worker:tasks"
T = TypeVar("T")


class WorkerProcess:
    "A worker process started by an engine; its output goes to `log`."

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen, self.log = popen, log

    @property
    def pid(self) -> int:
        "The process that runs the jobs."
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        "The last lines it logged (for failure messages)."
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-n:])


class Engine(ABC):
    "An engine under test: hubs on one store for the whole test, and worker processes serving them."

    name = ""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.hubs: list[Tasks] = []
        self.workers: list[WorkerProcess] = []

    @abstractmethod
    def make(self, app: Any = None, **kw: Any) -> Tasks:
        "A hub on this test's store (every hub made in one test shares it), bound to `app` if given."

    def drain(self, hub: Tasks, **kw: Any) -> int:
        "Run every due job of `hub` now, in this process; returns how many outcomes were recorded."
        return drain(hub, **kw)

    @abstractmethod
    def start_worker(self, *, lease: float = 1.0, concurrency: int = 4) -> WorkerProcess:
        "Start a real worker process serving the contract tasks on this test's store."

    def kill(self, worker: WorkerProcess) -> int:
        "SIGKILL a worker process and reap it; returns its exit status."
        if worker.alive(): os.kill(worker.pid, signal.SIGKILL)
        return worker.popen.wait(10)

    @staticmethod
    @abstractmethod
    def worker_hub() -> Tasks:
        "In a worker process: the hub to serve, from the environment `start_worker` set."

    def close(self) -> None:
        "Kill what is still running and release every hub's connections and event threads."
        for w in self.workers:
            if w.alive(): self.kill(w)
        for h in self.hubs:
            h.bus.close()
            h.store.close()


class SQLiteEngine(Engine):
    "The embedded engine: one SQLite file per test; workers are `python -m fh_tasks worker ... --db FILE`."

    name = "sqlite"

    def __init__(self, dir: Path) -> None:
        super().__init__(dir)
        self.db = str(dir / "jobs.db")

    def make(self, app: Any = None, **kw: Any) -> Tasks:
        kw.setdefault("grace", 2.0)
        hub = Tasks(app, db=self.db, **kw)
        self.hubs.append(hub)
        return hub

    def start_worker(self, *, lease: float = 1.0, concurrency: int = 4) -> WorkerProcess:
        log = self.dir / f"worker-{len(self.workers)}.log"
        env = {**os.environ, "PYTHONPATH": WORKER_PATH, "PYTHONUNBUFFERED": "1",
               ENGINE_ENV: self.name, DB_ENV: self.db}
        with open(log, "ab") as out:
            p = subprocess.Popen([sys.executable, "-m", "fh_tasks", "worker", WORKER_TARGET, "--db", self.db,
                                  "--lease", str(lease), "--concurrency", str(concurrency), "--log-level", "info"],
                                 cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT)
        w = WorkerProcess(p, log)
        self.workers.append(w)
        return w

    @staticmethod
    def worker_hub() -> Tasks:
        return Tasks(db=os.environ[DB_ENV], workers=0)


class Unavailable(Exception):
    "A server an engine under test needs does not answer: the `engine` fixture skips the test (fails it under CI)."


ENGINES: dict[str, type[Engine]] = {"sqlite": SQLiteEngine}


def worker_hub() -> Tasks:
    "The hub a worker process serves: made by the engine named in the environment, with the contract tasks."
    hub = ENGINES[os.environ.get(ENGINE_ENV, "sqlite")].worker_hub()
    register(hub)
    return hub


def site(engine: Engine, **kw: Any) -> tuple[Any, Any, Tasks, ContractTasks]:
    "A FastHTML app with a hub of `engine` bound to it and the contract tasks registered: (app, rt, tasks, t)."
    from fasthtml.common import fast_app
    app, rt = fast_app(secret_key="fh-tasks-contract")
    tasks = engine.make(app, **kw)
    return app, rt, tasks, register(tasks)


def wait_until(cond: Callable[[], T], timeout: float = 20.0, what: str = "condition", interval: float = 0.01) -> T:
    "`support.wait_until`, with the contract suite's longer default timeout."
    return support.wait_until(cond, timeout, what, interval)


# Broker engines live in modules of their own, which import this one and add themselves to ENGINES.
import celery_support  # noqa: E402,F401
import dramatiq_support  # noqa: E402,F401
