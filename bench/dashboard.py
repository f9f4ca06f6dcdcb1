"""The jobs dashboard's job list at 1,000,000 jobs: time per page, first and deep pages, with each filter.

A fresh store gets ROWS jobs written straight with SQL (as years of a busy app leave them): 5 tasks, one of them
rare (1 job in 10,000), 2 queues, 96 % succeeded, 2 % failed, 1 % queued, 1 % cancelled, created one per 10 ms. Each
case reads the first page (50 jobs) and a page deep in the list (keyset: `before` = the seq of a job halfway down),
REPEAT times, through `SQLiteStore.page` (what the dashboard runs); the table shows the median and the worst, in ms.
The overview's figures (one pass over the table, cached 2 s by the dashboard) are timed apart.

    python -m bench.dashboard [--rows 1000000] [--db PATH]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fh_tasks.engine import EngineSettings
from fh_tasks.engines.sqlite import SQLiteEngine
from fh_tasks.store.sqlite import SQLiteStore

ROWS, REPEAT, PAGE = 1_000_000, 20, 50
TARGET_MS = 200.0
T0 = 1_700_000_000.0


def fill(db: str, rows: int) -> None:
    "Write `rows` jobs straight into a fresh store."
    s = SQLiteStore(db)
    s.counts()  # opening creates the schema
    s.close()
    c = sqlite3.connect(db)
    c.execute("PRAGMA synchronous=OFF")

    def row(i: int) -> tuple[Any, ...]:
        task = "app:rare" if i % 10_000 == 7 else f"app:task{i % 4}"
        r = i % 100
        state = "failed" if r < 2 else "queued" if r == 2 else "cancelled" if r == 3 else "succeeded"
        t = T0 + i * 0.01
        done = None if state == "queued" else t + 0.05
        err = '{"type": "ValueError", "message": "bad input"}' if state == "failed" else None
        return (f"{i:032x}", task, "mail" if i % 3 == 0 else "default", '[[1, "x"], {"to": "a@example.com"}]', state,
                1, t, t, t if done else None, done, err)

    batch = 50_000
    for start in range(0, rows, batch):
        c.executemany("INSERT INTO fh_jobs (id, task, queue, args, state, attempts, run_at, created_at, started_at, "
                      "finished_at, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      [row(i) for i in range(start, min(rows, start + batch))])
        c.commit()
    c.execute("ANALYZE")
    c.commit()
    c.close()


def timed(f: Callable[[], Any], repeat: int = REPEAT) -> tuple[float, float, Any]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--db", default=None, help="reuse (or create) this store file")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    db = a.db or str(Path(tmp.name) / "dash.db")
    if not Path(db).exists():
        t = time.perf_counter()
        fill(db, a.rows)
        print(f"filled {a.rows:,} jobs in {time.perf_counter() - t:.1f} s ({Path(db).stat().st_size / 1e6:.0f} MB)")
    store = SQLiteStore(db, clock=lambda: T0 + a.rows * 0.01 + 60)
    engine = SQLiteEngine(EngineSettings(db=db, workers=0), store=store)
    mid = a.rows // 2
    cases: dict[str, dict[str, Any]] = {
        "all jobs": {}, "state=failed (2 %)": {"state": "failed"}, "state=succeeded (96 %)": {"state": "succeeded"},
        "state=queued (1 %)": {"state": "queued"}, "task=app:task1 (25 %)": {"task": "app:task1"},
        "task=app:rare (0.01 %)": {"task": "app:rare"}, "queue=mail (33 %)": {"queue": "mail"},
        "failed + queue=mail": {"state": "failed", "queue": "mail"},
        "created in the last hour": {"since": T0 + a.rows * 0.01 - 3600},
    }
    print(f"\n| job list, {a.rows:,} jobs, {PAGE} per page | first page ms (median / worst) | "
          f"deep page ms (median / worst) |\n| --- | --: | --: |")
    results = {}
    for name, f in cases.items():
        m1, w1, rows = timed(lambda f=f: store.page(limit=PAGE, **f))
        assert rows, name
        deep = mid if "since" not in f else int(rows[-1].raw["seq"])
        m2, w2, _ = timed(lambda f=f, deep=deep: store.page(limit=PAGE, before=deep, **f))
        results[name] = {"first_ms": round(m1, 2), "first_worst_ms": round(w1, 2), "deep_ms": round(m2, 2),
                         "deep_worst_ms": round(w2, 2)}
        print(f"| {name} | {m1:.1f} / {w1:.1f} | {m2:.1f} / {w2:.1f} |")
    mo, wo, _ = timed(engine.overview, 3)
    print(f"\noverview figures (counts per task/queue/state, queues, last hour, workers): {mo:.0f} ms median, "
          f"{wo:.0f} ms worst (the dashboard reuses them for 2 s)")
    worst = max(max(r["first_worst_ms"], r["deep_worst_ms"]) for r in results.values())
    print(f"worst page: {worst:.1f} ms (target {TARGET_MS:.0f} ms): {'OK' if worst < TARGET_MS else 'OVER'}")
    print(json.dumps({"rows": a.rows, "pages": results, "overview_ms": round(mo, 1), "worst_page_ms": round(worst, 1)}))
    engine.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
