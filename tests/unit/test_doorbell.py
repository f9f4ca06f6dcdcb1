"""The doorbell: a ring reaches the bells of other processes, skips its own, and forgets dead ones; its folder stays
beside the database whatever the path's length, and it never follows, rings or removes what it did not make."""
from __future__ import annotations

import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fh_tasks.store import NewJob
from fh_tasks.store.doorbell import REFRESH, Doorbell, UnsafeFolder, _Folder
from fh_tasks.store.sqlite import SQLiteStore


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made: s.close()


def bound(path: Path | str, made: list[socket.socket], *, close: bool = False) -> socket.socket:
    "A datagram socket bound at `path` (closed at once with `close`: a bell whose worker died)."
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.setblocking(False)
    if close: s.close()
    else: made.append(s)
    return s


def private(folder: Path) -> Path:
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    return folder


def test_a_ring_reaches_another_bell_and_not_its_own(tmp_path: Path, sockets) -> None:
    # Given a listening bell of this process and one of "another process" (a bell name with a foreign pid)
    db = str(tmp_path / "jobs.db")
    mine = Doorbell(db)
    mine.listen()
    other = bound(mine.folder / "999999.0123abcd", sockets)
    # When this process rings
    ringer = Doorbell(db)
    rang = ringer.ring()
    # Then only the other bell got the ring
    assert rang == 1 and other.recv(8) == b"!"
    with pytest.raises(BlockingIOError): mine.listening.recv(8)
    mine.close()
    ringer.close()


def test_a_dead_bell_is_removed_on_ring(tmp_path: Path, sockets) -> None:
    # Given a bell file left by a worker that died without closing it
    bell = Doorbell(str(tmp_path / "jobs.db"))
    bound(private(bell.folder) / "999998.0123abcd", sockets, close=True)
    # When a commit rings, Then nothing rang and the stale bell is gone
    assert bell.ring() == 0
    assert not (bell.folder / "999998.0123abcd").exists()
    bell.close()


def test_long_database_paths_keep_the_folder_beside_the_database(tmp_path: Path, monkeypatch, sockets) -> None:
    # Given a database path far longer than a Unix socket address (108 bytes), and a sandboxed temp folder
    sandbox = tmp_path / "tmp"
    sandbox.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox))
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    db = str(deep / "jobs.db")
    # When a worker listens and another process's commit rings
    bell = Doorbell(db)
    bell.listen()
    assert bell.folder == Path(db + "-wake")
    ringer = Doorbell(db)
    assert ringer.ring() == 0  # its own pid: a socket named with another pid stands for the other process's bell
    folder = _Folder(bell.folder, create=False)
    other = bound(folder.address("999997.0123abcd"), sockets)
    time.sleep(REFRESH + 0.05)
    assert ringer.ring() == 1 and other.recv(8) == b"!"
    folder.close()
    ringer.close()
    # Then the bell lives beside the database, private, and nothing was made in the shared temp folder
    assert stat.S_IMODE(bell.folder.stat().st_mode) == 0o700
    mine = [n for n in os.listdir(bell.folder) if n.startswith(f"{os.getpid()}.")]
    assert len(mine) == 1 and stat.S_IMODE(os.lstat(bell.folder / mine[0]).st_mode) == 0o600
    assert os.listdir(sandbox) == []
    bell.close()


def test_the_last_worker_out_removes_the_folder(tmp_path: Path, sockets) -> None:
    # Given two listening workers on one database
    db = str(tmp_path / "jobs.db")
    a, b = Doorbell(db), Doorbell(db)
    a.listen()
    b.listen()
    # When one stops, Then the folder stays for the other; when the last one stops, the folder is gone
    a.close()
    assert len(os.listdir(a.folder)) == 1
    b.close()
    assert not a.folder.exists()
    # And a folder holding anything else (here a file a person put there) is left alone, with the file
    c = Doorbell(db)
    c.listen()
    (c.folder / "notes.txt").write_text("mine")
    c.close()
    assert (c.folder / "notes.txt").read_text() == "mine"


def test_a_folder_put_in_place_of_ours_is_not_removed(tmp_path: Path) -> None:
    # Given a listening worker whose folder was moved away and replaced by another empty private folder
    db = str(tmp_path / "jobs.db")
    bell = Doorbell(db)
    bell.listen()
    os.rename(bell.folder, tmp_path / "moved")
    private(bell.folder)
    # When the worker stops, Then its bell is removed from its own folder, and the other folder stays
    bell.close()
    assert bell.folder.is_dir() and os.listdir(tmp_path / "moved") == []


def test_a_worker_listens_again_after_the_last_one_removed_the_folder(tmp_path: Path) -> None:
    # Given a ringer that listed the folder while a worker listened, and that worker gone with its folder
    db = str(tmp_path / "jobs.db")
    first, ringer = Doorbell(db), Doorbell(db)
    first.listen()
    ringer.ring()
    first.close()
    ringer.close()
    assert not first.folder.exists()
    # When a new worker listens, Then the folder is made again, and the ringer finds it at its next refresh
    second = Doorbell(db)
    second.listen()
    assert second.folder.is_dir()
    second.close()


def test_the_folder_is_read_once_a_second_not_per_ring(tmp_path: Path, sockets) -> None:
    # Given a ringer that has read the folder once (nobody listened yet)
    db = str(tmp_path / "jobs.db")
    ringer = Doorbell(db)
    assert ringer.ring() == 0
    # When a bell appears, Then rings within the refresh interval do not read the folder again
    other = bound(private(Path(db + "-wake")) / "999996.0123abcd", sockets)
    assert all(ringer.ring() == 0 for _ in range(50))
    # And after it they do, and the new bell rings
    time.sleep(REFRESH + 0.05)
    assert ringer.ring() == 1 and other.recv(8) == b"!"
    ringer.close()


# -- a wake-up folder made by someone else ------------------------------------------------------------------------
@pytest.fixture
def victim(tmp_path: Path, sockets) -> dict[str, object]:
    "A folder of the app user's files, one of them a dead socket named like a bell: nothing may touch them."
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    (folder / "123.deadbeef").write_text("a file named like a bell")
    bound(folder / "124.deadbeef", sockets, close=True)
    live = bound(folder / "live.sock", sockets)
    return {"folder": folder, "live": live, "before": _snapshot(folder)}


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {n: (st.st_ino, st.st_mode, st.st_size) for n in os.listdir(folder)
            for st in [os.lstat(folder / n)]}


def _untouched(v: dict[str, object]) -> None:
    folder = v["folder"]
    assert isinstance(folder, Path)
    assert _snapshot(folder) == v["before"]
    assert (folder / "thesis.txt").read_text() == "years of work"
    live = v["live"]
    assert isinstance(live, socket.socket)
    with pytest.raises(BlockingIOError): live.recv(8)


def _refused(db: str, why: str, caplog: pytest.LogCaptureFixture) -> None:
    "Ringing and listening both refuse the folder, saying why, and a store on the database still works."
    with pytest.raises(UnsafeFolder, match=why): Doorbell(db).ring()
    with pytest.raises(UnsafeFolder, match=why): Doorbell(db).listen()
    with caplog.at_level(logging.WARNING, logger="fh_tasks.doorbell"):
        store = SQLiteStore(db)
        assert store.listen() is None  # workers fall back to polling
        now = time.time()
        store.enqueue([NewJob(id="j1", task="t", args="{}", created_at=now, run_at=now)])
        assert store.counts() == {"queued": 1}
        store.close()
    assert any(why in r.getMessage() and "must be a folder of this user with mode 0700" in r.getMessage()
               for r in caplog.records)


def test_a_symlink_to_another_folder_is_refused(tmp_path: Path, victim, caplog) -> None:
    # Given `<db>-wake` planted as a symbolic link to a private folder of the app user's files
    db = str(tmp_path / "jobs.db")
    os.chmod(victim["folder"], 0o700)
    victim["before"] = _snapshot(victim["folder"])
    os.symlink(victim["folder"], db + "-wake")
    # Then nothing lists, rings or removes through it, and every refusal says why
    _refused(db, "it is a symbolic link", caplog)
    _untouched(victim)
    assert os.path.islink(db + "-wake")


def test_a_folder_open_to_others_is_refused(tmp_path: Path, victim, caplog) -> None:
    # Given the wake-up folder itself, holding the victim's files, with a mode that lets others in
    db = str(tmp_path / "jobs.db")
    os.rename(victim["folder"], db + "-wake")
    os.chmod(db + "-wake", 0o755)
    victim["folder"] = Path(db + "-wake")
    # Then it is refused, with its mode named, and its files are untouched
    _refused(db, "its mode is 0755, not 0700", caplog)
    _untouched(victim)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_a_folder_of_another_user_is_refused(tmp_path: Path, victim, caplog) -> None:
    # Given the wake-up folder made first by another local user (uid 65534), mode 0700
    db = str(tmp_path / "jobs.db")
    os.rename(victim["folder"], db + "-wake")
    os.chmod(db + "-wake", 0o700)
    os.chown(db + "-wake", 65534, 65534)
    victim["folder"] = Path(db + "-wake")
    # Then it is refused, with its owner named
    _refused(db, "it belongs to uid 65534, not to this user", caplog)
    _untouched(victim)


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_file_or_pipe_in_the_folders_place_is_refused(tmp_path: Path, kind: str, caplog) -> None:
    # Given a regular file or a named pipe where the wake-up folder goes
    db = str(tmp_path / "jobs.db")
    if kind == "file": Path(db + "-wake").write_text("data")
    else: os.mkfifo(db + "-wake")
    before = os.lstat(db + "-wake")
    # Then it is refused, named for what it is, and left as it was
    _refused(db, "it is a file" if kind == "file" else "it is a named pipe", caplog)
    after = os.lstat(db + "-wake")
    assert (after.st_ino, after.st_mode, after.st_size) == (before.st_ino, before.st_mode, before.st_size)


def test_only_our_own_sockets_are_rung_or_removed(tmp_path: Path, victim, sockets) -> None:
    # Given a private wake-up folder holding a live bell, a dead bell, and things with bell-like names that are not
    # bells: a regular file, a named pipe, a symlink to a live socket elsewhere and one to a victim's file
    db = str(tmp_path / "jobs.db")
    folder = private(Path(db + "-wake"))
    live = bound(folder / "999990.0123abcd", sockets)
    bound(folder / "999991.0123abcd", sockets, close=True)
    (folder / "999992.0123abcd").write_text("not a socket")
    os.mkfifo(folder / "999993.0123abcd")
    victim_folder = victim["folder"]
    assert isinstance(victim_folder, Path)
    os.symlink(victim_folder / "live.sock", folder / "999994.0123abcd")
    os.symlink(victim_folder / "124.deadbeef", folder / "999995.0123abcd")
    bound(folder / "not-a-bell-name", sockets, close=True)
    # When a commit rings
    ringer = Doorbell(db)
    rang = ringer.ring()
    ringer.close()
    # Then only the live bell rang, only the dead bell was removed, and everything else is as it was
    assert rang == 1 and live.recv(8) == b"!"
    assert sorted(os.listdir(folder)) == ["999990.0123abcd", "999992.0123abcd", "999993.0123abcd", "999994.0123abcd",
                                          "999995.0123abcd", "not-a-bell-name"]
    _untouched(victim)


def test_without_proc_a_short_path_still_works_and_a_long_one_is_refused_clearly(tmp_path: Path, sockets) -> None:
    # Given the folder opened as on a system without /proc
    short = _Folder(private(tmp_path / "w"), create=False)
    short._proc = False
    # Then a bell is addressed by its plain path while it fits, and the folder must still be the one checked
    s = bound(short.address("1.0123abcd"), sockets)
    assert s.getsockname() == str(tmp_path / "w" / "1.0123abcd")
    os.rename(tmp_path / "w", tmp_path / "moved")
    private(tmp_path / "w")
    with pytest.raises(OSError, match="was replaced since it was checked"): short.address("2.0123abcd")
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    long = _Folder(private(deep / "w"), create=False)
    long._proc = False
    with pytest.raises(OSError, match="too long for a Unix socket address and /proc is missing"):
        long.address("3.0123abcd")
    short.close()
    long.close()
