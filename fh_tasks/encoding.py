"""JSON encoding of job arguments, results and progress; errors name the task and the argument."""
from __future__ import annotations

import json
import math
from typing import Any

from .errors import ArgumentError, PayloadTooLarge

__all__ = ["encode_args", "decode_args", "encode_value", "decode_value", "check_json", "MAX_PAYLOAD"]

#: Default limit on the encoded size of one job's arguments, in bytes.
MAX_PAYLOAD = 1_000_000

_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_SCALARS = (str, int, bool, type(None))


def _bad(value: Any, path: str, outer: tuple[int, ...] = ()) -> str | None:
    "The path of the first non-JSON value inside `value`, with the reason, or None when all is JSON."
    if isinstance(value, _SCALARS): return None
    if isinstance(value, float): return None if math.isfinite(value) else f"{path} is {value!r} (not finite)"
    if isinstance(value, (list, tuple, dict)):
        # A container inside itself would recurse forever here and in json.dumps.
        if id(value) in outer: return f"{path} refers to itself"
        outer = (*outer, id(value))
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (r := _bad(v, f"{path}[{i}]", outer)): return r
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str): return f"{path} has a non-string key {k!r}"
            if (r := _bad(v, f"{path}[{k!r}]", outer)): return r
        return None
    return f"{path} is a {type(value).__name__}"


def check_json(value: Any, what: str) -> None:
    "Raise `ArgumentError` unless `value` round-trips through JSON; `what` names it in the message."
    if (reason := _bad(value, what)): raise ArgumentError(f"{reason}, which is not JSON-serializable")


def encode_args(task: str, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int = MAX_PAYLOAD,
                names: list[str] | None = None) -> str:
    "Encode a call's arguments as JSON text, or raise an error naming the task and the argument."
    for i, a in enumerate(args):
        name = names[i] if names and i < len(names) else f"#{i}"
        if (r := _bad(a, f"argument {name!r}")): raise ArgumentError(f"{task}: {r}, which is not JSON-serializable")
    for k, v in kwargs.items():
        if (r := _bad(v, f"argument {k!r}")): raise ArgumentError(f"{task}: {r}, which is not JSON-serializable")
    text = _dumps({"args": list(args), "kwargs": kwargs} if args else {"kwargs": kwargs})
    # Characters can be up to 4 bytes in UTF-8: only count bytes when the text might be over the limit.
    if len(text) * 4 > limit and (size := len(text.encode())) > limit:
        raise PayloadTooLarge(f"{task}: arguments are {size:,} bytes encoded, over the {limit:,}-byte limit")
    return text


def decode_args(text: str) -> tuple[list[Any], dict[str, Any]]:
    "Decode stored arguments; raises ValueError for text that is not the stored shape."
    data = json.loads(text)
    if not isinstance(data, dict): raise ValueError("arguments are not a JSON object")
    args, kwargs = data.get("args", []), data.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("arguments must hold a list 'args' and an object 'kwargs'")
    return args, kwargs


def encode_value(value: Any, what: str = "result") -> str:
    "Encode a result or progress value as JSON text, or raise `ArgumentError`."
    if value is None: return "null"  # most tasks return nothing
    check_json(value, what)
    return _dumps(value)


def decode_value(text: str | None) -> Any:
    "Decode a stored JSON value (None stays None)."
    return None if text is None else json.loads(text)
