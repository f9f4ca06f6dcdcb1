"""Helpers shared by the tests (import as `from support import ...`): bounded waits, ports and real uvicorn servers."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.01) -> T:
    "Poll `cond` every `interval` seconds until it returns a true value (returned); fail naming `what` after `timeout`."
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > deadline: raise AssertionError(f"{what} not reached after {timeout}s (last: {v!r})")
        time.sleep(interval)
    return v


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


@contextmanager
def demo(tmp_path: Path, slow_delay: str = "0.05") -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`make demo`'s script (examples/demo.py) on free ports, its store files and its output (`demo.log`) in
    `tmp_path`, the slow service answering after `slow_delay` seconds; yields (process, dashboard port, slow service
    port) once both listen. Killed at the end if still running."""
    port, slow_port = free_port(), free_port()
    env = {**os.environ, "DEMO_PORT": str(port), "SLOW_API_PORT": str(slow_port), "SLOW_API_DELAY": slow_delay,
           "FH_TASKS_DB": str(tmp_path / "jobs.db"), "DASHBOARD_DB": str(tmp_path / "dash.db")}
    with (tmp_path / "demo.log").open("wb") as log:
        p = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo.py")], cwd=tmp_path, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
        try:
            wait_port(port, timeout=60, proc=p)
            wait_port(slow_port, timeout=60, proc=p)
            yield p, port, slow_port
        finally:
            if p.poll() is None: p.kill(); p.wait()


def follow_pages(client: Any, url: str | None = "/tasks/jobs") -> list[str]:
    "The job ids of the dashboard's job list, following its \"Next page\" links from `url` to the last page."
    seen: list[str] = []
    while url:
        text = client.get(url).text
        seen += re.findall(r'href="/tasks/jobs/([0-9a-f]{32})"', text)
        m = re.search(r'<a href="([^"]+)"[^>]*rel="next"|rel="next"[^>]*href="([^"]+)"', text)
        url = (m.group(1) or m.group(2)).replace("&amp;", "&") if m else None
    return seen

