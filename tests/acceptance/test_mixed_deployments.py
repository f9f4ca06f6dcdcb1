"""Two apps sharing one store, or an old worker during a deploy that adds a task: a worker claims only the tasks it
can run, the others stay queued and `fh-tasks stats` says no live worker runs them; workers register themselves."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from worker_support import cli, enqueue, env_for, make_db, rows, running, start_worker, stop, wait_for

pytestmark = pytest.mark.timeout(90)

APP = '''
import os
from fh_tasks import Tasks
from fh_tasks.store.sqlite import SQLiteStore

tasks = Tasks(store=SQLiteStore(os.environ["JOBS_DB"]), lease=1.0, grace=2)


@tasks.task
def work(n: int) -> int:
    return n
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "shop.py").write_text(APP)
    (tmp_path / "blog.py").write_text(APP)
    return tmp_path


def states_of(db: str, ids: list[str]) -> set[tuple[str, int, str | None]]:
    marks = ",".join("?" * len(ids))
    return set(rows(db, f"SELECT state, attempts, error FROM fh_jobs WHERE id IN ({marks})", ids))  # type: ignore


def test_a_worker_leaves_other_apps_jobs_queued_and_stats_names_them(app_dir, tmp_path):
    # Given one store shared by two apps (shop and blog), each with its own task, and jobs of both queued
    db = make_db(tmp_path / "jobs.db")
    env = env_for(app_dir, db)
    shop = enqueue(db, "shop:work", [((i,), {}) for i in range(5)])
    blog = enqueue(db, "blog:work", [((i,), {}) for i in range(4)])
    log = tmp_path / "workers.log"
    # When only the shop's worker runs
    with running(start_worker("shop:tasks", app_dir, env, log=log)) as w:
        wait_for(lambda: states_of(db, shop) == {("succeeded", 1, None)}, what="the shop's jobs succeeded")
        time.sleep(0.5)
        # Then it ran its own jobs and left the blog's queued, no attempt charged, no error
        assert states_of(db, blog) == {("queued", 0, None)}
        # And it is registered in the store, with what it can run
        [(wid, pid, queues, tasks, seen)] = rows(db, "SELECT id, pid, queues, tasks, last_seen FROM fh_workers")
        assert (pid, json.loads(queues), json.loads(tasks)) == (w.pid, ["default"], ["shop:work"])
        # And its heartbeat keeps it live (1 s lease: renewed every third of a second)
        wait_for(lambda: rows(db, "SELECT last_seen FROM fh_workers")[0][0] > seen, what="last_seen renewed")
        # And `fh-tasks stats` shows the live worker and names the task nobody can run
        out = cli(app_dir, env, "stats", "--db", db)
        assert out.returncode == 0, out.stderr
        assert "live workers: 1" in out.stdout and wid in out.stdout
        assert "no live worker runs task blog:work (queue default): 4 queued" in out.stdout
        # When the blog's worker starts too
        with running(start_worker("blog:tasks", app_dir, env, log=log)) as b:
            # Then the blog's jobs run, and stats no longer names any task
            wait_for(lambda: states_of(db, blog) == {("succeeded", 1, None)}, what="the blog's jobs succeeded")
            out = cli(app_dir, env, "stats", "--db", db)
            assert "live workers: 2" in out.stdout and "no live worker runs" not in out.stdout
            assert stop(b) == 0
        assert stop(w) == 0
    # And workers that stopped cleanly are no longer registered, and nothing was logged as failed
    assert rows(db, "SELECT count(*) FROM fh_workers") == [(0,)]
    assert "UnknownTask" not in log.read_text() and "failed" not in log.read_text()


def cpu_seconds(pid: int) -> float:
    "User + system CPU time of a process, from /proc."
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_jobs_it_cannot_run_do_not_keep_a_worker_busy(app_dir, tmp_path):
    # Given a worker whose store holds only another app's due jobs
    db = make_db(tmp_path / "jobs.db")
    env = env_for(app_dir, db)
    blog = enqueue(db, "blog:work", [((i,), {}) for i in range(3)])
    with running(start_worker("shop:tasks", app_dir, env, log=tmp_path / "w.log")) as w:
        wait_for(lambda: rows(db, "SELECT count(*) FROM fh_workers") == [(1,)], what="worker registered")
        time.sleep(0.5)
        # When it idles for 3 s
        t0, c0 = time.monotonic(), cpu_seconds(w.pid)
        time.sleep(3)
        used = (cpu_seconds(w.pid) - c0) / (time.monotonic() - t0)
        assert stop(w) == 0
    # Then it sleeps between polls, as with an empty queue (it does not wake up for them in a loop)
    print(f"idle worker with 3 jobs it cannot run: {used:.1%} of a core")
    assert used < 0.05
    assert states_of(db, blog) == {("queued", 0, None)}


def test_a_killed_worker_stops_counting_as_live(app_dir, tmp_path):
    # Given a worker registered in the store
    db = make_db(tmp_path / "jobs.db")
    env = env_for(app_dir, db)
    blog = enqueue(db, "blog:work", [((1,), {})])
    with running(start_worker("shop:tasks", app_dir, env, log=tmp_path / "w.log")) as w:
        wait_for(lambda: rows(db, "SELECT count(*) FROM fh_workers") == [(1,)], what="worker registered")
        # When it is SIGKILLed (no clean stop)
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
    # Then after a few lease periods stats no longer counts it as live, and says its task has no live worker
    time.sleep(3.5)
    out = cli(app_dir, env, "stats", "--db", db)
    assert "live workers: 0 (1 silent, ignored)" in out.stdout, out.stdout
    assert "no live worker runs task blog:work (queue default): 1 queued" in out.stdout
    assert states_of(db, blog) == {("queued", 0, None)}
