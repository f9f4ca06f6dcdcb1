"""Shared fixtures: temporary SQLite stores, hubs, and real uvicorn servers on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fh_tasks import Tasks

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2): return
        except OSError: time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextmanager
def uvicorn_server(target: str, *, cwd: Path, env: dict[str, str] | None = None, port: int | None = None,
                   extra: list[str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    "Run `uvicorn target` (module:attr) in a subprocess on a free loopback port; yields (base_url, process)."
    port = port or free_port()
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)]), **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
                          "--log-level", "warning", *(extra or [])], cwd=cwd, env=e)
    try:
        wait_port(port, proc=p)
        yield f"http://127.0.0.1:{port}", p
    finally:
        if p.poll() is None:
            p.terminate()
            try: p.wait(10)
            except subprocess.TimeoutExpired: p.kill(); p.wait()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.db")


@pytest.fixture
def make_tasks(db: str) -> Iterator[Callable[..., Tasks]]:
    made: list[Tasks] = []

    def make(app: Any = None, **kw: Any) -> Tasks:
        kw.setdefault("db", db)
        t = Tasks(app, **kw)
        made.append(t)
        return t

    yield make
    for t in made: t.store.close()


@pytest.fixture
def redis_url() -> str:
    "A Redis URL that answers (make test starts one); fails under CI, skips locally, when none does."
    url = os.environ.get("FH_TASKS_REDIS_URL", "redis://127.0.0.1:6379/0")
    host, port = url.split("//")[1].split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), 1) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"): raise OSError("no PONG")
    except OSError as e:
        if CI: raise RuntimeError(f"Redis is required under CI and does not answer at {url}: {e}") from e
        pytest.skip(f"no Redis at {url}")
    return url
