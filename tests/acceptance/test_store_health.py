"""Store health: another process holding the write lock, pruning after the retention period, and clear errors for a
read-only file, a missing directory and a full disk, at enqueue and at worker/app start-up."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from support import CI
from worker_support import enqueue, env_for, make_db, rows, running, start_worker, states, stop, wait_for, write_modules

from fh_tasks import QueueBusy, QueueUnavailable, Tasks
from fh_tasks.store.sqlite import SQLiteStore
from fh_tasks.testing import drain

pytestmark = pytest.mark.timeout(60)

HOLD_LOCK = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
c.execute("INSERT INTO witness (n) VALUES (-1)")
print("locked", flush=True)
sys.stdin.readline()
c.execute("ROLLBACK")
"""


@contextmanager
def write_lock(db: str) -> Iterator[None]:
    "Another process holds the store's write lock (BEGIN IMMEDIATE) until the block ends."
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        yield
    finally:
        if p.stdin: p.stdin.close()
        p.wait(10)


def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", *args], capture_output=True).returncode == 0


def _cannot(why: str) -> None:
    "Under CI (root on its machine) these mounts must work: fail there, skip on a developer's machine."
    if CI: pytest.fail(why)
    pytest.skip(why)


@contextmanager
def read_only_dir(src: Path, tmp: Path) -> Iterator[Path]:
    "`src` seen read-only: a read-only bind mount as root (root ignores file modes), else chmod."
    if os.geteuid() == 0:
        dst = tmp / "ro"
        dst.mkdir()
        if not (_mount("--bind", str(src), str(dst)) and _mount("-o", "remount,bind,ro", str(dst))):
            subprocess.run(["umount", str(dst)], capture_output=True)
            _cannot("running as root without permission to mount a read-only bind mount")
        try: yield dst
        finally: subprocess.run(["umount", str(dst)], check=True)
    else:
        for f in src.iterdir(): f.chmod(0o444)
        try: yield src
        finally:
            for f in src.iterdir(): f.chmod(0o644)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_modules(tmp_path)


def test_a_lock_held_by_another_process_gives_queue_busy_and_writes_nothing(tmp_path: Path):
    # Given a store with a short busy timeout, and another process holding its write lock
    db = make_db(tmp_path / "jobs.db")
    tasks = Tasks(store=SQLiteStore(db, busy_timeout=0.3))

    @tasks.task(name="health:noop")
    def noop(n: int) -> int:
        return n

    assert tasks.counts() == {}
    with write_lock(db):
        # When a job is deferred
        with pytest.raises(QueueBusy) as e:
            noop.defer(1)
        # Then enqueue raises QueueBusy with a clear message
        assert "stayed locked for 0.3s" in str(e.value)
    # And nothing was half-written; once the lock is gone, enqueue works again
    assert tasks.counts() == {}
    noop.defer(2)
    assert tasks.counts() == {"queued": 1}
    tasks.store.close()


def test_a_worker_rides_out_a_lock_longer_than_its_busy_timeout(app_dir: Path, tmp_path: Path):
    # Given a standalone worker with a 0.2 s busy timeout, running two 1 s jobs with more queued
    db = make_db(tmp_path / "jobs.db")
    ids = enqueue(db, "jobsapp:pause", [((1.0,), {}), ((1.0,), {})] + [((0.0,), {})] * 4)
    log = tmp_path / "w.log"
    env = env_for(app_dir, db, JOBS_BUSY=0.2)
    with running(start_worker("jobsapp:tasks", app_dir, env, "--concurrency", "2", log=log)) as w:
        wait_for(lambda: states(db).get("running") == 2, what="two jobs running")
        # When another process holds the write lock for 2 s, while the running jobs finish
        with write_lock(db): time.sleep(2.0)
        # Then the worker logged the busy store, kept going, and recorded every job once
        wait_for(lambda: states(db) == {"succeeded": 6}, what="all jobs succeeded")
        assert w.poll() is None
        assert stop(w) == 0
    assert "stayed locked" in log.read_text()
    assert rows(db, f"SELECT max(attempts) FROM fh_jobs WHERE id IN ({','.join('?' * len(ids))})", ids) == [(1,)]


def test_finished_jobs_are_pruned_after_the_retention_period(app_dir: Path, tmp_path: Path):
    # Given jobs that finished three days ago, jobs that finished now, and an old job still queued elsewhere
    db = make_db(tmp_path / "jobs.db")
    past = Tasks(db=db, clock=lambda: time.time() - 3 * 86400)
    now = Tasks(db=db)
    for hub, name in ((past, "health:old"), (now, "health:new")):
        hub.task(name=name)(lambda n: n)
    olds = [past.registry["health:old"].defer(i).id for i in range(5)]
    news = [now.registry["health:new"].defer(i).id for i in range(3)]
    drain(past)
    drain(now)
    waiting = past.registry["health:old"].with_options(queue="elsewhere").defer(99).id
    # When a worker of a hub with a one-day retention runs
    env = env_for(app_dir, db, JOBS_RETENTION=86400, JOBS_LEASE=0.3)
    with running(start_worker("jobsapp:tasks", app_dir, env, log=tmp_path / "w.log")) as w:
        # Then the old finished jobs are deleted; recent ones and unfinished ones stay
        wait_for(lambda: rows(db, "SELECT count(*) FROM fh_jobs WHERE task='health:old'") == [(1,)], what="pruned")
        assert stop(w) == 0
    left = {r[0] for r in rows(db, "SELECT id FROM fh_jobs")}
    assert left == set(news) | {waiting} and not left & set(olds)
    past.store.close()
    now.store.close()


def test_a_read_only_store_gives_clear_errors(app_dir: Path, tmp_path: Path):
    # Given a store file that exists but cannot be written
    data = tmp_path / "data"
    data.mkdir()
    SQLiteStore(str(data / "jobs.db")).counts()
    with read_only_dir(data, tmp_path) as ro:
        db = str(ro / "jobs.db")
        _assert_clear_errors(app_dir, db, "read-only")


def test_a_missing_directory_gives_clear_errors(app_dir: Path, tmp_path: Path):
    # Given a store path in a directory that does not exist
    db = str(tmp_path / "no" / "such" / "dir" / "jobs.db")
    _assert_clear_errors(app_dir, db, "does not exist")
    assert not (tmp_path / "no").exists()


def _assert_clear_errors(app_dir: Path, db: str, why: str) -> None:
    # When a job is deferred, Then enqueue raises QueueUnavailable saying why
    tasks = Tasks(db=db)
    t = tasks.task(name="health:noop")(lambda: None)
    with pytest.raises(QueueUnavailable, match=why):
        t.defer()
    # When a standalone worker starts, Then it exits at once with the reason
    env = env_for(app_dir, db)
    out = subprocess.run([sys.executable, "-m", "fh_tasks", "worker", "jobsapp:tasks"], cwd=app_dir, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr
    # When the web app starts under uvicorn, Then start-up fails with the reason
    web = subprocess.run([sys.executable, "-m", "uvicorn", "webapp:app", "--host", "127.0.0.1", "--port", "0"],
                         cwd=app_dir, env=env, capture_output=True, text=True, timeout=30)
    assert web.returncode != 0 and why in web.stderr and "Application startup failed" in web.stderr, web.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    "A 1 MiB tmpfs (root only): the real ENOSPC a full disk gives."
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)):
        _cannot("needs root and permission to mount a 1 MiB tmpfs to fill a disk for real")
    try: yield mnt
    finally: subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_fails_enqueue_clearly_and_writes_nothing(small_disk: Path):
    # Given a FastHTML app whose store is on a disk that then fills up
    from fasthtml.common import P, fast_app
    from starlette.responses import PlainTextResponse

    def unavailable(req, exc):  # an app's 500 handler turning the error into its own page
        return PlainTextResponse(f"sorry: {exc}", status_code=503 if isinstance(exc, QueueUnavailable) else 500)

    app, rt = fast_app(exception_handlers={500: unavailable})
    tasks = Tasks(app, db=str(small_disk / "jobs.db"), workers=0)
    big = tasks.task(name="health:big")(lambda blob: len(blob))

    @rt("/signup")
    def get():
        return P("welcome"), big.defer("x" * 100_000), big.defer("y" * 100_000)

    big.defer("small")
    with open(small_disk / "filler", "wb") as f:
        try:
            while True: f.write(b"\0" * 65536); f.flush()
        except OSError: pass
    # When jobs are deferred outside a request, Then enqueue raises QueueUnavailable naming the full disk
    with pytest.raises(QueueUnavailable, match="disk is full"):
        tasks.store.enqueue([big.new_job(("z" * 100_000,), {}, big.options) for _ in range(5)])
    # When a handler defers jobs, Then the app's error page is served instead of the success page
    r = TestClient(app, raise_server_exceptions=False).get("/signup")
    assert r.status_code == 503 and "disk is full" in r.text
    # And nothing was half-written: only the first small job is stored, and the store is intact
    assert tasks.counts() == {"queued": 1}
    assert tasks.store.integrity() == "ok"
    # When space is freed, Then enqueue works again
    (small_disk / "filler").unlink()
    big.defer("x" * 100_000)
    assert tasks.counts() == {"queued": 2}
    tasks.store.close()
