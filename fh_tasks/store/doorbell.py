"""Doorbell: cross-process wake-ups for workers that share one SQLite file.

Each worker process listens on a Unix datagram socket in a folder beside the database. A commit that adds
due jobs rings every bell (one non-blocking `sendto` each), so a worker in another process starts a new job
at once instead of at its next poll. Polling stays as the fallback: a lost ring only costs latency.
"""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["Doorbell"]

#: How often a ringer re-reads the folder of listening workers, in seconds.
REFRESH = 1.0
_MAX_PATH = 100  # AF_UNIX paths are limited to 108 bytes


def _folder(db: str) -> Path:
    near = Path(os.path.abspath(db) + "-wake")
    if len(str(near)) + 40 <= _MAX_PATH: return near
    digest = hashlib.sha1(os.path.realpath(db).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fh-tasks-{os.getuid()}" / digest


class Doorbell:
    "Ring the workers of other processes; listen for rings from them."

    def __init__(self, db: str) -> None:
        self.folder = _folder(db)
        self._peers: list[str] = []
        self._listed = 0.0
        self._listed_pid = 0
        self._out: socket.socket | None = None
        self._pid = 0
        self.listening: socket.socket | None = None
        self._path = ""

    def _prefix(self) -> str:
        return f"{os.getpid()}."

    def listen(self) -> socket.socket:
        "Bind this process's bell and return the socket (non-blocking) to watch for rings."
        self._make_folder()
        self._path = str(self.folder / f"{self._prefix()}{uuid.uuid4().hex[:8]}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(self._path)
        os.chmod(self._path, stat.S_IRUSR | stat.S_IWUSR)
        self.listening = s
        return s

    def drain(self) -> None:
        "Empty the listening socket after a ring."
        assert self.listening is not None
        try:
            while True: self.listening.recv(64)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        "Stop listening and remove this bell."
        if self.listening is not None:
            self.listening.close()
            self.listening = None
            try: os.unlink(self._path)
            except FileNotFoundError: pass

    def ring(self) -> int:
        "Wake the workers of every other process on this database; returns how many bells rang."
        now = time.monotonic()
        if now - self._listed > REFRESH or self._listed_pid != os.getpid(): self._list(now)
        if not self._peers: return 0
        if self._out is None or self._pid != os.getpid():
            self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._out.setblocking(False)
            self._pid = os.getpid()
        rang = 0
        for p in list(self._peers):
            try:
                self._out.sendto(b"!", p)
                rang += 1
            except BlockingIOError:
                rang += 1  # its queue is full: it has been woken already
            except (ConnectionRefusedError, FileNotFoundError):
                self._peers.remove(p)  # a worker that died without closing its bell
                try: os.unlink(p)
                except OSError: pass
            except OSError:
                pass
        return rang

    def _list(self, now: float) -> None:
        self._listed, self._listed_pid, own = now, os.getpid(), self._prefix()
        try: names = os.listdir(self.folder)
        except OSError: names = []
        self._peers = [str(self.folder / n) for n in names if not n.startswith(own)]

    def _make_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.folder.stat()
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise PermissionError(f"{self.folder} must be a private folder (mode 0700) owned by this user")
