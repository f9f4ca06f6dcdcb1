"""SQLiteStore on a real file: atomic batched claims, leases and fencing, scheduling, management calls."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import threading
import uuid

import pytest

from fh_tasks import StoreError
from fh_tasks.store import NewJob, Outcome
from fh_tasks.store.sqlite import CRASH_ATTEMPTS, SCHEMA_VERSION, SQLiteStore

T0 = 1_700_000_000.0


class Clock:
    "A clock the test moves by hand."

    def __init__(self, t: float = T0) -> None: self.t = t
    def __call__(self) -> float: return self.t
    def advance(self, dt: float) -> None: self.t += dt


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db, clock):
    s = SQLiteStore(db, clock=clock)
    yield s
    s.close()


def new(clock: Clock, task: str = "t", delay: float = 0.0, attempts: int = 1, queue: str = "default",
        parent: str | None = None, args: str = '{"kwargs":{}}') -> NewJob:
    now = clock()
    return NewJob(id=uuid.uuid4().hex, task=task, args=args, queue=queue, max_attempts=attempts,
                  run_at=now + delay, created_at=now, parent=parent)


def test_claim_takes_a_batch_and_charges_an_attempt(store, clock):
    # Given five queued jobs
    jobs = [new(clock) for _ in range(5)]
    store.enqueue(jobs)
    # When a worker claims three
    got = store.claim("w1", ["default"], 3, lease=30)
    # Then it gets the three oldest, each on attempt 1, now running under its name
    assert [c.id for c in got] == [j.id for j in jobs[:3]]
    assert all(c.attempt == 1 for c in got)
    for c in got:
        rec = store.get(c.id)
        assert rec.state == "running" and rec.attempts == 1 and rec.worker == "w1" and rec.started_at == T0
    # And the next claim gets the other two, and then nothing
    assert [c.id for c in store.claim("w2", ["default"], 10, 30)] == [j.id for j in jobs[3:]]
    assert store.claim("w2", ["default"], 10, 30) == []


def test_claim_is_fifo_by_run_at(store, clock):
    # Given a job scheduled for later, then a job due at once, then a job due before the first
    late = new(clock, delay=10)
    clock.advance(1)
    now = new(clock)
    clock.advance(1)
    middle = new(clock, delay=3)
    store.enqueue([late, now, middle])
    clock.advance(20)
    # When all are due and one claim takes them, Then they come in run_at order
    assert [c.id for c in store.claim("w", ["default"], 10, 30)] == [now.id, middle.id, late.id]


def test_claim_one_at_a_time_follows_run_at(store, clock):
    late, early = new(clock, delay=5), new(clock, delay=1)
    store.enqueue([late, early])
    clock.advance(10)
    assert store.claim("w", ["default"], 1, 30)[0].id == early.id
    assert store.claim("w", ["default"], 1, 30)[0].id == late.id


def test_claim_serves_only_its_queues(store, clock):
    mail, other = new(clock, queue="mail"), new(clock, queue="other")
    store.enqueue([mail, other])
    assert [c.id for c in store.claim("w", ["mail", "nothing"], 10, 30)] == [mail.id]
    assert store.get(other.id).state == "queued"


def test_scheduled_job_is_not_claimed_before_due(store, clock):
    # Given a job deferred by 60 s
    j = new(clock, delay=60)
    store.enqueue([j])
    assert store.get(j.id).state == "scheduled"
    # When a worker claims before it is due, Then it gets nothing
    clock.advance(59.9)
    assert store.claim("w", ["default"], 10, 30) == []
    assert store.next_due(["default"]) == T0 + 60
    # And once it is due, it is claimed
    clock.advance(0.1)
    assert [c.id for c in store.claim("w", ["default"], 10, 30)] == [j.id]


def test_claim_is_atomic_across_connections(db, clock):
    # Given 300 jobs and four connections to the same file claiming from four threads
    stores = [SQLiteStore(db, clock=clock) for _ in range(4)]
    stores[0].enqueue([new(clock) for _ in range(300)])
    got: list[list[str]] = [[] for _ in stores]

    def drain(i: int) -> None:
        while (claims := stores[i].claim(f"w{i}", ["default"], 7, 30)):
            got[i] += [c.id for c in claims]

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(stores))]
    for t in threads: t.start()
    for t in threads: t.join()
    for s in stores: s.close()
    # Then every job was claimed exactly once
    flat = [i for g in got for i in g]
    assert len(flat) == 300 and len(set(flat)) == 300


def test_outcome_with_stale_attempt_is_refused(store, clock):
    # Given a job claimed by w1 whose lease ran out, then claimed again by w2
    j = new(clock, attempts=3)
    store.enqueue([j])
    first = store.claim("w1", ["default"], 1, lease=5)[0]
    clock.advance(6)
    assert store.expire() == [(j.id, "queued")]
    second = store.claim("w2", ["default"], 1, lease=5)[0]
    assert (first.attempt, second.attempt) == (1, 2)
    # When w1 reports its late outcome, Then it is refused and changes nothing
    assert store.finish([Outcome("succeed", j.id, first.attempt, result='"late"')]) == 0
    assert store.set_progress(j.id, first.attempt, '"stale"') is False
    rec = store.get(j.id)
    assert rec.state == "running" and rec.result is None and rec.progress is None and rec.worker == "w2"
    # And w2's outcome is accepted
    assert store.finish([Outcome("succeed", j.id, second.attempt, result='"ok"')]) == 1
    assert store.get(j.id).result == "ok"


def test_finish_records_each_kind(store, clock):
    a, b, c, d = (new(clock, attempts=2) for _ in range(4))
    store.enqueue([a, b, c, d])
    claims = {cl.id: cl for cl in store.claim("w", ["default"], 4, 30)}
    err = json.dumps({"type": "E", "message": "m", "traceback": None})
    clock.advance(1)
    n = store.finish([Outcome("succeed", a.id, 1, result="[1]"), Outcome("fail", b.id, 1, error=err),
                      Outcome("retry", c.id, 1, error=err, run_at=clock() + 5), Outcome("release", d.id, 1)])
    assert n == 4 and len(claims) == 4
    ra, rb, rc, rd = (store.get(x.id) for x in (a, b, c, d))
    assert (ra.state, ra.result, ra.finished_at) == ("succeeded", [1], T0 + 1)
    assert (rb.state, rb.error["type"], rb.finished_at) == ("failed", "E", T0 + 1)
    assert (rc.state, rc.run_at, rc.attempts) == ("retrying", T0 + 6, 1)
    # A released job goes back without being charged the attempt
    assert (rd.state, rd.attempts, rd.worker) == ("queued", 0, None)
    # The retry is due only after its delay
    assert [x.id for x in store.claim("w", ["default"], 10, 30)] == [d.id]
    clock.advance(5)
    assert [x.id for x in store.claim("w", ["default"], 10, 30)] == [c.id]


def test_expire_requeues_then_fails_with_worker_lost(store, clock):
    # Given a job with no retries (one attempt for errors), claimed under a 10 s lease
    j = new(clock, attempts=1)
    store.enqueue([j])
    store.claim("w1", ["default"], 1, lease=10)
    # When the lease has not yet run out, Then nothing expires
    clock.advance(10)
    assert store.expire() == []
    # When it has, Then the job is queued again with its attempt charged: a lost worker is not the task's fault
    clock.advance(0.5)
    assert store.expire() == [(j.id, "queued")]
    rec = store.get(j.id)
    assert (rec.state, rec.attempts, rec.worker, rec.error["type"]) == ("queued", 1, None, "WorkerLost")
    # When the workers of its second and third (last crash) attempts die too, Then it fails with WorkerLost
    for worker, expected in (("w2", "queued"), ("w3", "failed")):
        store.claim(worker, ["default"], 1, lease=10)
        clock.advance(11)
        assert store.expire() == [(j.id, expected)]
    rec = store.get(j.id)
    assert (rec.state, rec.attempts, rec.finished_at) == ("failed", CRASH_ATTEMPTS, clock())
    assert rec.error["type"] == "WorkerLost" and "lease" in rec.error["message"]
    assert store.claim("w4", ["default"], 1, lease=10) == []


def test_expire_gives_a_job_with_more_retries_all_its_attempts(store, clock):
    # Given a job allowed five attempts
    j = new(clock, attempts=5)
    store.enqueue([j])
    # When its worker dies five times, Then it is requeued four times and failed the fifth
    states = []
    for n in range(5):
        store.claim(f"w{n}", ["default"], 1, lease=1)
        clock.advance(2)
        states += [s for _, s in store.expire()]
    assert states == ["queued"] * 4 + ["failed"]


def test_heartbeat_extends_only_its_workers_leases(store, clock):
    # Given one job held by w1 and one by w2, both under a 10 s lease
    a, b = new(clock, attempts=2), new(clock, attempts=2)
    store.enqueue([a])
    store.claim("w1", ["default"], 1, lease=10)
    store.enqueue([b])
    store.claim("w2", ["default"], 1, lease=10)
    # When w1 renews after 8 s
    clock.advance(8)
    assert store.heartbeat("w1", lease=10) == 1
    # Then after 12 s only w2's job has expired
    clock.advance(4)
    assert store.expire() == [(b.id, "queued")]
    assert store.get(a.id).state == "running"
    clock.advance(7)
    assert store.expire() == [(a.id, "queued")]


def test_cancel_only_before_start(store, clock):
    queued, scheduled, running = new(clock), new(clock, delay=60), new(clock)
    store.enqueue([running])
    store.claim("w", ["default"], 1, 30)
    store.enqueue([queued, scheduled])
    assert store.cancel(queued.id) and store.cancel(scheduled.id)
    assert not store.cancel(running.id)
    assert not store.cancel(queued.id)  # already final
    assert not store.cancel("no-such-id")
    assert store.get(queued.id).state == "cancelled" and store.get(queued.id).finished_at == T0
    assert store.get(running.id).state == "running"
    clock.advance(100)
    assert store.claim("w", ["default"], 10, 30) == []


def test_requeue_gives_a_failed_job_fresh_attempts(store, clock):
    # Given a job that failed on its only attempt
    j = new(clock)
    store.enqueue([j])
    store.claim("w", ["default"], 1, 30)
    store.finish([Outcome("fail", j.id, 1, error='{"type": "E", "message": "m"}')])
    # When it is requeued
    clock.advance(5)
    assert store.requeue(j.id)
    # Then it is queued with its error reset and a fresh budget: its earlier run is excused, not forgotten
    rec = store.get(j.id)
    assert (rec.state, rec.attempts, rec.max_attempts, rec.error, rec.finished_at, rec.run_at) == (
        "queued", 1, 2, None, None, T0 + 5)
    assert store._read("SELECT excused FROM fh_jobs WHERE id = ?", (j.id,))[0][0] == 1
    # And it runs again as attempt 2 (the fencing token never goes back), its last attempt
    c = store.claim("w", ["default"], 1, 30)[0]
    assert (c.attempt, c.max_attempts) == (2, 2)
    # And a late outcome of the first run is refused
    assert store.finish([Outcome("succeed", j.id, 1, result="1")]) == 0
    assert store.finish([Outcome("succeed", j.id, 2, result="2")]) == 1
    # And only failed or cancelled jobs can be requeued
    assert not store.requeue(j.id)
    assert not store.requeue("no-such-id")


def test_prune_deletes_only_old_finished_jobs(store, clock):
    old_done, old_failed, fresh_done, waiting = new(clock), new(clock), new(clock), new(clock)
    store.enqueue([old_done, old_failed])
    store.claim("w", ["default"], 2, 30)
    store.finish([Outcome("succeed", old_done.id, 1, result="1"), Outcome("fail", old_failed.id, 1, error="{}")])
    clock.advance(100)
    store.enqueue([fresh_done, waiting])
    store.claim("w", ["default"], 1, 30)
    store.finish([Outcome("succeed", fresh_done.id, 1, result="1")])
    assert store.prune(before=T0 + 50) == 2
    assert store.get(old_done.id) is None and store.get(old_failed.id) is None
    assert store.get(fresh_done.id).state == "succeeded" and store.get(waiting.id).state == "queued"
    assert store.prune(before=T0 + 50) == 0


def test_prune_respects_its_limit(store, clock):
    jobs = [new(clock) for _ in range(5)]
    store.enqueue(jobs)
    store.claim("w", ["default"], 5, 30)
    store.finish([Outcome("succeed", j.id, 1, result="1") for j in jobs])
    clock.advance(10)
    assert store.prune(before=clock(), limit=3) == 3
    assert store.prune(before=clock(), limit=3) == 2


def test_counts_and_filtered_listing(store, clock):
    # Given jobs of two tasks in several states
    a1, a2, a3, b1 = new(clock, "a"), new(clock, "a"), new(clock, "a"), new(clock, "b", delay=30)
    store.enqueue([a1, a2, a3, b1])
    store.claim("w", ["default"], 1, 30)
    store.finish([Outcome("succeed", a1.id, 1, result="1")])
    # Then counts show each state
    assert store.counts() == {"succeeded": 1, "queued": 2, "scheduled": 1}
    # And listing filters by state, task and limit, newest first
    assert [r.id for r in store.jobs()] == [b1.id, a3.id, a2.id, a1.id]
    assert [r.id for r in store.jobs(task="a")] == [a3.id, a2.id, a1.id]
    assert [r.id for r in store.jobs(state="queued", task="a")] == [a3.id, a2.id]
    assert [r.id for r in store.jobs(task="a", limit=1)] == [a3.id]
    assert [r.id for r in store.jobs(task="a", limit=2, offset=1)] == [a2.id, a1.id]
    assert store.jobs(state="failed") == [] and store.jobs(task="zzz") == []


def test_enqueue_is_all_or_nothing(store, clock):
    # Given a batch whose second row repeats an existing id
    first = new(clock)
    store.enqueue([first])
    dup = NewJob(id=first.id, task="t", args="{}", created_at=clock(), run_at=clock())
    # When it is enqueued, Then it fails with a StoreError and the batch's other row is not stored
    other = new(clock)
    with pytest.raises(StoreError):
        store.enqueue([other, dup])
    assert store.get(other.id) is None and store.counts() == {"queued": 1}


def test_enqueue_wakes_listeners(store, clock):
    calls: list[int] = []
    store.on_commit.append(lambda: calls.append(1))
    store.enqueue([new(clock)])
    assert calls == [1]


def test_schema_version_mismatch_is_a_clear_error(db, clock):
    # Given a store file written by another schema version
    SQLiteStore(db, clock=clock).counts()
    with sqlite3.connect(db) as c: c.execute("UPDATE fh_meta SET value = '99' WHERE key = 'schema_version'")
    # When a store opens it, Then it refuses with both versions named
    s = SQLiteStore(db, clock=clock)
    with pytest.raises(StoreError, match=f"newer fh-tasks: schema 99, this version knows up to {SCHEMA_VERSION}"):
        s.counts()


def test_database_file_is_private(tmp_path, clock):
    # Given a permissive umask
    old = os.umask(0)
    try:
        path = tmp_path / "private.db"
        s = SQLiteStore(path, clock=clock)
        s.enqueue([new(clock)])
    finally:
        os.umask(old)
    # Then the database file and its WAL are readable and writable by the owner only
    for p in (path, tmp_path / "private.db-wal"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    s.close()


def test_missing_directory_is_a_clear_error(tmp_path, clock):
    from fh_tasks import QueueUnavailable
    s = SQLiteStore(tmp_path / "nope" / "x.db", clock=clock)
    with pytest.raises(QueueUnavailable, match="does not exist"):
        s.counts()


def test_store_uses_wal(store):
    store.counts()
    assert store._read("PRAGMA journal_mode")[0][0] == "wal"


def test_chained_job_waits_for_its_parent(store, clock):
    # Given a parent and a child chained to it
    parent = new(clock)
    child = new(clock, parent=parent.id)
    store.enqueue([parent, child])
    assert store.get(child.id).state == "waiting"
    # When only the parent can be claimed
    assert [c.id for c in store.claim("w", ["default"], 10, 30)] == [parent.id]
    # Then the child is released once the parent succeeds
    clock.advance(1)
    store.finish([Outcome("succeed", parent.id, 1, result="1")])
    assert store.get(child.id).state == "queued"
    assert [c.id for c in store.claim("w", ["default"], 10, 30)] == [child.id]


def test_failed_or_cancelled_parent_cancels_the_rest_of_the_chain(store, clock):
    a = new(clock)
    b = new(clock, parent=a.id)
    c = new(clock, parent=b.id)
    store.enqueue([a, b, c])
    store.claim("w", ["default"], 10, 30)
    store.finish([Outcome("fail", a.id, 1, error="{}")])
    assert [store.get(x.id).state for x in (b, c)] == ["cancelled", "cancelled"]
    # Cancelling the head of a chain that has not started cancels the rest too
    d = new(clock)
    e = new(clock, parent=d.id)
    store.enqueue([d, e])
    assert store.cancel(d.id)
    assert store.get(e.id).state == "cancelled"


def test_child_stored_after_its_parent_ended(store, clock):
    # Given parents that already succeeded, failed, or never existed
    ok, bad = new(clock), new(clock)
    store.enqueue([ok, bad])
    store.claim("w", ["default"], 10, 30)
    store.finish([Outcome("succeed", ok.id, 1, result="1"), Outcome("fail", bad.id, 1, error="{}")])
    after_ok, after_bad, orphan = new(clock, parent=ok.id), new(clock, parent=bad.id), new(clock, parent="gone")
    # When children are stored, Then they start at once or are cancelled at once
    store.enqueue([after_ok, after_bad, orphan])
    assert [store.get(x.id).state for x in (after_ok, after_bad, orphan)] == ["queued", "cancelled", "cancelled"]


def test_hub_with_an_injected_clock_keeps_scheduled_jobs_until_due(make_tasks, clock):
    # Given a hub on a hand-moved clock and a job deferred by 60 s
    from fh_tasks.testing import drain
    tasks = make_tasks(workers=0, clock=clock)
    ran: list[int] = []

    @tasks.task
    def later(n: int) -> None: ran.append(n)

    job = later.with_options(delay=60).defer(1)
    rec = job.get()
    assert (rec.state, rec.created_at, rec.run_at) == ("scheduled", T0, T0 + 60)
    # When workers look before it is due, Then it does not run
    clock.advance(59)
    assert drain(tasks) == 0 and ran == [] and job.get().state == "scheduled"
    # And once it is due, it runs
    clock.advance(1)
    assert drain(tasks) == 1 and ran == [1]
    assert (job.get().state, job.get().started_at, job.get().finished_at) == ("succeeded", T0 + 60, T0 + 60)


def test_checkpoint_copies_the_wal_without_the_writer(store, clock):
    # Given a few hundred commits sitting in the WAL (commits only checkpoint past ~32 MB)
    for _ in range(300): store.enqueue([new(clock)])
    # When a checkpoint runs on its own connection
    busy, frames, copied = store.checkpoint()
    # Then every committed frame was copied into the database, and the jobs are all there
    assert busy == 0 and frames > 0 and copied == frames
    assert store.counts() == {"queued": 300}


# -- waiting for another connection's lock -------------------------------------------------------------
def test_a_write_waits_for_a_lock_held_briefly_by_another_connection(store, clock, db, monkeypatch):
    # Given another connection holding the write lock, released by a thread after a few of the store's retries
    import fh_tasks.store.connection as sq
    store.enqueue([new(clock)])
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    sleeps: list[float] = []
    real_sleep = sq.time.sleep

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 5: other.execute("ROLLBACK")
        real_sleep(s)

    monkeypatch.setattr(sq.time, "sleep", sleep)
    # When the store writes meanwhile
    store.enqueue([new(clock)])
    # Then it waited with its own short, growing, jittered sleeps (not SQLite's 1 ms and up), and wrote once the lock
    # was gone
    assert len(sleeps) == 5 and store.counts() == {"queued": 2}
    assert all(0.5 * sq.BACKOFF_FIRST <= s <= 1.5 * sq.BACKOFF_MAX for s in sleeps)
    assert sleeps[-1] > sleeps[0]
    other.close()


def test_a_lock_held_past_busy_timeout_raises_queue_busy_and_other_callers_keep_sqlites_handler(db, clock):
    from fh_tasks import QueueBusy
    s = SQLiteStore(db, clock=clock, busy_timeout=0.05)
    s.enqueue([new(clock)])
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(QueueBusy):
            s.enqueue([new(clock)])
        # Reads go on meanwhile (WAL), and the connection handed to any other caller still waits by itself
        assert s.counts() == {"queued": 1}
        assert s._connect().execute("PRAGMA busy_timeout").fetchone()[0] == 50
    finally:
        other.close()
        s.close()


def test_event_triggers_exist_only_while_a_listener_is_registered(store, db, clock):
    def triggers() -> set[str]:
        with sqlite3.connect(db) as c:
            return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")} & {
                "fh_jobs_stored", "fh_jobs_changed"}

    def events() -> list[tuple[str, str]]:
        with sqlite3.connect(db) as c: return c.execute("SELECT job, kind FROM fh_events ORDER BY seq").fetchall()

    def schema() -> int:
        with sqlite3.connect(db) as c: return int(c.execute("PRAGMA schema_version").fetchone()[0])

    # Given a store nobody listens to: no event triggers, and a stored job leaves no event
    quiet = new(clock)
    store.enqueue([quiet])
    assert triggers() == set() and events() == []
    # When a listener registers, the triggers exist and changes are announced from then on
    store.listen_events("a", 30)
    assert triggers() == {"fh_jobs_stored", "fh_jobs_changed"}
    heard = new(clock)
    store.enqueue([heard])
    assert events() == [(heard.id, "stored")]
    # And renewing a registration does not touch the schema (connections keep their prepared statements)
    was = schema()
    store.listen_events("a", 30)
    assert schema() == was
    # When a second listener comes and the first leaves, a change made by another connection is still announced
    store.listen_events("b", 30)
    store.unlisten_events("a")
    with sqlite3.connect(db) as c: c.execute("UPDATE fh_jobs SET state = 'cancelled' WHERE id = ?", (quiet.id,))
    assert events()[-1] == (quiet.id, "cancelled")
    # When the last listener leaves, the triggers stay until the workers' next pruning (listeners coming and going
    # do not change the schema each time), which drops them: then changes cost no event any more
    store.unlisten_events("b")
    assert triggers() == {"fh_jobs_stored", "fh_jobs_changed"}
    store.prune_events()
    assert triggers() == set()
    store.cancel(heard.id)
    assert events()[-1] == (quiet.id, "cancelled")
    # And a listener whose process died without unregistering is expired by the pruning, triggers with it
    store.listen_events("c", 30)
    assert triggers() == {"fh_jobs_stored", "fh_jobs_changed"}
    store.prune_events()
    assert triggers() == {"fh_jobs_stored", "fh_jobs_changed"}
    clock.advance(60)
    store.prune_events()
    assert triggers() == set()


def test_no_index_or_trigger_condition_lists_three_values_or_more(store, db):
    # SQLite evaluates `x IN ('a', 'b', 'c')` by building a temporary table of the values once per statement, and an
    # index's condition is evaluated on every insert and update of its columns: the conditions use OR instead
    store.listen_events("a", 30)  # the job-event triggers exist while somebody listens
    with sqlite3.connect(db) as c:
        schema = c.execute("SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger') "
                           "AND sql IS NOT NULL").fetchall()
    assert {"fh_jobs_due", "fh_jobs_ukey", "fh_jobs_stored", "fh_jobs_changed"} <= {n for _, n, _ in schema}
    long_lists = [n for _, n, sql in schema if re.search(r"\bIN\s*\(\s*'[^)]*',[^)]*,[^)]*\)", sql, re.I)]
    assert long_lists == []


def test_the_group_index_is_left_alone_when_a_job_changes_state(store, db):
    # SQLite looks at every index that names a column an UPDATE sets, to keep it right: an index of group members
    # keyed or filtered by `state` cost every claim and every outcome of every job a look. It names `grp` alone.
    store.counts()
    with sqlite3.connect(db) as c:
        (sql,) = c.execute("SELECT sql FROM sqlite_master WHERE name = 'fh_jobs_grp'").fetchone()
        assert "grp IS NOT NULL" in sql and "state" not in sql
        plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN SELECT id, state FROM fh_jobs WHERE grp = 'g'")]
    assert plan == ["SEARCH fh_jobs USING INDEX fh_jobs_grp (grp=?)"]


def test_statements_given_job_ids_find_them_through_the_id_index(store, db):
    # A worker records successes while jobs of chains wait, and checks its running jobs for cancellation: those
    # statements look up the ids they are given, and never read every waiting, succeeded or cancelled job of the
    # store (with 200,000 jobs in one such state, each took tens of milliseconds a round, holding the write lock)
    from fh_tasks.store.sqlite import Q
    store.counts()  # the file exists, with its schema
    with sqlite3.connect(db) as c:
        for name in ("release_children_of", "release_groups_of", "cancelled_among"):
            sql = Q[name]
            plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql, dict.fromkeys(re.findall(r":(\w+)", sql)))]
            assert not any("fh_jobs_state" in p for p in plan), (name, plan)
            assert any("sqlite_autoindex_fh_jobs_1 (id=?)" in p for p in plan), (name, plan)
        # And the chains' next steps are found from their parents, not among every waiting job
        plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + Q["release_children_of"], {"ids": "[]", "now": 0})]
        assert "SEARCH fh_jobs USING INDEX fh_jobs_waiting (parent=?)" in plan
        # And whether any job waits or is suspect (read before those two run, and before a claim) is one look at the
        # waiting jobs' index and the suspect jobs' index
        plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + Q["look"])]
        assert [p for p in plan if p.startswith("SCAN fh_jobs")] == [
            "SCAN fh_jobs USING INDEX fh_jobs_waiting", "SCAN fh_jobs USING INDEX fh_jobs_suspect"], plan


def test_listeners_coming_and_going_while_jobs_are_stored_and_run_lose_nothing(db):
    # Given a store whose event triggers come and go as listeners register and leave (a schema change each time,
    # which every other connection meets at its next statement)
    import asyncio

    from fh_tasks import Tasks
    tasks = Tasks(db=db, workers=0)

    @tasks.task(name="churn.noop")
    def noop(i: int) -> int:
        return i

    done, errors = threading.Event(), []

    def churn() -> None:
        s = SQLiteStore(db)
        try:
            n = 0
            while not done.is_set():  # as fast as it goes: far more often than the workers' pruning would
                s.listen_events(f"l{n % 2}", 30)
                if n % 2:
                    s.unlisten_events("l0"); s.unlisten_events("l1")
                    s.prune_events()
                n += 1
            assert n > 20
        except Exception as e: errors.append(e)
        finally:
            s.unlisten_events("l0"); s.unlisten_events("l1"); s.prune_events(); s.close()

    def produce() -> None:
        try:
            other = Tasks(db=db, workers=0)
            t = other.task(name="churn.noop")(lambda i: i)
            for i in range(600): t.defer(i)
        except Exception as e: errors.append(e)

    threads = [threading.Thread(target=churn), threading.Thread(target=produce)]
    for t in threads: t.start()
    # When a worker runs the jobs meanwhile
    try:
        while threads[1].is_alive() or tasks.counts().get("queued"):
            asyncio.run(tasks.worker(burst=True, concurrency=4).run())
    finally:
        done.set()
        for t in threads: t.join()
    # Then every job ran once and succeeded, nothing failed, and no trigger is left behind
    assert errors == [] and tasks.counts() == {"succeeded": 600}
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('fh_jobs_stored', 'fh_jobs_changed')"
                         ).fetchone()[0] == 0
    tasks.store.close()


def test_a_statement_that_meets_a_schema_change_is_run_again(db):
    # SQLite re-prepares a statement whose schema changed a bounded number of times, then answers "database schema has
    # changed": nothing was done, and the store runs it again, as it does for a busy store
    s = SQLiteStore(db)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3: raise sqlite3.OperationalError("database schema has changed")
        return "done"

    assert s._retrying(flaky) == "done" and len(calls) == 3
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        s._retrying(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("no such table: x")))
    s.close()
