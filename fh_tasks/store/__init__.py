"""The engine boundary: what the hub and the worker need from a job store.

`Tasks` and `Worker` speak only this protocol; `SQLiteStore` is the embedded implementation. Another backend
implements the same calls, with the same fencing and at-least-once contract.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..job import JobRecord

__all__ = ["NewJob", "Claim", "Outcome", "WorkerInfo", "Store"]


@dataclass(slots=True)
class NewJob:
    "A row to insert: a deferred call not yet stored."
    id: str
    task: str
    args: str
    queue: str = "default"
    max_attempts: int = 1
    timeout: float | None = None
    run_at: float = 0.0
    created_at: float = 0.0
    parent: str | None = None

    @property
    def state(self) -> str:
        if self.parent: return "waiting"
        return "scheduled" if self.run_at > self.created_at else "queued"


@dataclass(slots=True)
class Claim:
    """A job a worker holds under lease; `attempt` is its fencing token. `suspect`: it was running in a worker that
    died, so it runs alone (its worker claims nothing beside it)."""
    id: str
    task: str
    queue: str
    args: str
    attempt: int
    max_attempts: int
    timeout: float | None
    created_at: float
    started: float = 0.0
    suspect: bool = False


@dataclass(slots=True)
class WorkerInfo:
    "A worker as registered in the store: what it serves and when it was last seen (`live`: seen lately)."
    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    tasks: tuple[str, ...]
    concurrency: int
    lease: float
    started_at: float = 0.0
    last_seen: float = 0.0
    live: bool = True


@dataclass(slots=True)
class Outcome:
    "How one attempt ended, recorded by `Store.finish`."
    kind: Literal["succeed", "fail", "retry", "release"]
    id: str
    attempt: int
    result: str | None = None
    error: str | None = None
    run_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Store(Protocol):
    "Durable job storage. Every write is atomic; outcomes are fenced by (id, attempt)."

    def enqueue(self, jobs: Sequence[NewJob]) -> None:
        "Store `jobs` in one transaction (all or none). Raises `StoreError` subclasses."

    def claim(self, worker: str, queues: Sequence[str], limit: int, lease: float) -> list[Claim]:
        """Atomically take up to `limit` due jobs, charging each an attempt, under a lease of `lease` seconds.
        A due suspect job (one lost with a dead worker) goes first, and alone: the claim returns just it."""

    def finish(self, outcomes: Iterable[Outcome]) -> int:
        "Record outcomes in one transaction; returns how many were accepted (a stale lease is refused)."

    def heartbeat(self, worker: str, lease: float, info: WorkerInfo | None = None) -> int:
        "Extend the leases of the jobs `worker` holds and note the worker is alive (registering `info` if forgotten)."

    def expire(self) -> list[tuple[str, str]]:
        """Take back the jobs of dead workers: requeued, or failed when out of attempts; returns (id, new state) pairs.
        A job that ran alone in the dead worker's process is charged the attempt; others are excused, and all become
        suspect (run alone from then on)."""

    def register_worker(self, info: WorkerInfo) -> None:
        "Record a worker as live; `heartbeat` keeps it so."

    def unregister_worker(self, id: str) -> None:
        "Forget a worker that stopped cleanly."

    def workers(self) -> list[WorkerInfo]:
        "Registered workers, live ones first."

    def set_progress(self, id: str, attempt: int, progress: str) -> bool:
        "Record a running job's progress (JSON text)."

    def cancel(self, id: str) -> bool:
        "Cancel a job that has not started; True when it was cancelled."

    def requeue(self, id: str) -> bool:
        "Queue a failed or cancelled job again with fresh attempts."

    def get(self, id: str) -> JobRecord | None:
        "The job with this id, or None."

    def jobs(self, *, state: str | None = None, task: str | None = None, limit: int = 100,
             offset: int = 0) -> list[JobRecord]:
        "Jobs, newest first, filtered by state and task."

    def counts(self) -> dict[str, int]:
        "Number of jobs per state."

    def prune(self, before: float, limit: int = 10_000) -> int:
        "Delete up to `limit` finished jobs that finished before `before`."

    def close(self) -> None:
        "Release the store's connections."
