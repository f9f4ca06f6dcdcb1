"""Which hub and store a command works on: `module:attr` loaded like `python -m` would, or a store file (`--db`)."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import TYPE_CHECKING, Any

from ..hub import DEFAULT_DB, Tasks
from .values import CliError

if TYPE_CHECKING:
    from ..store.sqlite import SQLiteStore

#: Commands that only read the store: they open it read-only, so they can never change it.
READ_ONLY = ("ls", "show", "stats", "wait", "backup", "cron")


def load_target(spec: str) -> Tasks:
    "The `Tasks` hub named by `module:attr` (a hub, or an app a hub is bound to; `module` alone: its one hub)."
    mod_name, _, attr = spec.partition(":")
    if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        module = re.sub(r"\.py$", "", mod_name).replace("\\", "/")
        module = ".".join(p for p in module.split("/") if p not in ("", "."))
        raise CliError(f"{spec!r} names a file; name its module instead: {module}{':' + attr if attr else ''} "
                       "(from the folder its path starts in)")
    if not mod_name or not re.fullmatch(r"[\w.]+", mod_name):
        raise CliError(f"{spec!r} is not module:attribute (for example myapp:tasks)")
    if os.getcwd() not in sys.path: sys.path.insert(0, os.getcwd())  # like `python -m`, find the project's modules
    try: mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (mod_name == e.name or mod_name.startswith(e.name + ".")): raise
        raise CliError(f"cannot import {mod_name!r}: no such module "
                       "(run from the project directory or set PYTHONPATH)") from None
    hubs = [v for v in vars(mod).values() if isinstance(v, Tasks)]
    if not attr:
        if len(hubs) == 1: return hubs[0]
        raise CliError(f"{mod_name} defines {len(hubs)} Tasks hubs; name one: {mod_name}:tasks")
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part): raise CliError(f"{mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Tasks): return obj
    bound = [h for h in hubs if h.app is obj]
    if len(bound) == 1: return bound[0]
    raise CliError(f"{spec} is a {type(obj).__name__}, not a Tasks hub, and no hub in {mod_name} is bound to it; "
                   f"point at the hub instead (for example {mod_name}:tasks)")


def hub_of(args: argparse.Namespace) -> Tasks:
    """The hub to inspect: from --app (its registry and store), else the store file --db. The store must exist
    already; `ls`, `show`, `stats` and `wait` open it read-only."""
    from ..store.sqlite import SQLiteStore
    readonly = args.command in READ_ONLY
    if args.app:
        hub = load_target(args.app)
        if args.db: use_db(hub, args.db, readonly=readonly, create=False)
        elif (store := sqlite_of(hub)) is not None and not store.memory:
            use_db(hub, store.path, readonly=readonly, create=False)
        return hub
    path = args.db or DEFAULT_DB
    if not os.path.exists(path):
        raise CliError(f"no job store at {path}; pass --db PATH or --app module:attr (or set FH_TASKS_DB)")
    return Tasks(store=SQLiteStore(path, readonly=readonly, create=False), workers=0, retention=None)


def sqlite_of(hub: Tasks) -> SQLiteStore | None:
    "The hub's SQLite store, or None on another engine."
    from ..engines.sqlite import SQLiteEngine
    return hub.engine.store if isinstance(hub.engine, SQLiteEngine) else None


def use_db(hub: Tasks, path: str, *, readonly: bool = False, create: bool = True) -> None:
    "Point the hub's SQLite engine at the store file `path` (`--db`)."
    from ..engines.sqlite import SQLiteEngine
    from ..store.sqlite import SQLiteStore
    if not isinstance(hub.engine, SQLiteEngine):
        raise CliError(f"--db names a SQLite store, but {hub.engine.name!r} is this hub's engine")
    hub.engine.use_store(SQLiteStore(path, durability=hub.settings.durability, readonly=readonly, create=create))
