"""Shared fixtures: temporary SQLite stores, hubs, and real uvicorn servers on loopback."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import CI, ROOT, free_port, uvicorn_server, wait_port  # noqa: F401  (re-exported for tests)

from fh_tasks import Tasks


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
