"""Shared by the integration tests: a bounded wait, and job rows written directly with SQL."""
from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import Any

import support


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    "`support.wait_until`, polled every 5 ms (the worker tests time what they wait for)."
    return support.wait_until(pred, timeout, what, interval=0.005)


def insert_row(db: str, task: str, args: str, *, max_attempts: int = 1) -> str:
    "Write a job row directly with SQL, as another program (or an attacker with file access) could."
    jid, now = uuid.uuid4().hex, time.time()
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO fh_jobs (id, task, queue, args, state, max_attempts, run_at, created_at) "
                  "VALUES (?, ?, 'default', ?, 'queued', ?, ?, ?)", (jid, task, args, max_attempts, now, now))
    c.close()
    return jid
