"""The store's SQL: the named queries of `queries.sql`, loaded once into `Q` (name -> statement), and what reading
rows shares (the states this version knows, a lenient text factory)."""
from __future__ import annotations

import math
import re
from importlib.resources import files

from ..records import JobState

__all__ = ["Q"]


def _load_queries() -> dict[str, str]:
    text = files(__package__).joinpath("queries.sql").read_text()
    out: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        out[name.strip()] = "\n".join(l for l in body.splitlines() if not l.lstrip().startswith("--")).strip()
    return out


Q = _load_queries()


_STATES = frozenset(s.value for s in JobState if s is not JobState.unknown)
_KNOWN = ", ".join(f"'{s}'" for s in sorted(_STATES))

def _lenient(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _num(v: object) -> float:
    "A stored number as a float; anything else (text written behind the store's back) sorts last."
    return float(v) if isinstance(v, (int, float)) else math.inf

