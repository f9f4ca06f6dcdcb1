"""Workflows in the store (`fh_tasks/flow.py`): a claimed job that takes results gets them before its arguments.

A job stored with `takes='parent'` gets the result of the previous job of its chain as its first argument; one with
`takes='group'` the list of the results of its group's members (`grp`), in member order. They are read in the claim's
transaction, and only when such a job was claimed: the worker runs the arguments it is handed as they are.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..encoding import decode_args, sql_value, storable_text
from . import Outcome
from .queries import Q

__all__ = ["WorkflowInputs"]

log = logging.getLogger("fh_tasks.store")


class WorkflowInputs:
    "Inputs of claimed jobs that take results; mixed into `SQLiteStore`."

    if TYPE_CHECKING:  # what the mixin uses of `SQLiteStore`
        def _cancel_chain(self, c: sqlite3.Connection, id: str, now: float) -> None: ...
        def _record_attempts(self, c: sqlite3.Connection, outcomes: Sequence[Outcome], state: str,
                             now: float) -> None: ...

    def _with_inputs(self, c: sqlite3.Connection, rows: list[Any], now: float) -> list[Any]:
        """Claimed jobs that take results (`takes`: the result of the previous job of their chain, or the list of their
        group's results) get them before their own arguments: read here, in the claim's transaction, with one query and
        only when such a job was claimed; the worker then runs the arguments it is handed as they are. A job whose
        input cannot be read (not JSON, gone, not succeeded) fails alone here, with an `InputError` saying why."""
        got: dict[str, list[Any]] = {}
        for row in c.execute(Q["inputs"], {"ids": json.dumps([r[0] for r in rows if r["takes"] is not None])}):
            got.setdefault(row[0], []).append(row)
        out = []
        for r in rows:
            if r["takes"] is None: out.append(r); continue
            try: out.append((*tuple(r)[:3], _prepend(r[3], _input(r["takes"], got.get(r[0], []))), *tuple(r)[4:]))
            except ValueError as e:
                msg = storable_text(f"{r[1]}: {e}")
                log.warning("job %s (%s) failed: InputError: %s", r[0], r[1], msg,
                            extra={"action": "fail", "job_id": r[0], "task": r[1], "error_type": "InputError"})
                err = json.dumps({"type": "InputError", "message": msg, "traceback": None})
                if c.execute(Q["fail"], {"id": r[0], "attempt": r[4], "now": now, "error": err}).rowcount:
                    self._cancel_chain(c, r[0], now)
                    self._record_attempts(c, [Outcome("fail", r[0], r[4])], "failed", now)
        return out


def _taking(rows: list[Any]) -> bool:
    "Some claimed row takes results (a claim returns `takes` last; rows without the column take none)."
    if "takes" not in rows[0].keys(): return False
    for r in rows:  # a plain loop: every claim asks, and most rows take nothing
        if r["takes"] is not None: return True
    return False


def _input(takes: Any, rows: list[Any]) -> str:
    "The JSON text a job that takes results gets first, from its `inputs` rows; ValueError saying why it cannot."
    if takes not in ("parent", "group"): raise ValueError(f"it takes {sql_value(takes)}, which fh-tasks does not know")
    for _, _, src, state, _, ok in rows:
        of = "the previous job of its chain" if takes == "parent" else "a job of its group"
        if src is None: raise ValueError(f"{of} is gone (deleted or pruned): there is no result to pass on")
        if state != "succeeded": raise ValueError(f"{of} ({src}) has not succeeded (it is {state}): no result to pass")
        if ok == 0: raise ValueError(f"the result of {of} ({src}) cannot be decoded: it is not JSON")
    texts = ["null" if r[4] is None else r[4] for r in rows]
    if takes == "group": return "[" + ",".join(texts) + "]"
    if len(texts) != 1: raise ValueError("the previous job of its chain is gone: there is no result to pass on")
    return str(texts[0])


def _prepend(args: Any, value: str) -> str:
    """Stored arguments (`encode_args`: `{"args":[...],"kwargs":{...}}`) with the JSON `value` first among the
    positional ones, spliced as text (nothing decoded). Arguments stored in another shape are decoded, then encoded."""
    if isinstance(args, str):
        if args.startswith('{"args":['):
            rest = args[9:]
            return '{"args":[' + value + ("" if rest.startswith("]") else ",") + rest
        if args.startswith('{"kwargs":'): return '{"args":[' + value + "]," + args[1:]
    try: a, kw = decode_args(args)
    except ValueError: return str(args)  # the worker fails the job with the reason (`DecodeError`)
    return json.dumps({"args": [json.loads(value), *a], "kwargs": kw}, ensure_ascii=False)
