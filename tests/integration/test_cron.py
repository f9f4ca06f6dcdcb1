"""Periodic tasks (`@tasks.cron`) on the SQLite engine: slots fired once each by competing schedulers, missed slots
caught up once (run_once) or not at all (skip), the slot a job runs for, bad declarations refused naming the task,
the broker engines' refusal, and croniter loaded only when periodic tasks are used."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from support import ROOT

from fh_tasks import Tasks, cron_slot
from fh_tasks.cron import CronScheduler, schedules, slot_job_id
from fh_tasks.errors import Unsupported

pytestmark = pytest.mark.timeout(60)
MINUTE = 60.0


def _jobs(tasks: Tasks, name: str) -> list[tuple[str, str]]:
    return [(r.id, r.state.value) for r in tasks.jobs(task=name, limit=1000)]


async def _run_for(seconds: float, *hubs: Tasks) -> None:
    "Start the hubs' in-process workers (and so their schedulers), let them run, stop them."
    for h in hubs: await h.start()
    await asyncio.sleep(seconds)
    for h in hubs: await h.stop()


def test_per_second_slots_fire_once_each_with_two_competing_schedulers(tmp_path: Path, make_tasks):
    # Given two hubs on one store (two schedulers racing for every slot), with a task every second
    db = str(tmp_path / "jobs.db")
    seen: list[tuple[str, datetime | None]] = []
    lock = threading.Lock()
    hubs = [make_tasks(db=db, workers=1) for _ in range(2)]
    for h in hubs:
        @h.cron("* * * * * *", tz="Europe/Paris", name="cron:tick")
        def tick() -> None:
            from fh_tasks import current_job
            with lock: seen.append((current_job().id, cron_slot()))

    # When both run for a few seconds
    t0 = datetime.now(timezone.utc).timestamp()
    asyncio.run(_run_for(3.6, *hubs))
    t1 = datetime.now(timezone.utc).timestamp()
    # Then every whole second in between was fired once, under the id made from its slot, and ran once
    jobs = _jobs(hubs[0], "cron:tick")
    slots = sorted(_slot(i) for i, _ in jobs)
    assert len(slots) == len(set(slots)) >= 3, jobs
    assert slots == list(range(slots[0], slots[-1] + 1)), "a slot is missing"
    assert t0 - 1 <= slots[0] and slots[-1] <= t1
    assert {i for i, _ in jobs} == {slot_job_id("cron:tick", s) for s in slots}
    done = [i for i, st in jobs if st == "succeeded"]
    assert len(done) >= len(slots) - 1  # the last one may have been stored just before the workers stopped
    # And each run knew its slot, in the task's time zone
    by_id = dict(seen)
    assert len(seen) == len(by_id)
    for s in slots:
        got = by_id.get(slot_job_id("cron:tick", s))
        if got is not None: assert got == datetime.fromtimestamp(s, ZoneInfo("Europe/Paris")) and got.tzname() in \
            ("CET", "CEST")
    # And the stored row says which slot fired last and which is next
    [row] = hubs[0].store.cron_rows()
    assert row["last_slot"] == slots[-1] and row["next_slot"] > slots[-1]


def _slot(id: str) -> int:
    return int(id[:12], 16) // 1000


@pytest.mark.parametrize("missed, fired", [("run_once", 1), ("skip", 0)])
def test_slots_missed_while_down_run_once_or_are_skipped(tmp_path: Path, make_tasks, missed: str, fired: int):
    # Given an hourly task on a hub whose clock the test moves, started once (its schedule is stored) and stopped
    now = [datetime(2025, 3, 30, 0, 10, tzinfo=ZoneInfo("Europe/Paris")).timestamp()]
    tasks = make_tasks(db=str(tmp_path / "jobs.db"), workers=1, clock=lambda: now[0])
    runs: list[datetime | None] = []

    @tasks.cron("0 * * * *", tz="Europe/Paris", missed=missed, name="cron:hourly")
    def hourly() -> None:
        runs.append(cron_slot())

    asyncio.run(_run_for(0.3, tasks))
    assert _jobs(tasks, "cron:hourly") == []  # nothing is caught up for a schedule seen for the first time
    # When everything stays down across five slots (01:00, then 03:00 to 06:00 CEST: 02:00 does not exist that day)
    now[0] = datetime(2025, 3, 30, 6, 20, tzinfo=ZoneInfo("Europe/Paris")).timestamp()
    asyncio.run(_run_for(0.5, tasks))
    # Then run_once fired one job, for the latest missed slot, and it ran; skip fired none
    jobs = _jobs(tasks, "cron:hourly")
    assert len(jobs) == fired
    latest = datetime(2025, 3, 30, 6, 0, tzinfo=ZoneInfo("Europe/Paris"))
    if fired:
        assert jobs == [(slot_job_id("cron:hourly", latest.timestamp()), "succeeded")]
        assert runs == [latest]
    # And the next slot is the coming one; starting again at the same time fires nothing more
    [row] = tasks.store.cron_rows()
    assert row["next_slot"] == datetime(2025, 3, 30, 7, 0, tzinfo=ZoneInfo("Europe/Paris")).timestamp()
    assert row["last_slot"] == (latest.timestamp() if fired else None)
    asyncio.run(_run_for(0.2, tasks))
    assert len(_jobs(tasks, "cron:hourly")) == fired


def test_a_slot_fires_once_when_schedulers_see_it_at_the_same_instant(tmp_path: Path, make_tasks):
    # Given two hubs on one store with the same minute task, its schedule stored
    db, t = str(tmp_path / "jobs.db"), datetime(2025, 6, 1, 12, 0, 30, tzinfo=timezone.utc).timestamp()
    hubs = [make_tasks(db=db, workers=0) for _ in range(2)]
    for h in hubs: h.cron("* * * * *", name="cron:minute")(lambda: None)
    scheds = [next(x for x in h.hooks if isinstance(x, CronScheduler)) for h in hubs]
    specs = [schedules(h) for h in hubs]
    assert scheds[0].fire_due(hubs[0].store, specs[0], t) == []
    # When both read the row, then both try to fire the slot at 12:01:00.2
    rows = [h.store.cron_rows() for h in hubs]
    plans = [CronScheduler.plan(s[0], r[0], t + 30.2) for s, r in zip(specs, rows, strict=True)]
    won = [h.store.cron_advance([p], lambda name, slot, s=sc: s._job(name, slot, t + 30.2))
           for h, p, sc in zip(hubs, plans, scheds, strict=True)]
    # Then the first stored its job and the second, which read the same row, stored nothing
    assert [len(w) for w in won] == [1, 0]
    assert _jobs(hubs[0], "cron:minute") == [(slot_job_id("cron:minute", t + 30), "queued")]
    # And a scheduler reading afterwards does not even take the write lock: the slot is no longer due
    assert scheds[1].fire_due(hubs[1].store, specs[1], t + 30.5) == []


def test_only_workers_serving_the_tasks_queue_fire_it(tmp_path: Path, make_tasks):
    # Given a periodic task on queue "reports" and a hub whose workers serve only "default"
    tasks = make_tasks(db=str(tmp_path / "jobs.db"), workers=1, queues=["default"])
    tasks.cron("* * * * * *", name="cron:report", queue="reports")(lambda: None)
    # When its workers run across a few slots
    asyncio.run(_run_for(1.5, tasks))
    # Then they never scheduled it
    assert tasks.store.cron_rows() == [] and _jobs(tasks, "cron:report") == []


@pytest.mark.parametrize("expr, tz, kw, error, message", [
    ("61 * * * *", "UTC", {}, ValueError, r"task 'cron:bad'.*bad cron expression '61 \* \* \* \*'"),
    ("* * * *", "UTC", {}, ValueError, r"task 'cron:bad'.*has 4 fields; give 5"),
    ("0 0 1 1 * * 2030", "UTC", {}, ValueError, r"task 'cron:bad'.*has 7 fields"),
    ("0 0 30 2 *", "UTC", {}, ValueError, r"task 'cron:bad'.*bad cron expression"),
    ("*/5 * * * *", "Europe/Pariss", {}, ValueError, r"task 'cron:bad'.*unknown time zone 'Europe/Pariss'"),
    ("*/5 * * * *", "", {}, ValueError, r"task 'cron:bad'.*unknown time zone"),
    ("*/5 * * * *", "UTC", {"missed": "later"}, ValueError, r"task 'cron:bad'.*missed must be 'run_once' or 'skip'"),
    ("*/5 * * * *", "UTC", {"retries": -1}, ValueError, r"retries must be an int"),
    ("*/5 * * * *", "UTC", {"colour": "red"}, TypeError, r"unknown task option 'colour'"),
])
def test_bad_declarations_are_refused_naming_the_task(make_tasks, expr, tz, kw, error, message):
    tasks = make_tasks(workers=0)
    with pytest.raises(error, match=message):
        @tasks.cron(expr, tz=tz, name="cron:bad", **kw)
        def bad() -> None: ...
    # And nothing was registered or scheduled
    assert "cron:bad" not in tasks.registry and schedules(tasks) == []


def test_a_task_needing_arguments_is_refused(make_tasks):
    tasks = make_tasks(workers=0)
    with pytest.raises(TypeError, match=r"task 'cron:args'.*without arguments.*'day'"):
        @tasks.cron("@daily", name="cron:args")
        def needs(day: str) -> None: ...
    # A parameter with a default is fine, and the schedule is listed
    tasks.cron("@daily", name="cron:ok", queue="reports")(lambda day="today": None)
    assert [(s.task, s.expr, s.tz, s.queue, s.missed) for s in schedules(tasks)] == \
        [("cron:ok", "@daily", "UTC", "reports", "run_once")]


@pytest.mark.parametrize("engine", ["celery", "dramatiq"])
def test_broker_engines_refuse_periodic_tasks_when_declared(tmp_path: Path, engine: str):
    __import__(engine)  # a dev dependency: missing, the test fails
    tasks = Tasks(engine=engine, broker="redis://127.0.0.1:1/0", db=str(tmp_path / "o.db"))
    try:
        with pytest.raises(Unsupported, match=rf"the {engine} engine cannot run the periodic task cron:x .*"
                                              r"call its \.defer\(\) on schedule.*capability 'cron' is missing"):
            tasks.cron("* * * * *", name="cron:x")(lambda: None)
        assert "cron:x" not in tasks.registry
    finally:
        tasks.close()


def test_croniter_is_loaded_only_for_periodic_tasks_and_its_absence_is_explained(tmp_path: Path):
    def run(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    # An app without periodic tasks never imports croniter
    plain = ("import sys\nfrom fh_tasks import Tasks, cron_slot\nt = Tasks(db='a.db', workers=0)\n"
             "t.task(name='x')(lambda: None)\nprint('croniter' in sys.modules)")
    assert run(plain) == "False"
    # Without croniter installed, @tasks.cron says what to install
    missing = ("import sys; sys.modules['croniter'] = None\nfrom fh_tasks import Tasks\n"
               "t = Tasks(db='a.db', workers=0)\ntry: t.cron('* * * * *', name='x')(lambda: None)\n"
               "except ImportError as e: print(e)")
    assert run(missing) == "@tasks.cron needs the croniter package: pip install 'fh-tasks[cron]'"


def test_dst_follows_croniter():
    # Paris springs forward at 02:00 on 2025-03-30 and falls back at 03:00 on 2025-10-26
    from fh_tasks.cron import CronSpec
    paris = ZoneInfo("Europe/Paris")

    def runs(expr: str, start: datetime, n: int) -> list[str]:
        return [datetime.fromtimestamp(t, paris).strftime("%d %H:%M%z")
                for t in CronSpec("dst", expr, "Europe/Paris").upcoming(start.timestamp(), n)]
    # A daily time the clocks skip runs once, at the first time after the gap; an hourly one skips the hour
    assert runs("30 2 * * *", datetime(2025, 3, 29, 12, tzinfo=paris), 2) == ["30 03:00+0200", "31 02:30+0200"]
    assert runs("0 * * * *", datetime(2025, 3, 30, 0, 30, tzinfo=paris), 3) == \
        ["30 01:00+0100", "30 03:00+0200", "30 04:00+0200"]
    # A time that happens twice runs twice: each is its own slot
    assert runs("30 2 * * *", datetime(2025, 10, 25, 12, tzinfo=paris), 3) == \
        ["26 02:30+0200", "26 02:30+0100", "27 02:30+0100"]
