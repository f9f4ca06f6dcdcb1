"""Doorbell: cross-process wake-ups for workers that share one SQLite file.

Each worker process listens on a Unix datagram socket in the folder `<database>-wake`, beside the database. A
commit that adds due jobs rings every bell (one non-blocking `sendto` each), so a worker in another process starts
a new job at once instead of at its next poll. Polling stays as the fallback: a lost ring only costs latency.

The folder is never trusted by its name: it is opened without following a symbolic link and used only if it is a
folder owned by this user with mode 0700 (anything else is refused, with a warning saying why, and workers poll).
Every name in it is then reached through that open folder (`/proc/self/fd/N/name` on Linux, which also keeps
socket addresses short whatever the database's path), and only entries that are sockets owned by this user and
named like a bell are rung or removed. The last worker to leave removes the folder, if it is empty.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
import time
import uuid
from pathlib import Path

from ..pid import pid

__all__ = ["Doorbell", "UnsafeFolder"]

log = logging.getLogger("fh_tasks.doorbell")

#: How often a ringer re-reads the folder of listening workers, in seconds.
REFRESH = 1.0
_MAX_PATH = 100  # AF_UNIX paths are limited to 108 bytes (104 on macOS)
_BELL = re.compile(r"(\d+)\.[0-9a-f]{8}")
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a named pipe"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


class UnsafeFolder(PermissionError):
    """The wake-up folder beside the database is not a private folder of this user, so it is not used."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a folder")


class _Folder:
    "The bell folder, open and checked: names in it are resolved through this handle, never through its path again."

    def __init__(self, path: Path, create: bool) -> None:
        self.path, made = path, False
        if create:
            try:
                os.mkdir(path, 0o700)
                made = True
            except FileExistsError: pass
        try: self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP): raise
            raise self._unsafe(f"it is {_kind(os.lstat(path).st_mode)}") from None
        try:
            st = os.fstat(self.fd)
            if st.st_uid != os.geteuid(): raise self._unsafe(f"it belongs to uid {st.st_uid}, not to this user")
            if made: os.fchmod(self.fd, 0o700)  # whatever the umask
            elif stat.S_IMODE(st.st_mode) != 0o700:
                raise self._unsafe(f"its mode is {stat.S_IMODE(st.st_mode):04o}, not 0700")
        except BaseException:
            self.close()
            raise
        self.id = (st.st_dev, st.st_ino)
        self._proc = os.path.isdir(f"/proc/self/fd/{self.fd}")

    def _unsafe(self, why: str) -> UnsafeFolder:
        return UnsafeFolder(f"not using {self.path} for worker wake-ups: {why} (it must be a folder of this user with "
                            "mode 0700; remove it to let fh-tasks make it again). Workers in other processes poll.")

    def address(self, name: str) -> str:
        "A socket address for `name` in this folder: through /proc where it exists, else the plain path if it fits."
        if self._proc: return f"/proc/self/fd/{self.fd}/{name}"
        here = self.path / name
        if len(os.fsencode(here)) > _MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, f"{here} is too long for a Unix socket address and /proc is missing; "
                                              "workers in other processes poll (use a shorter database path)")
        try: st = os.lstat(self.path)
        except FileNotFoundError: st = None
        if st is None or (st.st_dev, st.st_ino) != self.id:
            raise OSError(errno.ESTALE, f"{self.path} was replaced since it was checked")
        return str(here)

    def bells(self) -> list[str]:
        "Names in the folder that are bells: sockets owned by this user, named `<pid>.<8 hex digits>`."
        return [n for n in os.listdir(self.fd) if _BELL.fullmatch(n) and self.is_bell(n)]

    def is_bell(self, name: str) -> bool:
        try: st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError: return False
        return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid()

    def remove(self, name: str) -> None:
        "Remove bell `name`, if it is one of ours (a socket of this user with a bell's name)."
        if _BELL.fullmatch(name) and self.is_bell(name):
            try: os.unlink(name, dir_fd=self.fd)
            except FileNotFoundError: pass

    def remove_if_empty(self) -> None:
        "Remove the folder if no bell is left in it and it is still the one that was checked."
        try:
            parent = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError: return
        try:
            st = os.stat(self.path.name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == self.id:
                os.rmdir(self.path.name, dir_fd=parent)  # fails, harmlessly, if another worker listens in it
        except OSError: pass
        finally: os.close(parent)

    def close(self) -> None:
        if self.fd >= 0: os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0: self.close()


class Doorbell:
    "Ring the workers of other processes; listen for rings from them."

    def __init__(self, db: str) -> None:
        self.folder = Path(os.path.abspath(db) + "-wake")
        self._peers: list[str] = []
        self._listed = 0.0
        self._listed_pid = 0
        self._ringer: _Folder | None = None
        self._out: socket.socket | None = None
        self._pid = 0
        self._home: _Folder | None = None
        self._name = ""
        self._warned = False
        self.listening: socket.socket | None = None

    def _open(self, create: bool) -> _Folder | None:
        "The checked folder (None if it does not exist and `create` is false); an unsafe one is refused once, loudly."
        try: return _Folder(self.folder, create)
        except FileNotFoundError:
            if create: raise
            return None
        except UnsafeFolder as e:
            if not self._warned: log.warning("%s", e)
            self._warned = True
            raise

    def listen(self) -> socket.socket:
        "Bind this process's bell and return the socket (non-blocking) to watch for rings."
        tries = 0
        while True:
            tries += 1
            try: home = self._open(create=True)
            except UnsafeFolder: raise
            except OSError as e:
                log.warning("cannot make %s for worker wake-ups (%s); workers in other processes poll", self.folder, e)
                raise
            assert home is not None
            name = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.setblocking(False)
                s.bind(home.address(name))
                os.chmod(name, stat.S_IRUSR | stat.S_IWUSR, dir_fd=home.fd)
            except BaseException as e:
                s.close()
                home.close()
                # The last worker leaving removed the folder between our open and bind: make it again.
                if isinstance(e, FileNotFoundError) and tries < 3: continue
                if isinstance(e, OSError): log.warning("cannot listen for worker wake-ups in %s (%s); workers in "
                                                       "other processes poll", self.folder, e)
                raise
            self._home, self._name, self.listening = home, name, s
            return s

    def drain(self) -> None:
        "Empty the listening socket after a ring."
        assert self.listening is not None
        try:
            while True: self.listening.recv(64)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        "Stop listening, remove this bell, and the folder too when no other bell is left in it; release the ringer."
        if self.listening is not None and self._home is not None:
            self.listening.close()
            self.listening = None
            if self._pid_of(self._name) == os.getpid():
                self._home.remove(self._name)
                self._home.remove_if_empty()
            self._home.close()
            self._home = None
        if self._ringer is not None: self._ringer.close()
        if self._out is not None: self._out.close()
        self._ringer = self._out = None

    @staticmethod
    def _pid_of(name: str) -> int:
        return int(name.partition(".")[0])

    def ring(self) -> int:
        "Wake the workers of every other process on this database; returns how many bells rang."
        now = time.monotonic()
        if now - self._listed > REFRESH or self._listed_pid != pid(): self._list(now)
        if not self._peers or self._ringer is None: return 0
        if self._out is None or self._pid != pid():
            self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._out.setblocking(False)
            self._pid = pid()
        rang = 0
        for name in list(self._peers):
            try:
                self._out.sendto(b"!", self._ringer.address(name))
                rang += 1
            except BlockingIOError:
                rang += 1  # its queue is full: it has been woken already
            except (ConnectionRefusedError, FileNotFoundError):
                self._peers.remove(name)  # a worker that died without closing its bell
                self._ringer.remove(name)
            except OSError:
                pass
        return rang

    def _list(self, now: float) -> None:
        self._listed, own = now, f"{os.getpid()}."
        if self._ringer is not None: self._ringer.close()  # after a fork: this process's copy of the handle
        self._ringer, self._peers, self._listed_pid = None, [], pid()
        self._ringer = self._open(create=False)  # reopened each time: the last worker out may have removed it
        if self._ringer is not None: self._peers = [n for n in self._ringer.bells() if not n.startswith(own)]
