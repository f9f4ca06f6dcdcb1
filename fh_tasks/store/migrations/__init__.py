"""Numbered schema migrations of the SQLite store: the files `NNN_name.sql` in this folder.

Adding a file `004_something.sql` here is all a schema change takes: `SCHEMA_VERSION` is the highest number, and
opening a store at an older version runs the missing files in order, in one `BEGIN IMMEDIATE` transaction, each
one setting `fh_meta.schema_version` to its number and recording itself under the key `migration:NNN_name`.
Several processes opening the same old file at once are safe: the first takes the write lock and migrates, the
others find the work done. A file must not manage transactions itself (no BEGIN, COMMIT, VACUUM...).
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from ...errors import QueueUnavailable, StoreError

__all__ = ["Migration", "MIGRATIONS", "SCHEMA_VERSION", "load", "statements", "stored_version", "apply"]

_NAME = re.compile(r"(\d{3})_([a-z0-9_]+)\.sql")
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_NOT_IN_A_MIGRATION = ("BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "VACUUM", "ATTACH", "DETACH")


@dataclass(frozen=True)
class Migration:
    "One numbered file: its version, its name (`002_workers`) and its statements."
    version: int
    name: str
    statements: tuple[str, ...]


def statements(script: str, name: str = "script") -> list[str]:
    "The SQL statements of `script`, cut where SQLite says one is complete (a trigger's body stays whole)."
    out, start = [], 0
    for i, ch in enumerate(script):
        if ch == ";" and sqlite3.complete_statement(script[start:i + 1]):
            stmt = script[start:i + 1].strip()
            start = i + 1
            if _COMMENTS.sub("", stmt).strip() != ";": out.append(stmt)
    if _COMMENTS.sub("", script[start:]).strip():
        raise StoreError(f"migration {name} ends with an unfinished statement (a missing ';'?)")
    return out


def _check(name: str, stmts: list[str]) -> tuple[str, ...]:
    for s in stmts:
        first = _COMMENTS.sub("", s).split(None, 1)[0].rstrip(";").upper()
        if first in _NOT_IN_A_MIGRATION:
            raise StoreError(f"migration {name} runs {first}: migrations run inside the runner's transaction "
                             "and must not manage transactions or attach databases")
    return tuple(stmts)


def load(folder: str | os.PathLike[str] | None = None) -> tuple[Migration, ...]:
    """The migrations in `folder` (default: this package), in order. Refuses a `.sql` file not named `NNN_name.sql`,
    two files with one number, and a gap in the numbers (a store must never skip one)."""
    root: Any = files(__name__) if folder is None else Path(folder)
    found: dict[int, Migration] = {}
    for f in root.iterdir():
        if not f.name.endswith(".sql"): continue
        m = _NAME.fullmatch(f.name)
        if not m: raise StoreError(f"migration file {f.name!r} is not named NNN_name.sql (like 004_add_index.sql)")
        v, name = int(m.group(1)), f.name[:-4]
        if v in found: raise StoreError(f"migrations {found[v].name} and {name} have the same number {v:03d}")
        found[v] = Migration(v, name, _check(name, statements(f.read_text(encoding="utf-8"), name)))
    if not found: raise StoreError(f"no migration files in {root} (a broken install?)")
    if sorted(found) != list(range(1, len(found) + 1)):
        names = ", ".join(found[v].name for v in sorted(found))
        raise StoreError(f"migrations must be numbered 001, 002, ... without gaps; found {names}")
    return tuple(found[v] for v in sorted(found))


MIGRATIONS = load()
#: The schema version this fh-tasks writes: the number of its last migration.
SCHEMA_VERSION = MIGRATIONS[-1].version


def stored_version(c: sqlite3.Connection, path: str, known: int = SCHEMA_VERSION) -> int:
    """The schema version of the database open on `c`: 0 when it is empty. Refuses (QueueUnavailable) a file that
    is not SQLite, a database that holds other tables and no fh-tasks store, and a store made by a newer fh-tasks."""
    try:
        names = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        if not names: return 0
        if "fh_meta" not in names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise QueueUnavailable(f"{path} is not an fh-tasks job store: it is an SQLite database holding other "
                                   f"tables ({shown}); not adding job tables to it (give fh-tasks a file of its own)")
        row = c.execute("SELECT value FROM fh_meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        if "not a database" not in str(e): raise
        raise QueueUnavailable(f"{path} is not an SQLite database ({e}); refusing to use it as a job store") from None
    try: v = int(row[0])
    except (TypeError, ValueError):
        raise QueueUnavailable(f"{path} has an fh_meta table without a schema version: it is not an fh-tasks job "
                               "store, or it was damaged") from None
    if v > known:
        raise QueueUnavailable(f"job store {path} was made by a newer fh-tasks: schema {v}, this version knows up to "
                               f"{known}; upgrade fh-tasks")
    return v


def apply(c: sqlite3.Connection, path: str, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[Migration]:
    """Bring the database open on `c` (autocommit mode) up to the last of `migrations`, all in one `BEGIN IMMEDIATE`
    transaction: all of them or none. Returns the migrations it ran (none when another process was first)."""
    from ... import __version__
    known = migrations[-1].version
    c.execute("BEGIN IMMEDIATE")  # the version is read again under the write lock: another process may have migrated
    try:
        have = stored_version(c, path, known)
        todo = [m for m in migrations if m.version > have]
        for m in todo:
            record = json.dumps({"at": time.time(), "pid": os.getpid(), "by": f"fh-tasks {__version__}"})
            try:
                for s in m.statements: c.execute(s)
                c.execute("INSERT OR REPLACE INTO fh_meta (key, value) VALUES ('schema_version', ?)", (str(m.version),))
                c.execute("INSERT INTO fh_meta (key, value) VALUES (?, ?)", (f"migration:{m.name}", record))
            except sqlite3.Error as e:
                raise StoreError(f"job store {path}: migration {m.name} failed ({e}); nothing was changed") from e
        c.execute("COMMIT")
    except BaseException:
        if c.in_transaction: c.execute("ROLLBACK")
        raise
    return todo
