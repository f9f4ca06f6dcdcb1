"""Shared code of the worker, CLI, chaos and store-health tests: app modules written to a temp dir, worker
processes started the way users start them, and plain SQLite reads of the job store."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import support

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
#: The console script installed next to the interpreter (`pip install -e .` puts it there).
FH_TASKS = str(Path(PY).with_name("fh-tasks"))
T = TypeVar("T")

#: A module of tasks the tests run; every job of `record` appends a witness row in the same SQLite file.
JOBS_APP = '''
import os, sqlite3, threading, time
from fh_tasks import Tasks, current_job
from fh_tasks.store.sqlite import SQLiteStore

DB = os.environ["JOBS_DB"]
env = os.environ.get
tasks = Tasks(store=SQLiteStore(DB, busy_timeout=float(env("JOBS_BUSY", "5"))), lease=float(env("JOBS_LEASE", "1")),
              grace=float(env("JOBS_GRACE", "5")), retention=float(env("JOBS_RETENTION", 7 * 86400)))
_local = threading.local()


def witness(n):
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = sqlite3.connect(DB, timeout=30, isolation_level=None)
    job = current_job()
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)", (n, job.id, job.attempt, os.getpid()))


@tasks.task(retries=10)
def record(n: int, pause: float = 0.0) -> int:
    time.sleep(pause)
    witness(n)
    return n


@tasks.task
def nap(n: int, seconds: float) -> int:
    time.sleep(seconds)
    witness(n)
    return n


@tasks.task
def login(user: str, password: str, api_key: str = "", options: dict | None = None) -> None:
    raise PermissionError(f"wrong password for {user}")


@tasks.task
def pause(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@tasks.task
def stall_first(n: int) -> dict:
    if current_job().attempt == 1:
        current_job().progress({"pid": os.getpid()})
        time.sleep(60)
    return {"attempt": current_job().attempt, "pid": os.getpid()}


@tasks.task(retries=2)
def poison_kill() -> None:
    os.kill(os.getpid(), 9)


@tasks.task
def poison_exit() -> None:
    os._exit(1)


@tasks.task(process=True)
def cpu_pid(seconds: float) -> dict:
    current_job().progress({"pid": os.getpid(), "ppid": os.getppid()})
    time.sleep(seconds)
    return {"pid": os.getpid(), "ppid": os.getppid()}
'''

#: A FastHTML app with the hub bound to it; WEB_WORKERS in-process workers (0: run `fh-tasks worker` beside it).
WEB_APP = '''
import os, sqlite3, threading, time
from fasthtml.common import P, fast_app
from fh_tasks import Tasks, current_job

DB = os.environ["JOBS_DB"]
app, rt = fast_app()
tasks = Tasks(app, db=DB, workers=int(os.environ.get("WEB_WORKERS", "1")),
              lease=float(os.environ.get("JOBS_LEASE", "1")), grace=float(os.environ.get("JOBS_GRACE", "5")))
_local = threading.local()


@tasks.task(retries=10)
def record(n: int, pause: float = 0.0) -> int:
    time.sleep(pause)
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = sqlite3.connect(DB, timeout=30, isolation_level=None)
    c.execute("INSERT INTO witness (n, job, attempt, pid) VALUES (?, ?, ?, ?)",
              (n, current_job().id, current_job().attempt, os.getpid()))
    return n


@tasks.task(process=True)
def cpu_pid(seconds: float) -> dict:
    time.sleep(seconds)
    return {"pid": os.getpid(), "ppid": os.getppid()}


@rt("/defer")
def post(n: int, pause: float = 0.0):
    job = record.defer(n, pause)
    return P(job.id, id="job"), job


@rt("/cpu")
def get(seconds: float = 0.0):
    job = cpu_pid.defer(seconds)
    return P(job.id, id="job"), job
'''

WITNESS = "CREATE TABLE IF NOT EXISTS witness (n INTEGER, job TEXT, attempt INTEGER, pid INTEGER)"


def write_modules(dir: Path) -> Path:
    "Write `jobsapp.py` and `webapp.py` into `dir` and return it."
    (dir / "jobsapp.py").write_text(JOBS_APP)
    (dir / "webapp.py").write_text(WEB_APP)
    return dir


def make_db(path: Path) -> str:
    "A job store file that also holds the witness table (made after the store's own: a store adopts no other file)."
    from fh_tasks.store.sqlite import SQLiteStore
    store = SQLiteStore(path)
    store.counts()
    store.close()
    c = sqlite3.connect(path)
    c.execute(WITNESS)
    c.close()
    return str(path)


def env_for(dir: Path, db: str, **extra: Any) -> dict[str, str]:
    "The environment for a subprocess that imports the modules in `dir` and uses the store `db`."
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(dir)]), "JOBS_DB": db,
            **{k: str(v) for k, v in extra.items()}}


def start_worker(target: str, dir: Path, env: dict[str, str], *args: str, module: bool = True,
                 log: Path | None = None) -> subprocess.Popen[bytes]:
    "Start `python -m fh_tasks worker target` (or the `fh-tasks` console script) in `dir`."
    cmd = [PY, "-m", "fh_tasks"] if module else [FH_TASKS]
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([*cmd, "worker", target, *args], cwd=dir, env=env, stdout=out, stderr=out)


def cli(dir: Path, env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    "Run the `fh-tasks` console script and capture its output."
    return subprocess.run([FH_TASKS, *args], cwd=dir, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(cond: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> T:
    "`support.wait_until` with the worker tests' defaults (20 s, polled every 50 ms)."
    return support.wait_until(cond, timeout, what, interval)


def rows(db: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    "Read the store with a plain connection (no fh-tasks code involved)."
    c = sqlite3.connect(db, timeout=30)
    try: return c.execute(sql, params).fetchall()
    finally: c.close()


def states(db: str) -> dict[str, int]:
    "Number of jobs in each state."
    return dict(rows(db, "SELECT state, count(*) FROM fh_jobs GROUP BY state"))  # type: ignore[arg-type]


def stop(p: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    "Signal a process and wait for it; kill it if it does not exit in time (and fail loudly)."
    if p.poll() is None: p.send_signal(sig)
    try: return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"process {p.pid} did not exit within {timeout}s of {signal.Signals(sig).name}") from None


def alive(pid: int) -> bool:
    "True while `pid` exists and is not a zombie."
    try:
        with open(f"/proc/{pid}/stat") as f: return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError: return False
    except OSError: pass
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    return True


@contextmanager
def running(p: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    "Make sure a process started by a test is gone when the test ends."
    try: yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def enqueue(db: str, task: str, calls: Sequence[tuple[Sequence[Any], dict[str, Any]]], *, max_attempts: int = 1,
            queue: str = "default") -> list[str]:
    "Store jobs of `task` in one transaction, as `defer()` would from another process; returns their ids."
    import uuid

    from fh_tasks.encoding import encode_args
    from fh_tasks.store import NewJob
    from fh_tasks.store.sqlite import SQLiteStore
    now = time.time()
    jobs = [NewJob(id=uuid.uuid4().hex, task=task, args=encode_args(task, tuple(a), dict(k)), queue=queue,
                   max_attempts=max_attempts, run_at=now, created_at=now) for a, k in calls]
    store = SQLiteStore(db)
    try: store.enqueue(jobs)
    finally: store.close()
    return [j.id for j in jobs]
