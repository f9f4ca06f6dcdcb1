"""Coalesced progress: latest value per attempt in memory, one transaction per flush, the last value committed with
the outcome, stale attempts refused, values checked at once."""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from fh_tasks import ArgumentError, Tasks, current_job
from fh_tasks.progress import FLUSH_EVERY, ProgressBuffer
from fh_tasks.store import NewJob, Outcome
from fh_tasks.store.sqlite import SQLiteStore
from fh_tasks.testing import drain


class CountingStore(SQLiteStore):
    "A real SQLiteStore that counts its write transactions by what they do."

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.writes: Counter[str] = Counter()

    @contextmanager
    def _tx(self, doing: str) -> Iterator[sqlite3.Connection]:
        with super()._tx(doing) as c:
            yield c
        self.writes[doing] += 1


def claimed(store: SQLiteStore) -> tuple[str, int]:
    "Store one job and claim it: (id, attempt) of a running attempt."
    now = time.time()
    store.enqueue([NewJob(id=uuid.uuid4().hex, task="t", args='{"kwargs":{}}', run_at=now, created_at=now)])
    [c] = store.claim("w", ["default"], 1, lease=30)
    return c.id, c.attempt


def stored_progress(db: str, jid: str) -> Any:
    with sqlite3.connect(db) as c: return c.execute("SELECT progress FROM fh_jobs WHERE id=?", [jid]).fetchone()[0]


def test_buffer_keeps_the_latest_value_per_attempt_across_threads():
    buf = ProgressBuffer()

    def hammer(attempt: int) -> None:
        for i in range(5000): buf.put(("j", attempt), str(i))

    threads = [threading.Thread(target=hammer, args=(a,)) for a in (1, 2)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert buf.take() == {("j", 1): "4999", ("j", 2): "4999"} and len(buf) == 0
    # A stale attempt is refused; a failed write's values come back unless a newer one arrived meanwhile
    buf.stale([("j", 1)])
    assert buf.put(("j", 1), "x") is False and buf.put(("j", 2), "new") is True
    buf.restore({("j", 1): "old", ("j", 2): "old", ("k", 1): "old"})
    assert buf.take() == {("j", 2): "new", ("k", 1): "old"}


def test_many_calls_become_one_write_and_the_latest_value_wins(db):
    # Given a running job
    store = CountingStore(db)
    jid, attempt = claimed(store)
    store.writes.clear()
    # When progress is recorded 10,000 times
    assert all(store.record_progress(jid, attempt, f'{{"done": {i}}}') for i in range(10_000))
    # Then nothing is written until a flush, which writes the last value in one transaction
    assert stored_progress(db, jid) is None and store.writes == Counter()
    assert store.flush_progress() == 1
    assert store.writes == Counter({"record progress": 1}) and stored_progress(db, jid) == '{"done": 9999}'
    # And a flush with nothing pending writes nothing
    assert store.flush_progress() == 0 and store.writes["record progress"] == 1
    store.close()


def test_the_last_progress_is_committed_with_the_outcome_and_later_values_are_refused(db):
    # Given a running job with progress not flushed yet
    store = CountingStore(db)
    jid, attempt = claimed(store)
    store.writes.clear()
    store.record_progress(jid, attempt, '"last"')
    # When its outcome is recorded, Then the progress is stored in the same transaction
    assert store.finish([Outcome("succeed", jid, attempt, result='"ok"')]) == 1
    assert stored_progress(db, jid) == '"last"' and sum(store.writes.values()) == 1
    rec = store.get(jid)
    assert (rec.state, rec.progress, rec.result) == ("succeeded", "last", "ok")
    # And a value recorded after the outcome is not stored; once a write has seen that, the attempt is refused
    assert store.record_progress(jid, attempt, '"late"') is True
    assert store.flush_progress() == 0 and stored_progress(db, jid) == '"last"'
    assert store.record_progress(jid, attempt, '"later"') is False and store.progress_pending() == 0
    store.close()


def test_a_failed_flush_keeps_the_values_for_the_next_one(db):
    # Given a running job with pending progress, and another connection holding the write lock
    store = SQLiteStore(db, busy_timeout=0.05)
    jid, attempt = claimed(store)
    store.record_progress(jid, attempt, "1")
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    # When a flush cannot write, Then it raises and the value stays pending (a newer one still wins)
    with pytest.raises(Exception, match="locked"): store.flush_progress()
    store.record_progress(jid, attempt, "2")
    other.execute("ROLLBACK")
    other.close()
    assert store.progress_pending() == 1 and store.flush_progress() == 1 and stored_progress(db, jid) == "2"
    store.close()


def test_set_progress_writes_at_once_and_is_not_overwritten_by_an_older_pending_value(db):
    store = SQLiteStore(db)
    jid, attempt = claimed(store)
    store.record_progress(jid, attempt, '"buffered"')
    assert store.set_progress(jid, attempt, '"direct"') is True
    assert store.flush_progress() == 0 and stored_progress(db, jid) == '"direct"'
    store.close()


def test_a_task_hammering_progress_causes_few_writes(db):
    # Given a hub on a counting store, and a sync and an async task each reporting progress 50,000 times
    store = CountingStore(db)
    tasks = Tasks(store=store, workers=0)
    n = 50_000

    @tasks.task
    def sync_loop() -> int:
        for i in range(n): current_job().progress({"done": i + 1, "total": n})
        return n

    @tasks.task
    async def async_loop() -> int:
        for i in range(n): current_job().progress({"done": i + 1, "total": n})
        return n

    a, b = sync_loop.defer(), async_loop.defer()
    store.writes.clear()
    # When a worker runs them
    t0 = time.monotonic()
    drain(tasks)
    elapsed = time.monotonic() - t0
    # Then each ended with its final progress stored
    for job in (a, b):
        rec = tasks.get(job.id)
        assert (rec.state, rec.progress) == ("succeeded", {"done": n, "total": n})
    # And progress took at most one transaction per flush interval (plus one), not one per call
    assert store.writes["record progress"] <= elapsed / FLUSH_EVERY + 1, (store.writes, elapsed)
    store.close()


def test_progress_checks_the_value_at_once(db):
    # Given a task that reports a value that is not JSON
    tasks = Tasks(db=db, workers=0)

    @tasks.task
    def bad() -> None:
        current_job().progress({"when": object()})

    job = bad.defer()
    drain(tasks)
    # Then the call raised ArgumentError inside the task, which failed the job
    rec = tasks.get(job.id)
    assert rec.state == "failed" and rec.error["type"] == ArgumentError.__name__
    assert "progress" in rec.error["message"]
    tasks.store.close()
