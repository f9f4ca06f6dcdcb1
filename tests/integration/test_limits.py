"""Concurrency and rate limits on the SQLite engine, in one process: declarations and their errors, the key a job
counts against, the claim step that enforces them (real store files, the store's own clock moved by hand), and the
worker that waits for a slot without spinning. Across worker processes: tests/acceptance/test_limits_processes.py."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from fh_tasks import Tasks, Unsupported
from fh_tasks.encoding import decode_args
from fh_tasks.limits import parse_rate
from fh_tasks.records import Outcome
from fh_tasks.testing import drain


class Clock:
    "A clock the test moves: the store's notion of now."
    def __init__(self) -> None: self.t = 1_000_000.0
    def __call__(self) -> float: return self.t


def limit_keys(db: str) -> dict[str, str | None]:
    "'task args kwargs' -> limit_key, read with a plain connection."
    c = sqlite3.connect(db)
    try: rows = c.execute("SELECT task, args, limit_key FROM fh_jobs ORDER BY seq").fetchall()
    finally: c.close()
    return {f"{t} {decode_args(a)[0]} {decode_args(a)[1]}": k for t, a, k in rows}


# -- declarations -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [("10/s", (10, 1.0)), ("30/m", (30, 60.0)), ("100/h", (100, 3600.0)),
                                             ("5/d", (5, 86400.0)), (" 3 / 10s ", (3, 10.0)), ("2/1.5m", (2, 90.0)),
                                             ((4, 2), (4, 2.0)), ((1, 0.25), (1, 0.25))])
def test_rates_are_read_in_the_usual_forms(value: Any, expected: tuple[int, float]) -> None:
    assert parse_rate(value) == expected


@pytest.mark.parametrize("options, message", [
    ({"concurrency": 0}, "concurrency must be a whole number >= 1"),
    ({"concurrency": True}, "concurrency must be a whole number >= 1"),
    ({"concurrency": 1.5}, "concurrency must be a whole number >= 1"),
    ({"rate": "10/x"}, "rate must look like '10/s'"),
    ({"rate": "ten/s"}, "rate must look like '10/s'"),
    ({"rate": "0/s"}, "at least 1 start per a positive number of seconds"),
    ({"rate": "1/0s"}, "at least 1 start per a positive number of seconds"),
    ({"rate": (3,)}, "rate must be a string like '10/s' or a tuple"),
    ({"rate": (1.5, 1)}, r"rate as a tuple is \(starts: int, seconds: number\)"),
    ({"rate": 10}, "rate must be a string like '10/s' or a tuple"),
    ({"concurrency": 1, "limit_by": "customer"}, "limit_by must be a function"),
])
def test_bad_limit_declarations_are_refused_at_the_decorator(make_tasks: Any, options: dict[str, Any],
                                                              message: str) -> None:
    tasks = make_tasks(workers=0)
    with pytest.raises(ValueError, match=message) as e:
        tasks.task(**options)(lambda: None)
    # And the error names the option
    assert f"task option {next(iter(options))}=" in str(e.value) or "limit_by" in str(e.value)


def test_limit_by_without_a_limit_is_refused_naming_the_task(make_tasks: Any) -> None:
    tasks = make_tasks(workers=0)
    with pytest.raises(ValueError, match=r"task t1: limit_by needs concurrency= or rate="):
        tasks.task(name="t1", limit_by=lambda **_: "k")(lambda: None)
    assert "t1" not in tasks.registry


def test_limit_keys_per_call_are_checked_at_with_options(make_tasks: Any) -> None:
    tasks = make_tasks(workers=0)
    free = tasks.task(name="free")(lambda x: x)
    capped = tasks.task(name="capped", concurrency=1)(lambda x: x)
    # A key for a task without limits: nothing would count it
    with pytest.raises(ValueError, match=r"free: limit_key='k' given, but the task declares no limit"):
        free.with_options(limit_key="k")
    with pytest.raises(ValueError, match="capped: limit_key must be a non-empty str"):
        capped.with_options(limit_key="")
    with pytest.raises(ValueError, match="capped: limit_key must be a non-empty str"):
        capped.with_options(limit_key=42)
    with pytest.raises(ValueError, match="capped: limit_key must be a non-empty str of at most 500"):
        capped.with_options(limit_key="k" * 501)


def test_a_limit_by_that_fails_refuses_the_call_naming_the_task(make_tasks: Any, db: str) -> None:
    tasks = make_tasks(workers=0)
    t = tasks.task(name="sync", concurrency=1, limit_by=lambda customer_id, **_: f"customer:{customer_id}")(
        lambda customer_id, full=False: None)
    bad = tasks.task(name="bad", concurrency=1, limit_by=lambda **_: None)(lambda x: None)
    with pytest.raises(ValueError, match=r"sync2: limit_by failed on this call \(TypeError: .*customer_id, full"):
        tasks.task(name="sync2", concurrency=1, limit_by=lambda customer, **_: customer)(
            lambda customer_id, full=False: None).defer(1)
    with pytest.raises(ValueError, match="bad: limit_by must return a non-empty str"):
        bad.defer(1)
    # And nothing was stored; a good call still is
    t.defer(7)
    assert list(limit_keys(db).values()) == ["customer:7"]


def test_every_job_stores_the_key_it_counts_against(make_tasks: Any, db: str) -> None:
    tasks = make_tasks(workers=0)
    free = tasks.task(name="free")(lambda x: x)
    capped = tasks.task(name="capped", concurrency=2)(lambda x: x)
    rated = tasks.task(name="rated", rate="5/m")(lambda x: x)
    per = tasks.task(name="per", concurrency=1, limit_by=lambda customer_id, **_: f"customer:{customer_id}")(
        lambda customer_id, amount=0: None)
    free.defer(1)
    capped.defer(2)
    rated.defer(3)
    per.defer(42, amount=5)
    per.with_options(limit_key="vip").defer(43)
    per.defer_many([(44,), {"customer_id": 45}])
    assert limit_keys(db) == {
        "free [1] {}": None, "capped [2] {}": "capped", "rated [3] {}": "rated",
        "per [42] {'amount': 5}": "customer:42", "per [43] {}": "vip", "per [44] {}": "customer:44",
        "per [] {'customer_id': 45}": "customer:45"}


def test_broker_engines_refuse_limits_when_the_task_is_declared(tmp_path: Path) -> None:
    tasks = Tasks(engine="celery", broker="redis://127.0.0.1:1/0", db=str(tmp_path / "o.db"))
    try:
        for opts in ({"concurrency": 2}, {"rate": "10/s"}, {"rate": (1, 5), "limit_by": lambda **_: "k"}):
            with pytest.raises(Unsupported, match=r"the celery engine cannot limit the concurrency or rate of task "
                                                  r"lim \(capability 'limits' is missing\)"):
                tasks.task(name="lim", **opts)(lambda: None)
        assert "lim" not in tasks.registry
        # A task without limits is fine
        tasks.task(name="plain")(lambda: None)
    finally:
        tasks.close()


def test_dramatiq_refuses_limits_too(tmp_path: Path, redis_url: str) -> None:
    tasks = Tasks(engine="dramatiq", broker=redis_url, db=str(tmp_path / "o.db"))
    try:
        with pytest.raises(Unsupported, match="the dramatiq engine cannot limit the concurrency or rate of task lim"):
            tasks.task(name="lim", concurrency=1)(lambda: None)
    finally:
        tasks.close()


# -- the claim ----------------------------------------------------------------------------------------------------
def claim(tasks: Tasks, worker: str, n: int, outcomes: list[Outcome] | None = None) -> list[Any]:
    "Claim up to `n` jobs as `worker` would (with the hub's limits); returns their positional arguments."
    from fh_tasks.limits import worker_spec
    spec = worker_spec(tasks.registry)
    names = '["' + '","'.join(sorted(tasks.registry)) + '"]'
    _, got = tasks.store.finish_and_claim(outcomes or [], worker, ("default",), n, 30.0, tasks=names,
                                          limits=spec or None)
    return [decode_args(c.args)[0] for c in got]


def args_of(*x: Any) -> list[Any]:
    return list(x)


def test_concurrency_counts_running_jobs_and_frees_a_slot_when_one_ends(make_tasks: Any) -> None:
    clock = Clock()
    tasks = make_tasks(workers=0, clock=clock)
    t = tasks.task(name="two", concurrency=2)(lambda x: x)
    t.defer_many([(i,) for i in range(6)])
    # Two workers asking for 8 each get 2 between them
    first = claim(tasks, "w1", 8)
    assert first == [args_of(0), args_of(1)]
    assert claim(tasks, "w2", 8) == []
    running = {r.args[0]: r for r in tasks.jobs(state="running")}
    # A success frees one slot; a release (shutdown) frees another
    done = [Outcome("succeed", running[0].id, running[0].attempts, result="0")]
    assert claim(tasks, "w2", 8, done) == [args_of(2)]
    back = [Outcome("release", running[1].id, running[1].attempts)]
    assert claim(tasks, "w1", 8, back) == [args_of(1)]  # the released job is first in line again
    assert tasks.counts()["running"] == 2
    # A retry frees its slot as well (the job waits for its backoff)
    r = {x.args[0]: x for x in tasks.jobs(state="running")}
    assert claim(tasks, "w1", 8, [Outcome("retry", r[2].id, r[2].attempts, error="{}", run_at=clock.t + 60)]) \
        == [args_of(3)]
    # And a dead worker's jobs, taken back after their lease, free theirs (suspect now, each runs alone)
    clock.t += 31
    assert len(tasks.store.expire()) == 2
    assert claim(tasks, "w3", 8) == [args_of(1)]
    r = {x.args[0]: x for x in tasks.jobs(state="running")}
    assert claim(tasks, "w3", 8, [Outcome("succeed", r[1].id, r[1].attempts, result="1")]) == [args_of(3)]


def test_keys_are_counted_apart(make_tasks: Any) -> None:
    tasks = make_tasks(workers=0, clock=Clock())
    t = tasks.task(name="per", concurrency=1, limit_by=lambda c, **_: f"c{c}")(lambda c, n: n)
    t.defer_many([(c, n) for n in range(3) for c in ("a", "b")])
    t.with_options(limit_key="c-special").defer("a", 9)
    got = claim(tasks, "w", 10)
    # One job per key: a, b and the per-call key run side by side, each key's others wait
    assert sorted(got) == [["a", 0], ["a", 9], ["b", 0]]
    assert claim(tasks, "w", 10) == []


def test_a_task_at_its_limit_never_holds_back_other_jobs(make_tasks: Any) -> None:
    tasks = make_tasks(workers=0, clock=Clock())
    capped = tasks.task(name="capped", concurrency=1)(lambda x: x)
    free = tasks.task(name="free")(lambda x: x)
    capped.defer_many([(i,) for i in range(100)])  # a backlog ahead of the others in due order
    tasks.clock.t += 1  # type: ignore[attr-defined]
    free.defer_many([(1000 + i,) for i in range(5)])
    got = claim(tasks, "w", 8)
    assert got[:1] == [args_of(0)] and sorted(got[1:]) == [args_of(1000 + i) for i in range(5)]
    # Full: the limited backlog waits, and an unlimited job deferred later still runs at once
    free.defer(2000)
    assert claim(tasks, "w", 8) == [args_of(2000)]


def test_a_full_key_with_a_long_backlog_never_holds_back_another_key(make_tasks: Any) -> None:
    clock = Clock()
    tasks = make_tasks(workers=0, clock=clock)
    t = tasks.task(name="per", concurrency=1, limit_by=lambda c, **_: c)(lambda c, n: n)
    t.defer_many([("a", n) for n in range(300)])  # more than one read of the due order holds
    clock.t += 1
    t.defer("b", 0)
    assert claim(tasks, "w", 1) == [["a", 0]]
    # Key a is full: the claim finds key b's job behind a's backlog, and so do the lock-free look and the wake-up time
    spec = {"per": (1, None)}
    assert tasks.store._limited_due(("default",), spec, clock.t) is True
    assert tasks.store.limited_next(("default",), spec) == pytest.approx(clock.t)
    assert claim(tasks, "w", 1) == [["b", 0]]
    assert tasks.store._limited_due(("default",), spec, clock.t) is False
    assert tasks.store.limited_next(("default",), spec) is None  # both full: a job ending wakes the worker
    assert claim(tasks, "w", 4) == []


def test_rates_space_starts_and_the_window_is_shared_by_every_claimer(make_tasks: Any) -> None:
    clock = Clock()
    tasks = make_tasks(workers=0, clock=clock)
    t = tasks.task(name="rated", rate="4/s")(lambda x: x)  # a start every 0.25 s
    t.defer_many([(i,) for i in range(5)])
    assert claim(tasks, "w1", 8) == [args_of(0)]
    assert claim(tasks, "w2", 8) == []
    # The next window: when it opens is known, so a worker sleeps until then and not longer
    spec = {"rated": (None, 0.25)}
    assert tasks.store.limited_next(("default",), spec) == pytest.approx(clock.t + 0.25)
    assert tasks.store.limited_next(("default",), spec, now_only=True) == pytest.approx(clock.t + 0.25)
    clock.t += 0.2
    assert claim(tasks, "w2", 8) == []
    clock.t += 0.05
    assert claim(tasks, "w2", 8) == [args_of(1)]
    # A long pause does not bank starts: still one per window
    clock.t += 10
    assert claim(tasks, "w1", 8) == [args_of(2)] and claim(tasks, "w2", 8) == []
    # Rate and concurrency together
    both = tasks.task(name="both", rate=(100, 1), concurrency=1)(lambda x: x)
    both.defer_many([(10,), (11,)])
    clock.t += 10
    assert sorted(claim(tasks, "w1", 8)) == [args_of(3), args_of(10)]
    clock.t += 1
    assert claim(tasks, "w1", 8) == [args_of(4)]  # `both` is full (its job runs), `rated` had its window


def test_jobs_with_a_limit_are_never_handed_off_in_a_request(make_tasks: Any, db: str) -> None:
    # Given an in-process worker with free slots on the running loop
    tasks = make_tasks(workers=1)
    capped = tasks.task(name="capped", concurrency=1)(lambda x: time.sleep(0.3))
    free = tasks.task(name="free")(lambda x: time.sleep(0.3))

    async def main() -> dict[str, str]:
        await tasks.engine.start()
        try:
            # When jobs are stored from the worker's loop (a request's commit hands due ones straight to it)
            free.defer(1)
            capped.defer_many([(1,), (2,)])
            c = sqlite3.connect(db)
            try: states = dict(c.execute("SELECT task || json_extract(args, '$.args[0]'), state FROM fh_jobs"))
            finally: c.close()
            await asyncio.sleep(0.05)
            return states
        finally:
            await tasks.engine.stop()

    states = asyncio.run(main())
    # Then the unlimited job was stored claimed, the limited ones queued for the claim that counts them
    assert states == {"free1": "running", "capped1": "queued", "capped2": "queued"}


# -- the worker -----------------------------------------------------------------------------------------------------
def test_drain_waits_for_rate_windows_instead_of_stopping(make_tasks: Any, db: str) -> None:
    tasks = make_tasks(workers=0)
    t = tasks.task(name="rated", rate="10/s")(lambda i: i)
    t.defer_many([(i,) for i in range(6)])
    began = time.monotonic()
    assert drain(tasks) == 6
    took = time.monotonic() - began
    # The starts the store recorded (claim times) are a window (0.1 s) apart, and none waited much longer
    starts = sorted(r.started_at or 0 for r in tasks.jobs(state="succeeded"))
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(starts) == 6 and min(gaps) >= 0.1 - 1e-6 and max(gaps) < 0.1 + 0.05, gaps
    assert 0.5 <= took < 2.0, took


def test_a_waiting_worker_does_not_spin_and_wakes_when_a_window_opens(make_tasks: Any) -> None:
    # Given a key that is full (its job runs in another worker) and a rate whose window opens in 0.5 s
    tasks = make_tasks(workers=0, poll_interval=0.1)
    capped = tasks.task(name="capped", concurrency=1)(lambda x: x)
    started: dict[int, float] = {}
    rated = tasks.task(name="rated", rate=(1, 0.5))(lambda x: started.setdefault(x, time.time()))
    capped.defer_many([(1,), (2,)])
    assert claim(tasks, "elsewhere", 1) == [args_of(1)]
    rated.defer_many([(1,), (2,)])
    calls = {"claims": 0, "reads": 0}
    store = tasks.store
    real_claim, real_read = store.finish_and_claim, store._read

    def counted_claim(*a: Any, **k: Any) -> Any:
        calls["claims"] += 1
        return real_claim(*a, **k)

    def counted_read(*a: Any, **k: Any) -> Any:
        calls["reads"] += 1
        return real_read(*a, **k)

    store.finish_and_claim, store._read = counted_claim, counted_read  # type: ignore[method-assign]
    w = tasks.worker()

    async def run() -> None:
        task = asyncio.ensure_future(w.run())
        await asyncio.sleep(1.2)
        w.stop()
        await task

    began = time.time()
    asyncio.run(run())
    # Then the rate-limited jobs ran a window apart, the second within a poll of its window opening
    assert sorted(started) == [1, 2]
    assert started[1] - began < 0.3 and 0.48 <= started[2] - started[1] < 0.5 + 0.15, started  # thread start jitter
    # And the full key's job stayed queued, and the worker did not spin meanwhile (a poll is 0.1 s)
    assert [r.args for r in tasks.jobs(state="queued")] == [[2]]
    assert calls["claims"] <= 20 and calls["reads"] <= 150, calls
