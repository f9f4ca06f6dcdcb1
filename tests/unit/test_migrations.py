"""Numbered schema migrations: a store made by fh-tasks 0.1.0 is upgraded in place with nothing lost, in one
transaction, once, whoever opens it first; a newer store is refused; the runner's rules for migration files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import ROOT

from fh_tasks import QueueUnavailable, StoreError, Tasks
from fh_tasks.store.migrations import MIGRATIONS, SCHEMA_VERSION, apply, load, statements
from fh_tasks.store.sqlite import SQLiteStore
from fh_tasks.testing import drain

FIXTURE = ROOT / "tests" / "fixtures" / "fh_tasks-0.1.0.db"
#: The columns of fh_jobs in 0.1.0 (schema 1).
V1_COLUMNS = ("seq", "id", "task", "queue", "args", "state", "attempts", "max_attempts", "timeout", "run_at",
              "created_at", "started_at", "finished_at", "lease_until", "worker", "parent", "result", "error",
              "progress")
MIGRATIONS_DIR = ROOT / "fh_tasks" / "store" / "migrations"


def copy_fixture(to: Path) -> str:
    "A copy of the 0.1.0 store (the fixture itself is never opened: SQLite would leave -wal/-shm files beside it)."
    assert not Path(f"{FIXTURE}-wal").exists(), "the fixture must be a checkpointed file without a WAL"
    shutil.copyfile(FIXTURE, to)
    return str(to)


def rows(db: str, sql: str, params: Any = ()) -> list[sqlite3.Row]:
    c = sqlite3.connect(db)
    c.row_factory = sqlite3.Row
    try: return c.execute(sql, params).fetchall()
    finally: c.close()


def jobs_v1(db: str) -> dict[str, dict[str, Any]]:
    "Every job of `db`, by id, with every 0.1.0 field."
    return {r["id"]: {k: r[k] for k in V1_COLUMNS} for r in rows(db, "SELECT * FROM fh_jobs ORDER BY seq")}


def meta(db: str) -> dict[str, str]:
    return {r[0]: r[1] for r in rows(db, "SELECT key, value FROM fh_meta")}


def schema(db: str) -> set[tuple[str, str, str]]:
    return {(r[0], r[1], r[2]) for r in rows(db, "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL")}


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_the_shipped_migrations_start_at_the_0_1_0_schema_and_number_the_version() -> None:
    # The first file is 0.1.0's schema, unchanged, and the version is the last file's number
    assert MIGRATIONS[0].name == "001_initial" and [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    old = subprocess.run(["git", "show", "3621683:fh_tasks/store/schema.sql"], cwd=ROOT, capture_output=True,
                         text=True)
    if old.returncode == 0: assert (MIGRATIONS_DIR / "001_initial.sql").read_text() == old.stdout
    assert SCHEMA_VERSION >= 2, "the 0.1.0 fixture needs at least one migration to test an upgrade"


def test_an_old_store_is_upgraded_in_place_with_nothing_lost(tmp_path: Path) -> None:
    # Given a copy of a store made by fh-tasks 0.1.0, with jobs in every state
    db = copy_fixture(tmp_path / "old.db")
    before = jobs_v1(copy_fixture(tmp_path / "untouched.db"))
    assert meta(db) == {"schema_version": "1"}
    assert {j["state"] for j in before.values()} == {"queued", "scheduled", "succeeded", "failed", "retrying",
                                                     "running", "cancelled", "waiting"}
    # When this version opens it
    store = SQLiteStore(db)
    counts = store.counts()
    # Then it is at the current schema, every migration after 1 ran once, in this process, and is recorded
    m = meta(db)
    assert m["schema_version"] == str(SCHEMA_VERSION)
    ran = {k.split(":", 1)[1]: json.loads(v) for k, v in m.items() if k.startswith("migration:")}
    assert sorted(ran) == [x.name for x in MIGRATIONS[1:]]
    assert all(r["pid"] == os.getpid() and r["by"].startswith("fh-tasks ") for r in ran.values())
    # And every row and every field of 0.1.0 is as it was
    assert jobs_v1(db) == before
    assert sum(counts.values()) == len(before) == 9
    # And the upgraded file has exactly the schema of a store made fresh by this version
    fresh = str(tmp_path / "fresh.db")
    SQLiteStore(fresh).counts()
    assert schema(db) == schema(fresh)
    # And the records read back with their results, errors and progress
    by_state = {j["state"]: i for i, j in before.items() if j["task"] == "fixture:add"}
    assert store.get(by_state["succeeded"]).result == 11
    failed = store.get(by_state["failed"]).error
    assert failed["type"] == "ValueError" and failed["message"] == "boom" and failed["traceback"] == "Traceback..."
    assert store.get(by_state["retrying"]).error["message"] == "down"
    assert store.get(by_state["running"]).progress == {"done": 3, "total": 10}
    store.close()


def test_the_upgraded_store_runs_its_jobs_and_its_chain(tmp_path: Path) -> None:
    # Given the upgraded 0.1.0 store and the fixture's tasks registered under their stored names
    db = copy_fixture(tmp_path / "old.db")
    before = jobs_v1(db)
    hub = Tasks(db=db, workers=0, retention=None)
    steps: list[int] = []
    hub.task(name="fixture:add", retries=2)(lambda a, b: a + b)
    hub.task(name="fixture:chain_step")(lambda n: steps.append(n))
    # When a burst worker drains it, and the failed job is retried and drained again
    drain(hub)
    failed = next(i for i, j in before.items() if j["state"] == "failed")
    assert hub.retry(failed)
    drain(hub)
    # Then the due job ran, the chain ran in order (its second step released by the first), the retried job
    # succeeded, and the jobs not due (scheduled, retrying, running under a lease) are as they were
    after = {r.id: r for r in hub.jobs(limit=100)}
    state = {j["state"]: i for i, j in before.items() if j["task"] == "fixture:add"}
    assert after[state["queued"]].state == "succeeded" and after[state["queued"]].result == 3
    assert steps == [1, 2]
    assert all(after[i].state == "succeeded" for i, j in before.items() if j["task"] == "fixture:chain_step")
    assert after[failed].state == "succeeded" and after[failed].result == 15
    now = jobs_v1(db)
    for s in ("scheduled", "retrying", "running", "succeeded", "cancelled"): assert now[state[s]] == before[state[s]]
    hub.store.close()


def test_a_store_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    # Given a store that claims a schema newer than this version knows
    db = str(tmp_path / "new.db")
    SQLiteStore(db).counts()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE fh_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with sqlite3.connect(db) as c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    was = digest(db)
    # When it is opened, read-write or read-only, Then it is refused, saying what to do, and left as it was
    for store in (SQLiteStore(db), SQLiteStore(db, readonly=True)):
        with pytest.raises(QueueUnavailable, match=f"was made by a newer fh-tasks: schema {SCHEMA_VERSION + 1}, this "
                                                   f"version knows up to {SCHEMA_VERSION}; upgrade fh-tasks"):
            store.counts()
    assert digest(db) == was and meta(db)["schema_version"] == str(SCHEMA_VERSION + 1)


def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    # Given the shipped migrations plus one that fails half-way, and a 0.1.0 store
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    bad = f"{SCHEMA_VERSION + 1:03d}_broken"
    (folder / f"{bad}.sql").write_text("CREATE TABLE half (a);\nINSERT INTO no_such_table VALUES (1);\n")
    migrations = load(folder)
    db = copy_fixture(tmp_path / "old.db")
    before = jobs_v1(db)
    # When they are applied, Then the error names the migration, and not one of them is left applied
    c = sqlite3.connect(db, isolation_level=None)
    with pytest.raises(StoreError, match=f"migration {bad} failed .*no such table: no_such_table.*nothing was changed"):
        apply(c, db, migrations)
    assert not c.in_transaction
    c.close()
    assert meta(db) == {"schema_version": "1"} and jobs_v1(db) == before
    assert not rows(db, "SELECT name FROM sqlite_master WHERE name IN ('half', 'fh_workers', 'fh_events')")


CHILD = """
import sys
from fh_tasks.store.sqlite import SQLiteStore
store = SQLiteStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
print(sum(store.counts().values()), flush=True)
"""


def test_processes_opening_an_old_store_at_once_all_succeed_and_it_is_migrated_once(tmp_path: Path) -> None:
    # Given a 0.1.0 store and three processes about to open it, released together
    db = copy_fixture(tmp_path / "old.db")
    before = jobs_v1(db)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    try:
        for p in procs: assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    # Then every one of them opened it and saw every job (a migration run twice would fail: 002 adds columns)
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    assert [o[0].strip() for o in outs] == ["9"] * 3
    # And each migration was recorded once, all by one process, in one transaction
    ran = [json.loads(v) for k, v in meta(db).items() if k.startswith("migration:")]
    assert len(ran) == SCHEMA_VERSION - 1 and len({r["pid"] for r in ran}) == 1
    assert ran[0]["pid"] in {p.pid for p in procs}
    assert meta(db)["schema_version"] == str(SCHEMA_VERSION) and jobs_v1(db) == before


def test_a_fresh_store_runs_every_migration(tmp_path: Path) -> None:
    db = str(tmp_path / "fresh.db")
    SQLiteStore(db).counts()
    m = meta(db)
    assert m["schema_version"] == str(SCHEMA_VERSION)
    assert sorted(k for k in m if k.startswith("migration:")) == [f"migration:{x.name}" for x in MIGRATIONS]


# -- the runner's rules ---------------------------------------------------------------------------------------
def folder_with(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    for name, text in files.items(): (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("files, message", [
    ({"001_a.sql": "CREATE TABLE a (x);", "003_c.sql": "CREATE TABLE c (x);"},
     "numbered 001, 002, ... without gaps; found 001_a, 003_c"),
    ({"001_a.sql": "CREATE TABLE a (x);", "001_b.sql": "CREATE TABLE b (x);"}, "have the same number 001"),
    ({"001_a.sql": "CREATE TABLE a (x);", "2_b.sql": "CREATE TABLE b (x);"}, "'2_b.sql' is not named NNN_name.sql"),
    ({"001_Add-Thing.sql": "CREATE TABLE a (x);"}, "is not named NNN_name.sql"),
    ({"001_a.sql": "CREATE TABLE a (x);\nCOMMIT;\nCREATE TABLE b (x);"}, "001_a runs COMMIT"),
    ({"001_a.sql": "BEGIN;\nCREATE TABLE a (x);"}, "001_a runs BEGIN"),
    ({"001_a.sql": "VACUUM;"}, "001_a runs VACUUM"),
    ({"001_a.sql": "CREATE TABLE a (x);\nCREATE TABLE b (x)"}, "001_a ends with an unfinished statement"),
    ({"notes.txt": "not a migration"}, "no migration files"),
])
def test_a_folder_of_migrations_that_breaks_a_rule_is_refused(tmp_path: Path, files: dict[str, str],
                                                              message: str) -> None:
    with pytest.raises(StoreError, match=message): load(folder_with(tmp_path, files))


def test_statements_keep_triggers_whole_and_skip_comments() -> None:
    script = """-- a comment; with a semicolon
CREATE TABLE t (x TEXT DEFAULT ';');  /* one; */ CREATE TABLE u (y);
CREATE TRIGGER tr AFTER INSERT ON t BEGIN
    INSERT INTO u VALUES (1);
    INSERT INTO u VALUES (2);
END;
-- trailing comment
"""
    got = statements(script)
    assert len(got) == 3 and got[2].startswith("CREATE TRIGGER tr") and got[2].endswith("END;")
    c = sqlite3.connect(":memory:")
    for s in got: c.execute(s)
    c.execute("INSERT INTO t VALUES ('a')")
    assert c.execute("SELECT count(*) FROM u").fetchone()[0] == 2


def test_a_new_file_in_the_folder_is_all_a_migration_takes(tmp_path: Path) -> None:
    # Given a store at the current version, and the shipped migrations plus one more file
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (folder / f"{SCHEMA_VERSION + 1:03d}_notes.sql").write_text("CREATE TABLE fh_notes (id INTEGER PRIMARY KEY);\n")
    db = str(tmp_path / "jobs.db")
    SQLiteStore(db).counts()
    # When the runner applies the folder, Then only the new file ran, and the version is its number
    c = sqlite3.connect(db, isolation_level=None)
    ran = apply(c, db, load(folder))
    assert [m.version for m in ran] == [SCHEMA_VERSION + 1] and apply(c, db, load(folder)) == []
    c.close()
    assert meta(db)["schema_version"] == str(SCHEMA_VERSION + 1) and rows(db, "SELECT * FROM fh_notes") == []
