"""`make demo`: the "Background Task Dashboard" example and its slow service, two uvicorn servers on loopback;
Ctrl-C stops both.

Ports: DEMO_PORT (dashboard, default 5001) and SLOW_API_PORT (slow service, default 8123).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
#: Seconds a server gets to shut down (running jobs finish or go back to the queue) before it is killed.
STOP_TIMEOUT = 20.0
#: Where the demo mounts the jobs dashboard on the example's app.
JOBS_PATH = "/tasks"
#: The local copies of htmx (htmx.org 2.0.7, as FastHTML pins it; Zero-Clause BSD) and Pico CSS (@picocss/pico 2.1.1;
#: MIT) the demo serves under VENDOR_PATH (as /htmx and /pico: a path ending in .js or .css would be taken by FastHTML's
#: static-file route), and the CDN addresses they stand for.
VENDOR, VENDOR_PATH = HERE / "vendor", "/_demo/vendor"
FILES = {"htmx": "htmx-2.0.7.min.js", "pico": "pico-2.1.1.min.css"}
HTMX_CDN = re.compile(r"/htmx\.org@[^/]+/dist/htmx(\.min)?\.js$")
PICO_CDN = re.compile(r"/pico@[^/]+/css/pico(\.[a-z]+)*\.min\.css$")


def __getattr__(name: str) -> object:
    """`demo:app`, what the demo serves: the "Background Task Dashboard" app (examples/dashboard.py) with the jobs
    dashboard mounted, local-only (no auth: it answers requests from this machine only). Built when uvicorn asks
    for it."""
    if name != "app": raise AttributeError(name)
    import dashboard
    dashboard.tasks.dashboard(JOBS_PATH, local_only=True)
    serve_vendored(dashboard.app)
    globals()["app"] = dashboard.app
    return dashboard.app


def serve_vendored(app: Any) -> None:
    """Serve htmx and Pico CSS from `examples/vendor` instead of the CDN FastHTML's default `hdrs` load them from, so
    that the demo works on a machine without internet. FastHTML's other default scripts stay as they are: the pages
    work without them."""
    from fasthtml.common import Link, Script
    from starlette.responses import FileResponse, Response

    def local(h: Any) -> Any:
        if isinstance(h, tuple): return tuple(local(x) for x in h)
        attrs = getattr(h, "attrs", None) or {}
        if getattr(h, "tag", "") == "script" and HTMX_CDN.search(str(attrs.get("src", ""))):
            return Script(src=f"{VENDOR_PATH}/htmx")
        if getattr(h, "tag", "") == "link" and PICO_CDN.search(str(attrs.get("href", ""))):
            return Link(rel="stylesheet", href=f"{VENDOR_PATH}/pico")
        return h

    app.hdrs = [local(h) for h in app.hdrs]

    @app.get(VENDOR_PATH + "/{name}")
    def vendored(name: str):  # (no return annotation: FastHTML evaluates it in the module's globals)
        if name not in FILES: return Response("not found", status_code=404)
        return FileResponse(VENDOR / FILES[name], headers={"Cache-Control": "public, max-age=86400"})


class Demo:
    "The two servers, started and stopped together."

    def __init__(self, dashboard_port: int, slow_port: int) -> None:
        self.ports = {"slow_api": slow_port, "dashboard": dashboard_port}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.signal: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        "First signal: stop both servers gracefully; a second one kills them."
        if self.signal is not None: self.kill()
        self.signal = signum

    def start(self) -> None:
        "Start the slow service, then the dashboard pointed at it."
        env = {**os.environ, "SLOW_API_URL": f"http://{HOST}:{self.ports['slow_api']}"}
        for name, port in self.ports.items():
            if self.signal is not None: return
            target = "demo:app" if name == "dashboard" else f"{name}:app"  # demo:app adds the jobs dashboard
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", target, "--app-dir", str(HERE), "--host", HOST,
                 "--port", str(port)], env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        "True once both servers listen; False if one exited or a signal came first."
        deadline = time.monotonic() + timeout
        pending = dict(self.ports)
        while pending and self.signal is None and time.monotonic() < deadline:
            if self.exited(): return False
            for name, port in list(pending.items()):
                if _listening(port): del pending[name]
            time.sleep(0.1)
        return not pending

    def exited(self) -> str | None:
        "The name of a server that has exited, if any."
        return next((n for n, p in self.procs.items() if p.poll() is not None), None)

    def stop(self) -> None:
        "Ask both servers to stop (each finishes or releases its jobs) and wait for them; kill any that hang."
        sig = signal.SIGINT if self.signal in (None, signal.SIGINT) else signal.SIGTERM
        for p in self.procs.values():
            if p.poll() is None: p.send_signal(sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in self.procs.values():
            try: p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired: p.kill(); p.wait()

    def kill(self) -> None:
        "Kill both servers at once."
        for p in self.procs.values():
            if p.poll() is None: p.kill()


def _die_with_parent() -> None:
    # The servers run in their own session (so one Ctrl-C reaches them once, through us); should this
    # process die without stopping them, Linux sends them SIGTERM rather than leaving them orphaned.
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), 0.2): return True
    except OSError: return False


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536: sys.exit(f"{name} must be a TCP port number, not {raw!r}")
    port = int(raw)
    if _listening(port): sys.exit(f"port {port} ({name}) is already in use on {HOST}: stop what uses it or set {name}")
    return port


def main() -> int:
    "Run the demo until Ctrl-C or SIGTERM; returns the exit status."
    demo = Demo(_port("DEMO_PORT", 5001), _port("SLOW_API_PORT", 8123))
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP): signal.signal(s, demo.on_signal)
    try:
        demo.start()
        if demo.wait_ready():
            print(f"\n  Background Task Dashboard: http://{HOST}:{demo.ports['dashboard']}"
                  f"  (slow service on port {demo.ports['slow_api']}; Ctrl-C stops both)"
                  f"\n  Jobs dashboard:            http://{HOST}:{demo.ports['dashboard']}{JOBS_PATH}"
                  "  (local only: it answers this machine alone)\n", flush=True)
            while demo.signal is None and not demo.exited(): time.sleep(0.2)
        if demo.signal is None:
            print(f"demo: {demo.exited() or 'a server'} did not start or stopped on its own; stopping the other",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
