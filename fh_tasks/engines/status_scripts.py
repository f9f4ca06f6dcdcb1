"""The status store's Lua: the named scripts of `status.lua`, loaded once into `SCRIPTS` (name -> script, each run
after `_PRELUDE`), and what the status store's modules share (`connect`, reading a job's hash, `STATES`, `_safe`).
`status.py`, `status_dashboard.py` and `status_feed.py` import from here, so none of them imports another."""
from __future__ import annotations

import re
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from ..records import JobRecord, JobState

if TYPE_CHECKING:
    import redis

__all__ = ["SCRIPTS", "STATES", "connect"]


def _load_scripts() -> dict[str, str]:
    """The sections of `status.lua` by name, each as Redis runs it: its code, without the comments before and after
    it (the file's; the comments within the code are sent), between two newlines."""
    text = files(__package__).joinpath("status.lua").read_text()
    out: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        lines = body.splitlines()
        while lines and (not lines[0].strip() or lines[0].startswith("--")): del lines[0]
        while lines and (not lines[-1].strip() or lines[-1].startswith("--")): del lines[-1]
        out[name.strip()] = "\n" + "\n".join(lines) + "\n"
    return out


SCRIPTS = _load_scripts()
_PRELUDE = SCRIPTS.pop("prelude")  # what KEYS and ARGV hold: see the head of `status.lua`

STATES = tuple(s.value for s in JobState if s is not JobState.unknown)
_NUMS = {"attempts": int, "max_attempts": int, "lost": int, "created_at": float, "run_at": float,
         "started_at": float, "finished_at": float, "timeout": float, "lease_until": float}


def connect(url: str, **kw: Any) -> redis.Redis:
    "A Redis client for `url` that answers strings, with timeouts (a down server fails fast, never hangs a request)."
    import redis
    opts: dict[str, Any] = dict(decode_responses=True, socket_connect_timeout=2.0, socket_timeout=10.0,
                                health_check_interval=30)
    return redis.Redis.from_url(url, **{**opts, **kw})


def _record(h: dict[str, Any]) -> JobRecord:
    "A hash as the row `JobRecord.from_row` reads: numbers as numbers (what is not a number stays as stored)."
    row: dict[str, Any] = dict(h)
    for k, kind in _NUMS.items():
        v = row.get(k)
        if isinstance(v, str):
            try: row[k] = kind(v) if kind is float else int(float(v))
            except ValueError: pass
    return JobRecord.from_row(row)


def _safe(url: str) -> str:
    "A URL without its password, for messages."
    scheme, sep, rest = url.partition("://")
    if "@" in rest: rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
