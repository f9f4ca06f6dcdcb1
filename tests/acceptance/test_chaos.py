"""Chaos, short version (bench/chaos.py runs the long one with the same code): SIGKILL worker processes at random
moments while they drain thousands of jobs; and a web app killed the same way with Starlette's BackgroundTask
versus an fh-tasks job."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]

_path = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"
_spec = importlib.util.spec_from_file_location("bench_chaos", _path)
assert _spec is not None and _spec.loader is not None
chaos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chaos)


def test_sigkilled_workers_lose_nothing_and_duplicate_within_the_at_least_once_bound(tmp_path: Path):
    # Given 3000 queued jobs, each appending its number to a witness table in the same SQLite file,
    # and 2 worker processes (concurrency 8, lease 1 s)
    # When a random worker is SIGKILLed and restarted 12 times while they drain the queue
    fig = chaos.worker_chaos(tmp_path, jobs=3000, kills=12, workers=2, concurrency=8, lease=1.0, pause=0.03,
                             timeout=60)
    print("chaos figures:", {k: v for k, v in fig.items() if k != "duplicated_jobs"})
    print("jobs that ran twice:", fig["duplicated_jobs"])
    # Then every job succeeded and ran at least once
    assert fig["kills"] >= 10
    assert fig["succeeded"] == fig["jobs"] == 3000
    assert fig["lost"] == 0 and fig["witnessed"] == 3000
    # And a job ran twice only when its worker died between its side effect and the record of its outcome:
    # each kill can orphan at most the `concurrency` jobs that worker held
    assert fig["duplicates"] <= fig["kills"] * fig["concurrency"]
    # And kills did land while jobs ran: some jobs were charged an extra attempt
    assert fig["kills_with_jobs_running"] >= 5 and max(fig["attempts"]) >= 2


def test_starlette_background_tasks_are_lost_when_the_server_dies_fh_tasks_jobs_are_not(tmp_path: Path):
    # Given the same FastHTML app twice under uvicorn: its handler returns Starlette's BackgroundTask (0.1 s of work),
    # or defers an fh-tasks job doing the same work
    # When clients post 300 numbered requests while the server is SIGKILLed and restarted 3 times
    starlette = chaos.web_chaos(tmp_path / "starlette", "starlette", requests=300, kills=3, seed=1)
    durable = chaos.web_chaos(tmp_path / "fh-tasks", "fh-tasks", requests=300, kills=3, seed=1)
    print("starlette:", starlette)
    print("fh-tasks:", durable)
    # Then work Starlette had accepted (200 sent) is lost, and none of fh-tasks' is
    assert starlette["kills"] == durable["kills"] == 3
    assert starlette["accepted"] == durable["accepted"] == 300
    assert starlette["lost"] > 0
    assert durable["lost"] == 0
