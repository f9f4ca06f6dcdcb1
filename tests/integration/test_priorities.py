"""Priorities, aging, queue order (strict and weighted) and `at=` on the SQLite engine: real store files, the real
worker; the claim reads the due index in rank order (run_at - priority * 60, then seq) and stays O(batch)."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from fh_tasks import Tasks
from fh_tasks.cli import build_parser
from fh_tasks.records import NewJob, QueueOrder
from fh_tasks.store.sqlite import SQLiteStore, _per_queue
from fh_tasks.task import new_id


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None: self.t = t
    def __call__(self) -> float: return self.t


def job(clock: Clock, priority: int = 0, queue: str = "default", delay: float = 0.0, task: str = "t") -> NewJob:
    now = clock()
    return NewJob(id=new_id(), task=task, args="[[],{}]", queue=queue, run_at=now + delay, created_at=now,
                  priority=priority)


def claim_ids(store: SQLiteStore, n: int = 1, queues: tuple[str, ...] = ("default",), **kw: Any) -> list[str]:
    return [c.id for c in store.finish_and_claim((), "w", queues, n, 30.0, **kw)[1]]


def run_burst(tasks: Tasks, **kw: Any) -> None:
    asyncio.run(tasks.worker(burst=True, poll_interval=0.01, **kw).run())


# -- priorities -------------------------------------------------------------------------------------------------
def test_a_high_priority_job_starts_next_in_a_running_worker_with_1000_low_ones_queued(make_tasks):
    # Given a worker running one job at a time through 1,000 queued low-priority jobs
    tasks = make_tasks(workers=0)
    started: list[str] = []

    @tasks.task(name="prio:step")
    async def step(name: str) -> None:
        started.append(name)
        await asyncio.sleep(0.001)

    step.defer_many([(f"low{i}",) for i in range(1000)])

    async def main() -> int:
        w = tasks.worker(concurrency=1, poll_interval=0.01)
        run = asyncio.ensure_future(w.run())
        while len(started) < 5: await asyncio.sleep(0.001)
        # When a high-priority job is deferred
        seen = len(started)
        step.with_options(priority=10).defer("high")
        while "high" not in started: await asyncio.sleep(0.001)
        w.stop(now=True)
        await run
        return seen

    seen = asyncio.run(main())
    # Then it starts next, ahead of the ~990 still queued (at most the one claimed meanwhile goes before it)
    assert started.index("high") <= seen + 1, (seen, started.index("high"))
    assert len(started) < 50


def test_higher_priority_first_then_age_then_seq_with_a_controlled_clock(tmp_path):
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    t0 = clock()
    low = job(clock)                          # rank t0
    store.enqueue([low])
    highs = []
    for dt in (100, 200, 300, 400):           # priority 5: a job ranks as if due 300 s earlier
        clock.t = t0 + dt
        highs.append(job(clock, priority=5))  # ranks t0-200, t0-100, t0, t0+100
        store.enqueue([highs[-1]])
    # The two high jobs made within 5 minutes of the low one overtake it; the low one, older, goes before a high one
    # of the same rank (seq breaks ties) and before any later one: a steady stream of high jobs cannot starve it
    order = [claim_ids(store)[0] for _ in range(5)]
    assert order == [highs[0].id, highs[1].id, low.id, highs[2].id, highs[3].id]
    store.close()


def test_a_steady_stream_of_high_priority_jobs_does_not_starve_a_low_one(tmp_path):
    # Given a low job, then every 10 s a new priority-100 job while a worker takes one job per 10 s
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    low = job(clock)
    store.enqueue([low])
    taken = []
    for _ in range(1000):
        clock.t += 10
        store.enqueue([job(clock, priority=100)])
        taken += claim_ids(store)
        if low.id in taken: break
    # Then the low job runs once it has waited 100 minutes (the stream's jobs rank now - 6000 s)
    assert low.id in taken
    assert 590 <= len(taken) <= 610, len(taken)
    store.close()


def test_a_delayed_high_priority_job_waits_for_its_time_then_goes_first(tmp_path):
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    later = job(clock, priority=100, delay=60)  # ranks 100 minutes before the others, but is not due for a minute
    lows = [job(clock) for _ in range(3)]
    store.enqueue([later, *lows])
    assert claim_ids(store) == [lows[0].id]
    assert store.next_due(["default"]) == lows[1].run_at  # due now
    clock.t += 60
    assert claim_ids(store, 2) == [later.id, lows[1].id]
    store.close()


def test_negative_priority_waits_behind_others_but_is_claimed_when_alone(tmp_path):
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    back = job(clock, priority=-10)
    store.enqueue([back])
    clock.t += 1
    normal = job(clock)
    store.enqueue([normal])
    assert claim_ids(store, 5) == [normal.id, back.id]  # due order: its rank is 10 minutes later
    # Alone, a due job of the lowest priority is found (the claim reads the index up to now + 100 minutes)
    lowest = job(clock, priority=-100)
    store.enqueue([lowest])
    assert store.next_due(["default"]) == lowest.run_at and claim_ids(store) == [lowest.id]
    store.close()


def test_claim_any_due_and_first_due_read_the_due_index_by_rank(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    store.counts()
    c = sqlite3.connect(tmp_path / "s.db")
    p = {"worker": "w", "lease_until": 1, "now": 1, "limit": 5, "tasks": '["t"]', "q0": "a", "q1": "b", "ordered": 0}
    try:
        for outer in ("claim", "any_due", "first_due"):
            plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + _per_queue(outer, "due", 2), p)]
            assert sum("USING INDEX fh_jobs_due (queue=? AND <expr><?)" in r for r in plan) == 2, (outer, plan)
            assert not any(r.startswith("SCAN fh_jobs") for r in plan), (outer, plan)
        plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + _per_queue("next_due", "next_due_one", 2), p)]
        assert sum("fh_jobs_later (queue=?)" in r for r in plan) == 2 and not any(r.startswith("SCAN fh_jobs")
                                                                                 for r in plan), plan
    finally: c.close()
    store.close()


def test_the_claim_stays_o_batch_with_many_delayed_jobs_and_many_due_ones(tmp_path):
    "SQLite's VM steps for one claim do not grow with the jobs that are not due, nor with the due backlog."
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)

    def steps(query: str, **extra: Any) -> int:
        c = sqlite3.connect(tmp_path / "s.db")
        n = [0]
        c.set_progress_handler(lambda: n.__setitem__(0, n[0] + 1) or 0, 100)
        p = {"worker": "w", "lease_until": 1, "now": clock(), "limit": 8, "tasks": None, "q0": "default",
             "ordered": 0, **extra}
        try:
            if query == "claim": c.execute("BEGIN"); c.execute(_per_queue("claim", "due", 1), p).fetchall()
            else: c.execute(_per_queue(query, "due" if query != "next_due" else "next_due_one", 1), p).fetchall()
            return n[0]
        finally:
            if c.in_transaction: c.execute("ROLLBACK")
            c.close()

    store.enqueue([job(clock) for _ in range(20)])
    small = {q: steps(q) for q in ("claim", "any_due", "next_due")}
    store.enqueue([job(clock, delay=d) for d in range(1, 20_001)])          # 20,000 delayed jobs (up to 5.5 h)
    store.enqueue([job(clock, priority=p % 50) for p in range(20_000)])    # a 20,000-job due backlog
    big = {q: steps(q) for q in ("claim", "any_due", "next_due")}
    for q in small: assert big[q] <= 3 * small[q] + 20, (q, small, big)
    store.close()


def test_a_request_handoff_does_not_jump_over_a_stored_job_that_ranks_first(tmp_path):
    clock = Clock()
    store = SQLiteStore(tmp_path / "s.db", clock=clock)
    queued_high = job(clock, priority=5)
    store.enqueue([queued_high])
    # A new low job for an in-process worker with a free slot is stored as queued, not handed off
    low = job(clock)
    _, claims = store.enqueue_claimed([low], 1, "w", 30.0, queues=["default"])
    assert claims == [] and store.get(low.id).state == "queued"
    # A new job that ranks before every stored one is handed off
    top = job(clock, priority=50)
    _, claims = store.enqueue_claimed([top], 1, "w", 30.0, queues=["default"])
    assert [c.id for c in claims] == [top.id] and store.get(top.id).state == "running"
    # With strict or weighted queues, nothing is handed off while any job of the worker's queues is due
    other = job(clock, priority=100, queue="high")
    _, claims = store.enqueue_claimed([other], 1, "w", 30.0, queues=["high", "default"], ordered=True)
    assert claims == []
    assert claim_ids(store, 5, ("high", "default")) == [other.id, queued_high.id, low.id]
    store.close()


# -- queue order ------------------------------------------------------------------------------------------------
def _two_queues(make_tasks: Any, queues: Any, strict: bool = False, n: int = 200) -> tuple[Tasks, list[str]]:
    tasks = make_tasks(workers=0, queues=queues, strict_queues=strict)
    started: list[str] = []

    @tasks.task(name="order:hi", queue="high")
    async def hi() -> None: started.append("high")

    @tasks.task(name="order:lo", queue="default")
    async def lo() -> None: started.append("default")

    lo.defer_many([()] * n)  # the default queue's jobs are older: merged order would run them first
    hi.defer_many([()] * n)
    return tasks, started


def test_strict_queue_order_runs_every_due_job_of_the_first_queue_first(make_tasks):
    tasks, started = _two_queues(make_tasks, ["high", "default"], strict=True, n=100)
    assert tasks.queue_order.mode == "strict"
    run_burst(tasks, concurrency=4)
    assert started == ["high"] * 100 + ["default"] * 100


def test_merged_queues_keep_due_order_across_queues(make_tasks):
    tasks, started = _two_queues(make_tasks, "high,default", n=50)
    run_burst(tasks, concurrency=4)
    assert started == ["default"] * 50 + ["high"] * 50


def test_weighted_queues_are_drawn_in_proportion(make_tasks):
    # Given 400 jobs in each of two queues weighted 3:1, and a worker taking one job per claim
    tasks, started = _two_queues(make_tasks, {"high": 3, "default": 1}, n=400)
    w = tasks.worker(burst=True, concurrency=1, poll_interval=0.01)
    assert w.queue_order.weights == (3.0, 1.0)
    w.rng.seed(20240601)
    asyncio.run(w.run())
    # Then while both queues have jobs, about three claims in four take the high queue
    share = started[:400].count("high") / 400
    assert 0.70 <= share <= 0.80, share
    assert sorted(started) == ["default"] * 400 + ["high"] * 400


@pytest.mark.parametrize("queues, strict, error", [
    ("high=3,default", False, "give every queue a weight"),
    ("high=0,default=1", False, "weight must be a number > 0"),
    ({"high": -1}, False, "weight must be a number > 0"),
    ("high=x", False, "weight must be a number > 0, not 'x'"),
    ("high=3,default=1", True, "taken by weight"),
    ("a,a", False, "twice"),
    (",", False, "names no queue"),
])
def test_bad_queue_orders_are_refused_clearly(make_tasks, queues, strict, error):
    with pytest.raises(ValueError, match=error): make_tasks(workers=0, queues=queues, strict_queues=strict)


def test_the_worker_command_reads_weights_and_strict_order(capsys):
    args = build_parser().parse_args(["worker", "app:tasks", "--queues", "high=3,default=1"])
    assert args.queues == QueueOrder(("high", "default"), (3.0, 1.0)) and str(args.queues) == "high=3,default=1"
    assert build_parser().parse_args(["worker", "x:y", "--queues", "a,b", "--strict-queues"]).strict_queues
    with pytest.raises(SystemExit): build_parser().parse_args(["worker", "x:y", "--queues", "a=1,b=-1"])
    assert "weight must be a number > 0" in capsys.readouterr().err


# -- at= --------------------------------------------------------------------------------------------------------
def test_at_in_another_timezone_runs_at_that_instant(make_tasks):
    tasks = make_tasks(workers=0)
    ran: list[float] = []

    @tasks.task(name="at:ping")
    def ping() -> None: ran.append(time.time())

    at = datetime.now(ZoneInfo("Asia/Tokyo")) + timedelta(seconds=0.6)
    j = ping.with_options(at=at).defer()
    rec = tasks.get(j.id)
    assert rec.state.value == "scheduled" and rec.run_at == pytest.approx(at.timestamp(), abs=1e-6)
    assert rec.run_at == pytest.approx(at.astimezone(timezone.utc).timestamp(), abs=1e-6)  # UTC Unix seconds

    async def serve() -> None:
        w = tasks.worker(poll_interval=0.01)
        run = asyncio.ensure_future(w.run())
        deadline = time.monotonic() + 10
        while not ran and time.monotonic() < deadline: await asyncio.sleep(0.01)
        w.stop()
        await run

    asyncio.run(serve())
    # Not before the instant, and soon after it
    assert ran and at.timestamp() <= ran[0] < at.timestamp() + 0.5, (ran, at.timestamp())
    assert tasks.get(j.id).state.value == "succeeded"


def test_at_in_the_past_runs_now_and_naive_or_with_delay_is_refused(make_tasks):
    tasks = make_tasks(workers=0)

    @tasks.task(name="at:now")
    def now() -> int: return 1

    past = now.with_options(at=datetime(2001, 1, 1, tzinfo=timezone.utc)).defer()
    assert tasks.get(past.id).state.value == "queued"
    with pytest.raises(ValueError, match=r"at must be a timezone-aware datetime, not the naive 2030-01-01T08:00.*"
                                         r"task at:now"):
        now.with_options(at=datetime(2030, 1, 1, 8))
    with pytest.raises(ValueError, match="at= or delay=, not both"):
        now.with_options(at=datetime.now(timezone.utc), delay=5)
    with pytest.raises(ValueError, match="timezone-aware datetime"): now.with_options(at=1700000000)
    with pytest.raises(TypeError, match=r"at= is given per call.*with_options\(at=\.\.\.\)"):
        tasks.task(name="at:bad", at=datetime.now(timezone.utc))(lambda: None)
    for bad in (101, -101, True, 1.5, "1"):
        with pytest.raises(ValueError, match="priority must be an int from -100 to 100"):
            now.with_options(priority=bad)
    with pytest.raises(ValueError, match="priority must be an int"): tasks.task(name="p:bad", priority=500)
    run_burst(tasks)
    assert tasks.get(past.id).state.value == "succeeded"


@pytest.mark.parametrize("engine", ["celery", "dramatiq"])
def test_broker_engines_refuse_priorities_keys_and_queue_orders_when_configured(tmp_path, engine):
    __import__(engine)  # a dev dependency: missing, the test fails
    tasks = Tasks(engine=engine, broker="redis://127.0.0.1:1/0", db=str(tmp_path / "o.db"))
    try:
        assert tasks.engine.capabilities.schedule_at  # its delays take any run_at
        with pytest.raises(Exception, match=rf"the {engine} engine cannot give tasks a priority.*'priorities'"):
            tasks.task(name="b:p", priority=3)(lambda: None)
        t = tasks.task(name="b:t")(lambda: None)
        with pytest.raises(Exception, match=r"cannot give b:t a priority .*'priorities' is missing"):
            t.with_options(priority=1)
        with pytest.raises(Exception, match=r"cannot keep b:t's jobs unique by key .*'unique' is missing"):
            t.with_options(key="k")
        t.with_options(priority=0, at=datetime.now(timezone.utc))  # fine: no priority, and at= works there
    finally:
        tasks.close()
    for queues, strict in (({"a": 2, "b": 1}, False), (["a", "b"], True)):
        with pytest.raises(Exception, match=rf"the {engine} engine cannot take queues by .* order.*'queue_order'"):
            Tasks(engine=engine, broker="redis://127.0.0.1:1/0", db=str(tmp_path / "o.db"), queues=queues,
                  strict_queues=strict)


def test_a_0_1_0_store_gets_the_rank_index_and_claims_by_priority(tmp_path):
    import shutil

    from support import ROOT
    db = tmp_path / "old.db"
    shutil.copyfile(ROOT / "tests" / "fixtures" / "fh_tasks-0.1.0.db", db)
    store = SQLiteStore(db)
    store.counts()  # opening migrates
    c = sqlite3.connect(db)
    try:
        sql = dict(c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'").fetchall())
        assert "(queue, run_at - priority * 60.0, seq, task)" in sql["fh_jobs_due"]
        assert {"fh_jobs_lowered", "fh_jobs_later", "fh_jobs_ukey"} <= set(sql)
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally: c.close()
    # Its old jobs (priority 0) and new ones are claimed in rank order
    clock = Clock(time.time() + 10)
    store.clock = clock
    new = [job(clock, priority=p) for p in (0, 100, -5)]
    store.enqueue(new)
    queues = tuple(sorted({r[0] for r in store._read("SELECT DISTINCT queue FROM fh_jobs")}))
    got = claim_ids(store, 64, queues)
    ranks = [store._read("SELECT run_at - priority * 60.0 FROM fh_jobs WHERE id = ?", (i,))[0][0] for i in got]
    assert ranks == sorted(ranks) and {j.id for j in new} <= set(got) and len(got) > 3
    store.close()
