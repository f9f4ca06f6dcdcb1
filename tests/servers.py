"""Servers the broker tests take away and bring back: a private redis-server, and a TCP relay in front of RabbitMQ."""
from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support import CI

__all__ = ["fixed_port", "RedisServer", "Proxy"]


def fixed_port() -> int:
    """A free port below the kernel's range of ephemeral ports: while a server of the test is stopped, no client's
    outgoing connection (one retrying to connect to it, say) can take that port as its own."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, lo - 12000), lo), 200):
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", port))
            except OSError: continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class RedisServer:
    "A private redis-server on a free loopback port, without persistence: `stop()` and `start()` it at will."

    def __init__(self, dir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            if CI: raise RuntimeError("redis-server is required under CI")
            pytest.skip("no redis-server binary")
        self.exe, self.dir, self.port = exe, dir, fixed_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        import redis
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping(): return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline: raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Proxy:
    "A TCP relay from a free port to `target`: `stop()` drops every connection and the port, `start()` opens it again."

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, fixed_port()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None

    def start(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try: client, _ = srv.accept()
            except OSError: return
            try: upstream = socket.create_connection(self.target, 2)
            except OSError:
                client.close()
                continue
            with self._lock: self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536): b.sendall(data)
        except OSError: pass
        for s in (a, b):
            with contextlib.suppress(OSError): s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError): self._server.shutdown(socket.SHUT_RDWR)  # ends the blocked accept()
            self._server.close()
        with self._lock: socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError): s.shutdown(socket.SHUT_RDWR)
            s.close()
