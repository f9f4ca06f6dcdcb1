"""The store boundary of the SQLite engine: what its worker needs from a job store.

`SQLiteEngine` and its `Worker` speak only this protocol; `SQLiteStore` implements it. Another backend
implements the same calls, with the same fencing and at-least-once contract.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from ..records import Claim, JobRecord, NewJob, Outcome, WorkerInfo

__all__ = ["NewJob", "Claim", "Outcome", "WorkerInfo", "Store"]


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
