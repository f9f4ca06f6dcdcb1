"""JSON encoding of job arguments, results and progress; errors name the task and the argument.

A value can be stored when it is JSON (str, int, float, bool, None, lists, tuples and dicts with str keys) and
can be written and read back whole: its floats are finite, its strings valid Unicode (no lone surrogates, which
`os.fsdecode` gives for a file name that is not UTF-8), its ints within Python's int-to-text limit
(`sys.get_int_max_str_digits()`, 4,300 digits by default), and it is nested at most `MAX_DEPTH` levels deep.
The checks walk a value without recursion: however deep a value, they never raise `RecursionError`.
"""
from __future__ import annotations

import json
import math
import re
import sys
import traceback
from collections.abc import Iterator
from typing import Any

from .errors import ArgumentError, PayloadTooLarge

__all__ = ["encode_args", "decode_args", "encode_value", "encode_progress", "decode_value", "check_json",
           "storable_text", "is_utf8", "MAX_PAYLOAD", "MAX_RESULT", "MAX_PROGRESS", "MAX_DEPTH"]

#: Default limit on the encoded size of one job's arguments, in bytes (`Tasks(max_payload=...)`).
MAX_PAYLOAD = 1_000_000
#: Default limit on the encoded size of one job's result, in bytes (`Tasks(max_result=...)`).
MAX_RESULT = 1_000_000
#: Limit on the encoded size of one progress value, in bytes: progress is written often.
MAX_PROGRESS = 64_000
#: Deepest nesting of lists and dicts an argument, result or progress value may have (`[[1]]` is 2 levels).
MAX_DEPTH = 100

_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_SURROGATE = re.compile("[\ud800-\udfff]")
_NESTED = "nested"  # what `_why` says of a list, tuple or dict: look inside
_int_digits = getattr(sys, "get_int_max_str_digits", lambda: 0)  # Python 3.10 before 3.10.7 has no limit
_SMALL = 10 ** 600  # an int smaller in size has at most 600 digits: under any limit Python allows (640 and up)


def _why(v: Any) -> str | None:
    "Why the value `v` (itself, not what it holds) cannot be stored, `_NESTED` for a container, or None."
    if isinstance(v, str): return None if v.isascii() or not (r := _surrogate(v)) else f"is a string {r}"
    if v is None or isinstance(v, bool): return None
    if isinstance(v, int):
        if v.bit_length() <= 2000: return None  # at most 603 digits: under any limit Python allows (640 and up)
        limit = _int_digits()
        if not limit or v.bit_length() * 0.30103 < limit - 1: return None  # fewer digits than the limit: fine
        try: int.__repr__(v)
        except ValueError: return f"is an int of more than {limit:,} digits (Python's limit for ints as text)"
        return None
    if isinstance(v, float):
        return None if math.isfinite(v) else f"is {v!r} (not finite), which is not JSON-serializable"
    if isinstance(v, (list, tuple, dict)): return _NESTED
    return f"is a {type(v).__name__}, which is not JSON-serializable"


def _scalar(v: Any) -> bool:
    "True for a value `_why` surely passes: an ASCII str, an int of at most 600 digits, a finite float, a bool, None."
    t = type(v)
    if t is str: return v.isascii()  # type: ignore[no-any-return]
    if t is int: return -_SMALL < v < _SMALL  # type: ignore[no-any-return]
    if t is float: return v - v == 0.0  # type: ignore[no-any-return]  # inf - inf and nan - nan are nan
    return v is None or t is bool


def _plain(v: Any) -> bool:
    """The common argument, checked fast: a scalar `_scalar` passes, or a small flat dict of them with ASCII keys.
    False means only "look closer" (`_bad`), not that the value is wrong."""
    if type(v) is dict:
        return len(v) <= 32 and all(type(k) is str and k.isascii() and _scalar(x) for k, x in v.items())
    return _scalar(v)


def _surrogate(s: str) -> str | None:
    "None when `s` can be written as UTF-8, else why not."
    if (m := _SURROGATE.search(s)) is None: return None
    return f"that is not valid UTF-8 (lone surrogate {ascii(m.group())[1:-1]} at position {m.start()})"


def _at(path: str, keys: list[Any]) -> str:
    "`path` followed by the keys leading into it, as Python would index them (the middle left out when deep)."
    at = [f"[{r if len(r := repr(k)) <= 40 else r[:37] + '...'}]" for k in keys]
    return path + "".join(at if len(at) <= 8 else [*at[:4], "...", *at[-3:]])


def _bad(value: Any, path: str) -> str | None:
    "What keeps `value` from being stored, naming the place inside it (from `path`), or None when all is well."
    why = _why(value)
    if why is not _NESTED: return None if why is None else f"{path} {why}"
    # A depth-first walk with explicit stacks: frames[i] iterates the container reached by keys[:i].
    frames: list[tuple[Iterator[tuple[Any, Any]], bool]] = [_frame(value)]
    ids, keys = [id(value)], list[Any]()
    while frames:
        entries, is_dict = frames[-1]
        for k, v in entries:
            if is_dict and (why := _key(k)): return f"{_at(path, keys)} {why}"
            if (why := _why(v)) is None: continue
            if why is not _NESTED: return f"{_at(path, [*keys, k])} {why}"
            # A container inside itself would loop forever here and in json.dumps.
            if id(v) in ids: return f"{_at(path, [*keys, k])} refers to itself, which is not JSON-serializable"
            if len(frames) >= MAX_DEPTH:
                return f"{_at(path, [*keys, k])} is nested more than {MAX_DEPTH} levels deep (fh-tasks' limit)"
            frames.append(_frame(v)); ids.append(id(v)); keys.append(k)
            break
        else:
            frames.pop(); ids.pop()
            if keys: keys.pop()
    return None


def _frame(v: Any) -> tuple[Iterator[tuple[Any, Any]], bool]:
    return (iter(v.items()), True) if isinstance(v, dict) else (enumerate(v), False)


def _key(k: Any) -> str | None:
    "What is wrong with a dict key, or None."
    if not isinstance(k, str): return f"has a non-string key {k!r}, which is not JSON-serializable"
    if k.isascii() or (why := _surrogate(k)) is None: return None
    return f"has a key {ascii(k)[:60]} {why}"


def check_json(value: Any, what: str) -> None:
    "Raise `ArgumentError` unless `value` can be stored as JSON (see the module's docstring); `what` names it."
    if (reason := _bad(value, what)): raise ArgumentError(reason)


def is_utf8(s: str) -> bool:
    "True when `s` can be written as UTF-8 (it holds no lone surrogate)."
    return s.isascii() or _SURROGATE.search(s) is None


def storable_text(s: str) -> str:
    "`s` with any lone surrogate written as a backslash escape (`\\udcff`), so it can be stored as UTF-8."
    return s if is_utf8(s) else s.encode("utf-8", "backslashreplace").decode()


def encode_args(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int = MAX_PAYLOAD,
                names: list[str] | None = None) -> str:
    "Encode a call's arguments as JSON text, or raise an error naming the task and the argument."
    for i, a in enumerate(args):
        if _plain(a): continue
        name = names[i] if names and i < len(names) else f"#{i}"
        if (r := _bad(a, f"argument {name!r}")): raise ArgumentError(f"{task}: {r}")
    for k, v in kwargs.items():
        if _plain(v): continue
        if (r := _bad(v, f"argument {k!r}")): raise ArgumentError(f"{task}: {r}")
    try: text = _dumps({"args": list(args), "kwargs": kwargs} if args else {"kwargs": kwargs})
    except (ValueError, RecursionError) as e: raise ArgumentError(f"{task}: arguments cannot be encoded: {e}") from None
    if len(text) * 4 > limit: _limit(text, limit, f"{task}: arguments are")
    return text


def _limit(text: str, limit: int | None, what: str) -> None:
    # Characters can be up to 4 bytes in UTF-8: only count bytes when the text might be over the limit.
    if limit is not None and len(text) * 4 > limit and (size := len(text.encode("utf-8", "surrogatepass"))) > limit:
        raise PayloadTooLarge(f"{what} {size:,} bytes encoded, over the {limit:,}-byte limit")


def decode_args(text: Any) -> tuple[list[Any], dict[str, Any]]:
    "Decode stored arguments; raises ValueError, saying why, for anything that is not the stored shape."
    if not isinstance(text, str): raise ValueError(f"arguments are stored as {sql_value(text)}, not JSON text")
    try: data = json.loads(text)
    except RecursionError: raise ValueError("arguments are nested too deeply to decode") from None
    if not isinstance(data, dict): raise ValueError("arguments are not a JSON object")
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("arguments must hold a list 'args' and an object 'kwargs'")
    return args, kwargs


def encode_value(value: Any, what: str = "result", limit: int | None = None) -> str:
    "Encode a result or progress value as JSON text; raises `ArgumentError`, or `PayloadTooLarge` over `limit` bytes."
    if value is None: return "null"  # most tasks return nothing
    if not _plain(value): check_json(value, what)
    try: text = _dumps(value)
    except (ValueError, RecursionError) as e: raise ArgumentError(f"{what} cannot be encoded as JSON: {e}") from None
    _limit(text, limit, f"{what} is")
    return text


def encode_progress(value: Any) -> str:
    "Encode a progress value: `encode_value` with the `MAX_PROGRESS` limit."
    return encode_value(value, "progress", MAX_PROGRESS)


def decode_value(text: str | None) -> Any:
    "Decode a stored JSON value (None stays None)."
    return None if text is None else json.loads(text)


def sql_value(v: Any) -> str:
    "A stored column value as a message shows it: `'abc' (text)`, `3 (an integer)`, `NULL`..."
    if v is None: return "NULL"
    kind = {str: "text", bytes: "a blob", int: "an integer", float: "a real"}.get(type(v), type(v).__name__)
    r = repr(v)
    return f"{r if len(r) <= 40 else r[:37] + '...'} ({kind})"


def error_record(type_: str, message: str, tb: str | None = None) -> dict[str, Any]:
    "A stored error. Text that UTF-8 cannot hold (lone surrogates, as in `os.fsdecode` names) is backslash-escaped."
    return {"type": storable_text(type_), "message": storable_text(message),
            "traceback": None if tb is None else storable_text(tb)}


def exception_text(e: BaseException) -> str:
    "`str(e)`, even when the exception's own `__str__` raises."
    try: return str(e)
    except Exception: return f"<{type(e).__name__} whose str() raised>"


def exception_trace(e: BaseException) -> str | None:
    "The formatted traceback of `e`, or None when formatting it fails."
    try: return "".join(traceback.format_exception(type(e), e, e.__traceback__))
    except Exception: return None
