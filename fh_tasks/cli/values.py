"""What the `fh-tasks` command reads and prints: option values (durations, counts, queue orders) checked with a
message that says why one is wrong, and stored text made safe for the terminal (`clean`, `table`)."""
from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..logs import escape
from ..records import QueueOrder

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: Longest duration any option takes (100 years): more is a typo, and would overflow timers.
MAX_DURATION = 100 * 365 * 86400.0


class CliError(Exception):
    """A mistake in how the command was called; printed without a traceback."""


# -- option values -------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    "Seconds in `30s`, `15m`, `12h`, `7d`, `2w` (a bare number is seconds), at most 100 years."
    m = re.fullmatch(r"\s*([0-9]{1,12}(?:\.[0-9]{1,9})?)\s*([smhdw]?)\s*", text)
    if not m: raise ValueError(f"{text!r} is not a duration like 30s, 15m, 12h, 7d or 2w")
    v = float(m.group(1)) * UNITS[m.group(2) or "s"]
    if v > MAX_DURATION: raise ValueError(f"{text!r} is longer than 100 years")
    return v


def age(text: str) -> float:
    "A duration with its unit: a bare number is refused, so that `3` cannot mean 3 seconds where 3 days was meant."
    if re.fullmatch(r"\s*[0-9]+(?:\.[0-9]+)?\s*", text):
        raise ValueError(f"{text!r} has no unit: write it like {text.strip()}d (s, m, h, d or w)")
    return parse_duration(text)


def whole(lo: int, hi: int) -> Callable[[str], int]:
    "A converter of whole numbers from `lo` to `hi`."
    def whole(text: str) -> int:
        if not re.fullmatch(r"\s*[0-9]{1,12}\s*", text) or not lo <= int(text) <= hi:
            raise ValueError(f"{text!r} is not a whole number from {lo} to {hi}")
        return int(text)
    return whole


positive_int = whole(1, 10**6)


def seconds(text: str) -> float:
    v = parse_duration(text)
    if v <= 0: raise ValueError(f"{text!r} must be more than 0 seconds")
    return v


def queues(text: str) -> QueueOrder:
    "`high,default` (merged in due order) or `high=3,default=1` (weighted): see `QueueOrder`."
    return QueueOrder.of(text)


def flag(text: str) -> bool:
    if text.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{text!r} is not 1/true/yes/on or 0/false/no/off")
    return text.strip().lower() in ("1", "true", "yes", "on")


def level(text: str) -> str:
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{text!r} is not one of debug, info, warning, error")
    return text.upper()


def log_format(text: str) -> str:
    if text.lower() not in ("text", "json"): raise ValueError(f"{text!r} is not text or json")
    return text.lower()


def arg(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    "An argparse type whose error message says why the value is wrong."
    def convert(text: str) -> Any:
        try: return conv(text)
        except ValueError as e: raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = conv.__name__.strip("_")
    return convert


# -- printed text ----------------------------------------------------------------------------------
def clean(text: Any, width: int | None = None) -> str:
    "Printable text: control characters from stored data are escaped so they cannot drive the terminal."
    s = escape(text)
    return s if width is None or len(s) <= width else s[: max(1, width - 1)] + "…"


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def ago(seconds: float) -> str:
    "`seconds` as the shortest whole duration it is (`7d`, `12h`, `90s`)."
    for unit in "dhm":
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0: return f"{seconds // UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def as_json(v: Any) -> str:
    if v is None: return "-"
    try: return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError): return repr(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], widths: Sequence[int | None] = ()) -> str:
    "Rows aligned under their headers; cells are cleaned and cut to `widths`."
    cells = [[clean(c, widths[i] if i < len(widths) else None) for i, c in enumerate(r)] for r in rows]
    cols = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(cols[i]) for i, c in enumerate(r)).rstrip()
    return "\n".join([line(headers), line(["-" * n for n in cols]), *map(line, cells)])
