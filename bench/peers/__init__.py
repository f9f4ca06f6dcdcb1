"""Peer adapters: one module per task system, each with the task it runs and a `Peer` the harness drives.

Every adapter gives the same calls: `reset` (fresh, empty queue), `put` (enqueue one job), `put_many`
(one producer, one call per job), `put_batches` (a documented bulk API, or None), `start_workers` (real
subprocesses) and `close`. Jobs are no-ops with a small JSON argument whose body is `bench.probe.record`.
"""
from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common import Proc

__all__ = ["Peer", "Env", "job_arg", "load", "PEER_MODULES"]


def job_arg(t: float | None = None) -> dict[str, Any]:
    "The small JSON argument of every benchmark job; `t` is when it was enqueued."
    return {"t": time.time() if t is None else t, "user": 42, "tag": "bench"}


@dataclass
class Env:
    "Where a peer keeps its state for one run: a work directory and a Redis base URL."
    workdir: Path
    redis: str


class Peer(ABC):
    "A task system under test. Subclasses fill in the calls below."

    key = ""
    label = ""
    #: How one worker process runs jobs (stated in the results).
    concurrency = ""
    #: The bulk enqueue API measured by `put_batches`, or "" when the library has none.
    batch_api = ""
    #: Which measurements this peer takes part in.
    measures: frozenset[str] = frozenset({"enqueue", "drain", "pickup", "load"})
    #: The load scenario (`bench/load.py`): True while `put` defers the job whose body makes one Redis round trip
    #: (`bench.io_job`) instead of the no-op.
    io = False

    def __init__(self, env: Env) -> None:
        self.env = env
        self.dir = env.workdir / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rep = 0

    @abstractmethod
    def reset(self) -> None:
        "An empty queue for the next repetition (and a fresh producer connection)."

    @abstractmethod
    def put(self, arg: dict[str, Any]) -> None:
        "Enqueue one job."

    def put_many(self, n: int) -> None:
        "Enqueue `n` jobs one call at a time."
        for _ in range(n): self.put(job_arg())

    def put_batches(self, n: int, size: int) -> bool:
        "Enqueue `n` jobs in batches of `size` with the bulk API; False when there is none."
        return False

    @abstractmethod
    def worker_commands(self, procs: int) -> list[list[str]]:
        "The commands that start `procs` worker processes."

    def worker_env(self) -> dict[str, str]:
        return {}

    def host_commands(self, hosts: int) -> list[list[str]]:
        """`hosts` separate worker processes, each as `worker_commands(1)` starts it (as on `hosts` machines, one
        worker each): the mixed measure (`bench/mixed.py`), where a long job may hold up jobs its worker fetched."""
        return [cmd for _ in range(hosts) for cmd in self.worker_commands(1)]

    def start_workers(self, procs: int, probe_dir: Path, tag: str = "", hosts: int = 0) -> list[Proc]:
        "`procs` worker processes as `worker_commands` starts them; or (`hosts`) that many as `host_commands` does."
        from ..probe import ENV
        env = {**self.worker_env(), ENV: str(probe_dir)}
        cmds = self.host_commands(hosts) if hosts else self.worker_commands(procs)
        return [Proc(cmd, env=env, log=self.dir / f"worker{tag}-{i}.log") for i, cmd in enumerate(cmds)]

    def stop_workers(self, procs: list[Proc]) -> None:
        from ..common import stop_all
        stop_all(procs)

    def close(self) -> None:  # noqa: B027 (a peer without producer connections has nothing to release)
        "Release producer connections."


#: key -> module defining the peer class `PEER`.
PEER_MODULES = {
    "fh-tasks": "fh_peer", "fh-tasks-async": "fh_peer", "fh-tasks-full": "fh_peer",
    "huey-sqlite": "huey_peer", "huey-redis": "huey_peer",
    "celery": "celery_peer", "fh-celery": "fh_celery_peer", "fh-celery-p4": "fh_celery_peer",
    "celery-late": "fh_celery_peer", "celery-status": "fh_celery_peer",
    "dramatiq": "dramatiq_peer",
    "fh-dramatiq": "fh_dramatiq_peer", "rq": "rq_peer",
    "rq-simple": "rq_peer", "arq": "arq_peer",
}


def load(key: str, env: Env) -> Peer:
    "The adapter for `key`, imported on first use (so one missing library only drops its own rows)."
    mod = importlib.import_module(f"{__name__}.{PEER_MODULES[key]}")
    cls: type[Peer] = mod.PEERS[key]
    return cls(env)
