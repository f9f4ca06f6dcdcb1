"""The doorbell: a ring reaches the bells of other processes, skips its own, and forgets dead ones."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from fh_tasks.store.doorbell import Doorbell


def test_a_ring_reaches_another_bell_and_not_its_own(tmp_path: Path) -> None:
    # Given a listening bell of "another process" (a name with a foreign pid) and one of this process
    db = str(tmp_path / "jobs.db")
    mine = Doorbell(db)
    mine.listen()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(str(mine.folder / "999999.peer"))
    other.setblocking(False)
    # When this process rings
    rang = Doorbell(db).ring()
    # Then only the other bell got the ring
    assert rang == 1 and other.recv(8) == b"!"
    with pytest.raises(BlockingIOError): mine.listening.recv(8)
    mine.close()
    other.close()


def test_a_dead_bell_is_removed_on_ring(tmp_path: Path) -> None:
    # Given a bell file left by a worker that died without closing it
    bell = Doorbell(str(tmp_path / "jobs.db"))
    bell._make_folder()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(bell.folder / "999998.dead"))
    dead.close()
    # When a commit rings, Then nothing rang and the stale bell is gone
    assert bell.ring() == 0
    assert not (bell.folder / "999998.dead").exists()


def test_the_folder_is_private_and_long_paths_fall_back(tmp_path: Path) -> None:
    # Given a database path too long for a Unix socket beside it
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    bell = Doorbell(str(deep / "jobs.db"))
    # Then the bell lives in a private per-user folder instead, and a listening bell is 0600
    assert len(str(bell.folder)) < 100
    bell.listen()
    assert stat.S_IMODE(bell.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(bell._path).st_mode) == 0o600
    bell.close()


def test_the_folder_is_read_once_a_second_not_per_ring(tmp_path: Path, monkeypatch) -> None:
    # Given a ringer with no listening peers
    bell = Doorbell(str(tmp_path / "jobs.db"))
    reads: list[str] = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: reads.append(str(p)) or real(p))
    # When it rings many times in a row, Then it read the folder once
    for _ in range(50): bell.ring()
    assert len(reads) == 1
