"""Micro-measurements behind the profile of fh-tasks' drain and enqueue paths (not part of `make bench`).

    python -m bench.hotspots

1. In-process burst drain by worker concurrency: jobs/s and jobs per store transaction (sync and async task).
2. The store alone: one finish_and_claim round by batch size, with and without WAL auto-checkpoints.
3. Handing a no-op to a thread: `loop.run_in_executor` per job vs a batched hand-off (one loop wake-up per batch).
4. One `defer()` outside a request: building the job vs storing it.
5. What bounds enqueue: one `defer()` per commit and `defer_many` per job on the full schema, against the same calls on
   copies of the store with an event listener registered (the job-event triggers exist only then), without the
   per-task index (the dashboard's `fh_jobs_task`), and without every trigger and secondary index but the one the
   insert needs (the uniqueness key's `fh_jobs_ukey`): the floor of a row on this machine. The stores take turns in
   blocks within one process, so a noisy machine moves them alike.
"""
from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fh_tasks.executors import thread_pool
from fh_tasks.store import NewJob, Outcome

from . import probe
from .peers import job_arg
from .peers.fh_peer import make_hub


def _queue_jobs(hub: Any, task: str, n: int) -> None:
    now = time.time()
    args = f'{{"args":[{{"t":{now!r},"user":42,"tag":"bench"}}]}}'
    hub.store.enqueue([NewJob(id=uuid.uuid4().hex, task=task, args=args, run_at=now, created_at=now) for _ in range(n)])


def _count_rounds(store: Any) -> list[int]:
    "Count the store's finish_and_claim transactions (returned list's only item)."
    txs, inner = [0], store.finish_and_claim

    def counted(*a: Any, **k: Any) -> Any:
        txs[0] += 1
        return inner(*a, **k)
    store.finish_and_claim = counted
    return txs


def drain_by_concurrency(d: Path, n: int = 20_000) -> None:
    for task in ("bench.noop", "bench.anoop"):
        for conc in (1, 8, 64):
            hub = make_hub(str(d / f"drain-{task}-{conc}.db"))
            _queue_jobs(hub, task, n)
            txs = _count_rounds(hub.store)
            w = hub.worker(burst=True, concurrency=conc)
            t0 = time.perf_counter()
            asyncio.run(w.run())
            dt = time.perf_counter() - t0
            print(f"  drain {task:11} concurrency {conc:2}: {w.processed / dt:8,.0f} jobs/s, "
                  f"{w.processed / max(txs[0], 1):5.1f} jobs per transaction")
            hub.store.close()


def store_rounds(d: Path) -> None:
    from fh_tasks.store.sqlite import SQLiteStore
    for auto in (1000, 0):
        for k in (1, 8, 64):
            s = SQLiteStore(str(d / f"rounds-{auto}-{k}.db"))
            s._connect().execute(f"PRAGMA wal_autocheckpoint={auto}")
            _queue_jobs(type("H", (), {"store": s})(), "t", 20_000)
            claims, done, tx = s.claim("w", ["default"], k, 30), 0, 0
            t0 = time.perf_counter()
            while done < 8_000 and claims:
                outs = [Outcome("succeed", c.id, c.attempt, "null") for c in claims]
                _, claims = s.finish_and_claim(outs, "w", ["default"], k, 30)
                tx += 1
                done += len(outs)
            dt = time.perf_counter() - t0
            print(f"  store round of {k:2} outcomes + {k:2} claims, wal_autocheckpoint={auto:4}: "
                  f"{dt / tx * 1e6:6.1f} us/round, {dt / done * 1e6:5.1f} us/job")
            s.close()


async def _via_executor(n: int, c: int) -> float:
    loop, pool = asyncio.get_running_loop(), thread_pool(c)
    free, done, ev = c, 0, asyncio.Event()

    def finished(_f: Any) -> None:
        nonlocal free, done
        free += 1; done += 1
        ev.set()
    started, t0 = 0, time.perf_counter()
    while done < n:
        while free and started < n:
            free -= 1; started += 1
            loop.run_in_executor(pool, abs, 1).add_done_callback(finished)
        ev.clear()
        await ev.wait()
    pool.shutdown(wait=False)
    return (time.perf_counter() - t0) / n


async def _batched(n: int, c: int) -> float:
    loop = asyncio.get_running_loop()
    work: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    results: list[Any] = []
    lock, pending, ev, done = threading.Lock(), [False], asyncio.Event(), [0]

    def collect() -> None:
        with lock:
            done[0] += len(results); results.clear(); pending[0] = False
        ev.set()

    def serve() -> None:
        while (item := work.get()) is not None:
            r = abs(item)
            with lock:
                results.append(r)
                wake, pending[0] = not pending[0], True
            if wake: loop.call_soon_threadsafe(collect)
    threads = [threading.Thread(target=serve, daemon=True) for _ in range(c)]
    for t in threads: t.start()
    started, t0 = 0, time.perf_counter()
    while done[0] < n:
        for _ in range(min(c - (started - done[0]), n - started)):
            work.put(1); started += 1
        ev.clear()
        await ev.wait()
    for _ in threads: work.put(None)
    return (time.perf_counter() - t0) / n


def thread_handoff(n: int = 30_000) -> None:
    for fn in (_via_executor, _batched):
        print(f"  no-op through 8 threads, {fn.__name__.strip('_').replace('_', ' ')}: "
              f"{asyncio.run(fn(n, 8)) * 1e6:5.1f} us/job")


def enqueue_split(d: Path, n: int = 5_000) -> None:
    hub = make_hub(str(d / "enqueue.db"))
    t = hub.registry["bench.noop"]
    t.defer(job_arg())
    t0 = time.perf_counter()
    for _ in range(n): t.defer(job_arg())
    total = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    jobs = [t.new_job((job_arg(),), {}, t.options) for _ in range(n)]
    build = (time.perf_counter() - t0) / n
    print(f"  defer() outside a request: {total * 1e6:5.1f} us/job ({1 / total:,.0f}/s); "
          f"building the job {build * 1e6:4.1f} us, storing it (one transaction) {(total - build) * 1e6:4.1f} us")
    del jobs
    hub.store.close()


#: Copies of the store for `enqueue_bounds`: whether an event listener is registered (the job-event triggers exist
#: only then), and what each drops from the full schema.
BOUNDS = {"full schema": (False, ()), "a listener (event triggers)": (True, ()),
          "no fh_jobs_task index": (False, ("index fh_jobs_task",)),
          "no secondary index or trigger": (False, ("all",))}


def _stripped(path: str, drop: tuple[str, ...]) -> None:
    c = sqlite3.connect(path)
    if drop == ("all",):
        drop = tuple(f"{t} {n}" for t, n in c.execute(
            "SELECT type, name FROM sqlite_master WHERE tbl_name = 'fh_jobs' AND type IN ('index', 'trigger') "
            "AND name NOT LIKE 'sqlite_autoindex%' AND name != 'fh_jobs_ukey'"))  # the insert's ON CONFLICT needs it
    for what in drop: c.execute(f"DROP {what}")
    c.commit()
    c.close()


def enqueue_bounds(d: Path, blocks: int = 40, size: int = 250, batch: int = 500) -> None:
    tasks = {}
    for name, (listen, drop) in BOUNDS.items():
        hub = make_hub(str(d / f"bounds-{len(tasks)}.db"))
        t = hub.registry["bench.noop"]
        t.defer(job_arg())  # the store exists, with its schema
        if listen: hub.store.listen_events("bench", 24 * 3600.0)
        _stripped(hub.store.path, drop)
        tasks[name] = t
    single, bulk = dict.fromkeys(tasks, 0.0), dict.fromkeys(tasks, 0.0)
    names = list(tasks)
    for b in range(blocks):
        for name in (names if b % 2 == 0 else names[::-1]):
            t = tasks[name]
            t0 = time.perf_counter()
            for _ in range(size): t.defer(job_arg())
            t1 = time.perf_counter()
            t.defer_many([(job_arg(),) for _ in range(batch)])
            single[name] += t1 - t0
            bulk[name] += time.perf_counter() - t1
    full_single, full_bulk = single["full schema"], bulk["full schema"]
    for name in names:
        us1, usb = single[name] / (blocks * size) * 1e6, bulk[name] / (blocks * batch) * 1e6
        print(f"  {name:30} defer() {us1:6.1f} us ({1e6 / us1:7,.0f}/s, {full_single / single[name]:4.2f}x full)   "
              f"defer_many {usb:5.1f} us/job ({1e6 / usb:7,.0f}/s, {full_bulk / bulk[name]:4.2f}x full)")
    t = tasks["no secondary index or trigger"]
    t0 = time.perf_counter()
    news = [t.new_job((job_arg(),), {}, t.options) for _ in range(blocks * batch)]
    build = (time.perf_counter() - t0) / len(news) * 1e6
    print(f"  of which building a checked job (signature, JSON, id): {build:4.1f} us")
    for t in tasks.values(): t.hub.store.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fh-hotspots-") as tmp:
        d = Path(tmp)
        os.environ[probe.ENV] = tmp
        probe.reset()
        print("1. drain by worker concurrency"); drain_by_concurrency(d)
        print("2. store round trip"); store_rounds(d)
        print("3. thread hand-off"); thread_handoff()
        print("4. enqueue"); enqueue_split(d)
        print("5. what bounds enqueue"); enqueue_bounds(d)
        probe.reset()


if __name__ == "__main__":
    main()
