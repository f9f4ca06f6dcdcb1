"""Opening a store: a file that is not an fh-tasks store is refused untouched, a read-only store never writes, and
`create=False` never makes a file."""
from __future__ import annotations

import hashlib
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from support import ROOT

from fh_tasks import QueueUnavailable, StoreError
from fh_tasks.store import NewJob
from fh_tasks.store.migrations import SCHEMA_VERSION
from fh_tasks.store.sqlite import SQLiteStore
from fh_tasks.task import new_id


def files_of(db: Path) -> dict[str, str]:
    "The database file and any file beside it that SQLite or fh-tasks makes (-wal, -shm, -journal, -wake), hashed."
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(db.parent.iterdir()) if p.name.startswith(db.name)}


def other_apps_db(path: Path) -> Path:
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    c.execute("INSERT INTO customers (name) VALUES ('ada')")
    c.commit()
    c.close()
    return path


def job(i: int = 0) -> NewJob:
    now = time.time()
    return NewJob(id=f"job{i}", task="t", args='{"args": [], "kwargs": {}}', created_at=now, run_at=now)


@pytest.mark.parametrize("readonly", [False, True])
def test_another_apps_sqlite_database_is_refused_untouched(tmp_path: Path, readonly: bool) -> None:
    # Given an SQLite database of another app (rollback journal, its own table)
    db = other_apps_db(tmp_path / "app.db")
    before = files_of(db)
    # When a store opens it, Then it is refused with the file and the reason named
    with pytest.raises(QueueUnavailable, match=rf"{db} is not an fh-tasks job store: it is an SQLite database holding "
                                               r"other tables \(customers\)"):
        SQLiteStore(db, readonly=readonly).counts()
    # And nothing was written: same bytes, no WAL, no job tables, no wake-up folder
    assert files_of(db) == before == {"app.db": before["app.db"]}
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["customers"]
    c.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path: Path, readonly: bool) -> None:
    db = tmp_path / "notes.db"
    db.write_text("these are my notes, not a database\n" * 200)
    before = files_of(db)
    with pytest.raises(QueueUnavailable, match=rf"{db} is not an SQLite database"):
        SQLiteStore(db, readonly=readonly).counts()
    assert files_of(db) == before


def test_a_folder_in_the_files_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / "jobs.db").mkdir()
    with pytest.raises(QueueUnavailable, match="it is not a file"): SQLiteStore(tmp_path / "jobs.db").counts()


@pytest.mark.parametrize("kw", [{"readonly": True}, {"create": False}])
def test_a_missing_file_is_not_created_when_told_not_to(tmp_path: Path, kw: dict[str, bool]) -> None:
    db = tmp_path / "missing.db"
    with pytest.raises(QueueUnavailable, match=f"no job store at {db}: the file does not exist"):
        SQLiteStore(db, **kw).counts()
    assert list(tmp_path.iterdir()) == []


def test_an_empty_file_is_adopted_but_not_read_without_writing(tmp_path: Path) -> None:
    # Given an empty file (as a crash right after creating a store leaves)
    db = tmp_path / "jobs.db"
    db.touch()
    # Then read-only it is refused, saying why, and read-write it becomes a store
    with pytest.raises(QueueUnavailable, match="cannot read job store .* without writing to it: it is empty"):
        SQLiteStore(db, readonly=True).counts()
    assert db.stat().st_size == 0
    s = SQLiteStore(db, create=False)
    s.enqueue([job()])
    assert s.counts() == {"queued": 1}
    s.close()


def test_a_read_only_store_reads_and_never_writes(tmp_path: Path) -> None:
    # Given a store with a job, closed (so the database file holds everything)
    db = tmp_path / "jobs.db"
    w = SQLiteStore(db)
    w.enqueue([job(1)])
    w.close()
    before = files_of(db)
    # When it is opened read-only, Then it reads
    r = SQLiteStore(db, readonly=True)
    assert r.counts() == {"queued": 1} and r.get("job1") is not None and [j.id for j in r.jobs()] == ["job1"]
    # And every write is refused with a clear error
    with pytest.raises(StoreError, match=f"cannot enqueue: job store {db} was opened read-only"): r.enqueue([job(3)])
    with pytest.raises(StoreError, match="was opened read-only"): r.cancel("job1")
    assert r.counts() == {"queued": 1}
    r.close()
    # And the database is byte for byte as it was, still in WAL mode; nothing else was made but SQLite's empty WAL
    after = files_of(db)
    assert after["jobs.db"] == before["jobs.db"]
    assert set(after) <= {"jobs.db", "jobs.db-wal", "jobs.db-shm"} and not Path(f"{db}-wal").read_bytes()
    c = sqlite3.connect(db)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()


def test_a_read_only_store_sees_what_others_commit(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    w = SQLiteStore(db)
    w.enqueue([job(1)])
    r = SQLiteStore(db, readonly=True)
    assert r.counts() == {"queued": 1}
    w.enqueue([job(2)])
    w.cancel("job1")
    assert r.counts() == {"queued": 1, "cancelled": 1}
    r.close()
    w.close()


def test_a_read_only_store_refuses_an_old_schema_it_cannot_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    shutil.copyfile(ROOT / "tests" / "fixtures" / "fh_tasks-0.1.0.db", db)
    before = files_of(db)
    with pytest.raises(QueueUnavailable, match=f"it has schema 1, this fh-tasks needs {SCHEMA_VERSION}; open it once "
                                               "read-write"):
        SQLiteStore(db, readonly=True).counts()
    assert files_of(db)["old.db"] == before["old.db"]


def test_a_new_store_opened_by_8_connections_at_once_opens_in_every_one(tmp_path: Path) -> None:
    # Given a new file that 8 stores (8 connections) open at the same moment, 100 times over: switching it to WAL
    # once made SQLite answer "database is locked" at once to a connection that lost the race (~3 % of rounds)
    for round in range(100):
        db = tmp_path / f"jobs-{round}.db"
        stores = [SQLiteStore(db) for _ in range(8)]
        go, errors = threading.Barrier(8), []
        threads = [threading.Thread(target=_open_and_store, args=(s, go, errors)) for s in stores]
        for t in threads: t.start()
        for t in threads: t.join()
        # Then every one of them opened it and stored its job
        assert errors == [], f"round {round}: {errors[0]!r}"
        assert stores[0].counts().get("queued") == 8
        for s in stores: s.close()


def _open_and_store(store: SQLiteStore, go: threading.Barrier, errors: list[Exception]) -> None:
    "Wait for the others, then store one job (the store opens its connection on this first use)."
    go.wait()
    try: store.enqueue([NewJob(id=new_id(), task="t", args="{}", run_at=time.time(), created_at=time.time())])
    except Exception as e: errors.append(e)
