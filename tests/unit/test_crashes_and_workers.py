"""SQLiteStore on a real file: a dead worker's crash is charged to the job that ran alone, the others are excused and
run alone from then on; a worker claims only the tasks it can run; workers register themselves."""
from __future__ import annotations

import json
import sqlite3
import uuid

import pytest

from fh_tasks.store import NewJob, Outcome, WorkerInfo
from fh_tasks.store.sqlite import CRASH_ATTEMPTS, WORKER_STALE_LEASES, SQLiteStore

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


def new(clock: Clock, task: str = "t", attempts: int = 1, queue: str = "default") -> NewJob:
    return NewJob(id=uuid.uuid4().hex, task=task, args='{"kwargs":{}}', queue=queue, max_attempts=attempts,
                  run_at=clock(), created_at=clock())


def claim(store: SQLiteStore, worker: str, limit: int = 10, *, alone: bool = False, tasks: list[str] | None = None,
          lease: float = 10, queues: tuple[str, ...] = ("default",)):
    return store.finish_and_claim((), worker, queues, limit, lease, alone=alone,
                                  tasks=None if tasks is None else json.dumps(tasks))[1]


def row(db: str, id: str) -> dict:
    c = sqlite3.connect(db)
    c.row_factory = sqlite3.Row
    try: return dict(c.execute("SELECT * FROM fh_jobs WHERE id = ?", (id,)).fetchone())
    finally: c.close()


def info(id: str, pid: int = 1, tasks: tuple[str, ...] = ("t",), lease: float = 10) -> WorkerInfo:
    return WorkerInfo(id, "host", pid, ("default",), tasks, 8, lease)


def test_jobs_that_ran_beside_others_are_excused_and_run_alone_after(store, clock, db):
    # Given three jobs without retries, claimed together by one worker
    jobs = [new(clock) for _ in range(3)]
    store.enqueue(jobs)
    assert len(claim(store, "w1")) == 3
    # When the worker dies and its leases run out
    clock.advance(11)
    assert sorted(store.expire()) == sorted((j.id, "queued") for j in jobs)
    # Then none is charged the attempt: it is excused (max_attempts grows with it), and each is now suspect
    for j in jobs:
        r = row(db, j.id)
        assert (r["state"], r["attempts"], r["excused"], r["max_attempts"], r["lost"]) == ("queued", 1, 1, 2, 1)
        err = json.loads(r["error"])
        assert err["type"] == "WorkerLost" and "beside 2 other job(s): the attempt is not charged" in err["message"]
    # And a busy worker claims none of them (nor anything else) while they wait: they run alone
    store.enqueue([fresh := new(clock)])
    assert claim(store, "w2", alone=False) == [] and store.suspect_due(["default"])
    # And a worker with nothing running takes exactly one, oldest first, marked suspect; attempt 2 of 2 in all
    first = claim(store, "w2", alone=True)
    assert [(c.id, c.suspect, c.attempt, c.max_attempts) for c in first] == [(jobs[0].id, True, 2, 2)]
    assert store.finish([Outcome("succeed", jobs[0].id, 2, result="1")]) == 1
    for j in jobs[1:]:
        assert [c.id for c in claim(store, "w2", alone=True)] == [j.id]
        assert store.finish([Outcome("succeed", j.id, 2, result="1")]) == 1
    # And once no suspect job waits, the others are claimed as usual, and are not suspect
    assert not store.suspect_due(["default"])
    assert [(c.id, c.suspect) for c in claim(store, "w2", alone=False)] == [(fresh.id, False)]


def test_a_job_that_kills_its_worker_alone_is_charged_until_it_fails(store, clock, db):
    # Given a poison job that was claimed with two others, and their worker died
    poison, *others = jobs = [new(clock) for _ in range(3)]
    store.enqueue(jobs)
    claim(store, "w0")
    clock.advance(11)
    store.expire()
    tokens = [1]
    # When it then runs alone and its worker dies each time
    for n in range(1, CRASH_ATTEMPTS + 1):
        got = claim(store, f"w{n}", alone=True)
        assert [c.id for c in got] == [poison.id]
        tokens.append(got[0].attempt)
        clock.advance(11)
        assert store.expire() == [(poison.id, "failed" if n == CRASH_ATTEMPTS else "queued")]
    # Then it is charged one attempt per lone crash and fails (WorkerLost) after CRASH_ATTEMPTS of them,
    # while its fencing token only ever grew
    r = row(db, poison.id)
    assert (r["state"], r["attempts"] - r["excused"], r["lost"]) == ("failed", CRASH_ATTEMPTS, CRASH_ATTEMPTS + 1)
    assert json.loads(r["error"])["type"] == "WorkerLost" and r["finished_at"] == clock()
    assert tokens == sorted(set(tokens)) == [1, 2, 3, 4]
    # And its neighbours were never charged: they run next, one at a time, and succeed
    for j in others:
        c = claim(store, "w9", alone=True)[0]
        assert c.id == j.id and c.attempt - row(db, j.id)["excused"] == 1
        assert store.finish([Outcome("succeed", j.id, c.attempt, result="1")]) == 1


def test_an_excused_run_gives_no_extra_retry_after_a_real_failure(store, clock):
    # Given a job without retries whose first run was lost beside another job
    a, b = new(clock), new(clock)
    store.enqueue([a, b])
    claim(store, "w1")
    clock.advance(11)
    store.expire()
    # When it runs again, Then its claim says attempt 2 of 2: a failure now is final (attempt < max_attempts is false)
    c = claim(store, "w2", alone=True)[0]
    assert (c.attempt, c.max_attempts) == (2, 2)
    # And requeueing it by hand gives it its one attempt again, after the runs so far (the fencing token goes on)
    assert store.finish([Outcome("fail", c.id, c.attempt, error='{"type": "E", "message": "m"}')]) == 1
    assert store.requeue(c.id)
    rec = store.get(c.id)
    assert rec is not None and (rec.attempts, rec.max_attempts) == (2, 3)
    again = [x for x in claim(store, "w3", 10, alone=True) + claim(store, "w4", 10, alone=True) if x.id == c.id]
    assert [(x.attempt, x.max_attempts) for x in again] == [(3, 3)]


def test_a_worker_is_taken_back_whole_once_all_its_leases_ran_out(store, clock, db):
    # Given a worker holding a job claimed at T0 and another claimed 5 s later (10 s leases)
    a, b = new(clock), new(clock)
    store.enqueue([a])
    claim(store, "w1", 1)
    clock.advance(5)
    store.enqueue([b])
    claim(store, "w1", 1)
    # When only the first lease has run out, Then nothing is taken back yet (the worker may just be slow)
    clock.advance(6)
    assert store.expire() == []
    # When both have, Then both are taken back together, as jobs that ran beside each other (excused)
    clock.advance(5)
    assert sorted(store.expire()) == sorted([(a.id, "queued"), (b.id, "queued")])
    assert [row(db, j.id)["excused"] for j in (a, b)] == [1, 1]


def test_jobs_count_as_neighbours_per_process(store, clock, db):
    # Given two workers of one process and a worker of another, each holding one job
    store.register_worker(info("p1-a", pid=1))
    store.register_worker(info("p1-b", pid=1))
    store.register_worker(info("p2", pid=2))
    a, b, c = new(clock), new(clock), new(clock)
    for worker, j in (("p1-a", a), ("p1-b", b), ("p2", c)):
        store.enqueue([j])
        claim(store, worker, 1)
    # When all three die
    clock.advance(11)
    assert len(store.expire()) == 3
    # Then the two jobs that shared a process are excused, and the one alone in its process is charged
    assert [(row(db, j.id)["attempts"], row(db, j.id)["excused"]) for j in (a, b, c)] == [(1, 1), (1, 1), (1, 0)]


def test_a_worker_claims_only_the_tasks_it_can_run(store, clock):
    # Given jobs of tasks a, b and c, in two queues
    jobs = [new(clock, task=t, queue=q) for t in "abc" for q in ("default", "mail")]
    store.enqueue(jobs)
    # When a worker that can run a and c claims from both queues, Then it gets only those, oldest first
    got = claim(store, "w", 10, tasks=["a", "c"], queues=("default", "mail"))
    assert [(c.task, c.queue) for c in got] == [("a", "default"), ("a", "mail"), ("c", "default"), ("c", "mail")]
    # And the jobs of b stay queued, untouched, for a worker that can run them
    assert claim(store, "w", 10, tasks=["a", "c"], queues=("default", "mail")) == []
    assert [(r.task, r.state.value, r.attempts) for r in store.jobs(task="b")] == [("b", "queued", 0)] * 2
    assert store.waiting_by_task() == [("b", "default", 1, 0), ("b", "mail", 1, 0)]
    # And a worker that knows no task claims nothing
    assert claim(store, "w", 10, tasks=[], queues=("default", "mail")) == []
    # And none of b's jobs tells the worker a job is due (it would wake up for nothing, again and again)
    assert store.next_due(["default", "mail"], json.dumps(["a", "c"])) is None
    assert store.next_due(["default", "mail"]) == clock()


def test_next_due_ignores_a_run_at_that_is_not_a_time(store, clock, db):
    store.enqueue([j := new(clock)])
    with sqlite3.connect(db) as c: c.execute("UPDATE fh_jobs SET run_at = 'soon' WHERE id = ?", (j.id,))
    assert store.next_due(["default"]) is None and claim(store, "w") == []


def test_the_claim_reads_the_due_index_in_order(store, clock, db):
    store.enqueue([new(clock)])
    from fh_tasks.store.sqlite import Q, _per_queue
    c = sqlite3.connect(db)
    try:
        plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + _per_queue("claim", "due", 2),
                                        {"worker": "w", "lease_until": 1, "now": 1, "limit": 5, "tasks": '["t"]',
                                         "q0": "default", "q1": "mail", "ordered": 0})]
        suspect = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + Q["suspect"],
                                           {"now": 1, "queues": '["default"]', "tasks": '["t"]'})]
    finally: c.close()
    assert sum("USING INDEX fh_jobs_due (queue=? AND <expr><?)" in p for p in plan) == 2, plan  # the due rank
    assert not any(p.startswith("SCAN fh_jobs") for p in plan), plan
    assert any("fh_jobs_suspect" in p for p in suspect) and not any(p.startswith("SCAN fh_jobs") for p in suspect)


def test_workers_register_renew_and_go(store, clock):
    # Given a registered worker
    store.register_worker(info("w1", tasks=("a", "b")))
    [w] = store.workers()
    assert (w.id, w.host, w.pid, w.queues, w.tasks, w.concurrency, w.live) == ("w1", "host", 1, ("default",),
                                                                              ("a", "b"), 8, True)
    # When it stays silent for a few lease periods, Then it is no longer live
    clock.advance(10 * WORKER_STALE_LEASES + 1)
    assert [w.live for w in store.workers()] == [False]
    # And the next sweep forgets it (it holds no running job)
    store.expire()
    assert store.workers() == []
    # When a forgotten worker's heartbeat comes, Then it is registered again, live
    store.heartbeat("w1", 10, info("w1"))
    assert [(w.id, w.live) for w in store.workers()] == [("w1", True)]
    # And a heartbeat renews it
    clock.advance(25)
    store.heartbeat("w1", 10)
    assert store.workers()[0].last_seen == clock()
    # When it stops cleanly, Then it is gone
    store.unregister_worker("w1")
    assert store.workers() == []


def test_a_dead_workers_row_outlives_its_jobs_lease(store, clock, db):
    # Given a registered worker holding a job, which dies
    store.register_worker(info("w1", pid=7))
    store.enqueue([j := new(clock)])
    claim(store, "w1", 1)
    # When its lease has run out, Then the job is taken back (charged: it ran alone in its process)
    clock.advance(11)
    assert store.expire() == [(j.id, "queued")]
    assert (row(db, j.id)["attempts"], row(db, j.id)["excused"]) == (1, 0)
    # And the row stays until it is stale, then goes
    assert [w.id for w in store.workers()] == ["w1"]
    clock.advance(10 * WORKER_STALE_LEASES)
    store.expire()
    assert store.workers() == []
