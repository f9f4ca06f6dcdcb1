"""Records: the plain data of fh-tasks (a job's state, its stored record, the rows and outcomes the SQLite engine
passes around). Nothing here imports Starlette, so engines, workers and tools can use it anywhere."""
from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from .encoding import decode_args, decode_value
from .errors import JobCancelled, JobFailed

__all__ = ["JobState", "JobRecord", "NewJob", "Claim", "Outcome", "WorkerInfo", "QueueOrder", "PRIORITY_STEP"]


class JobState(str, Enum):
    "Where a job is in its life; stored as the lowercase value."
    waiting = "waiting"      #: in an ordered chain, waiting for the previous job to succeed
    scheduled = "scheduled"  #: deferred with a delay, not due yet
    queued = "queued"        #: due, waiting for a worker
    running = "running"      #: claimed by a worker under a lease
    retrying = "retrying"    #: an attempt failed; due again after a backoff
    succeeded = "succeeded"  #: final: the task returned
    failed = "failed"        #: final: out of attempts, or a non-retryable error
    cancelled = "cancelled"  #: final: cancelled before it started
    #: read only: a stored state this version does not know (written by another version); never written.
    #: The stored text is kept in `JobRecord.raw["state"]`; such a job is not final.
    unknown = "unknown"

    def __str__(self) -> str: return self.value

    @property
    def final(self) -> bool:
        "True for `succeeded`, `failed` and `cancelled`: the job will not change again (unless retried by hand)."
        return self in _FINAL


_FINAL = {JobState.succeeded, JobState.failed, JobState.cancelled}


@dataclass(frozen=True)
class JobRecord:
    """A stored job, as read from the store.

    Reading never fails on what another version (or a hand edit) left in a row: an unknown state reads as
    `JobState.unknown`, a value of the wrong type as a default (0, 0.0, None or ""), and every such stored value
    is kept as it was in `raw` (column name -> stored value). An `error` is always None or a dict with a `type`
    and a `message` (str); a `result` or `progress` that is not JSON is the stored text.
    """
    id: str
    task: str
    queue: str
    state: JobState
    args: list[Any]
    kwargs: dict[str, Any]
    attempts: int
    max_attempts: int
    created_at: float
    run_at: float
    started_at: float | None
    finished_at: float | None
    result: Any
    error: dict[str, Any] | None
    progress: Any
    parent: str | None = None
    worker: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    #: an opaque token of the session that deferred the job (None outside a request); status routes check it
    owner: str | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobRecord:
        "Build a record from a store row (a mapping of column names); never raises. See the class doc."
        raw: dict[str, Any] = {}
        get = row.get

        def text(k: str) -> str:
            v = get(k)
            if isinstance(v, str): return v
            raw[k] = v
            return "" if v is None else _text(v)

        def opt_text(k: str) -> str | None:
            v = get(k)
            return v if v is None or isinstance(v, str) else text(k)

        def num(k: str, kind: type, default: Any) -> Any:
            v = get(k)
            if v is None and default is None: return None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if kind is float: return float(v)
                if isinstance(v, int) or v.is_integer(): return int(v)
            raw[k] = v
            return default

        try: state = JobState(get("state"))
        except (ValueError, TypeError): state, raw["state"] = JobState.unknown, get("state")
        a = get("args")
        try: args, kwargs = ([], {}) if a is None else decode_args(a)
        except Exception: args, kwargs = [_text(a)], {}  # shown as stored
        return cls(id=text("id"), task=text("task"), queue=text("queue"), state=state, args=args, kwargs=kwargs,
                   attempts=num("attempts", int, 0), max_attempts=num("max_attempts", int, 0),
                   created_at=num("created_at", float, 0.0), run_at=num("run_at", float, 0.0),
                   started_at=num("started_at", float, None), finished_at=num("finished_at", float, None),
                   result=_loads(get("result")), error=_error(get("error")), progress=_loads(get("progress")),
                   parent=opt_text("parent"), worker=opt_text("worker"), raw=raw, owner=opt_text("owner"))

    @property
    def state_text(self) -> str:
        "The state as stored: its value, or the stored text of a state this version does not know."
        if self.state is JobState.unknown and self.raw.get("state") is not None: return _text(self.raw["state"])
        return self.state.value

    @property
    def done(self) -> bool:
        "True once the job is final (succeeded, failed or cancelled)."
        return self.state.final

    def value(self) -> Any:
        "The result; raises `JobFailed` or `JobCancelled` if the job did not succeed."
        if self.state is JobState.succeeded: return self.result
        if self.state is JobState.cancelled: raise JobCancelled(f"job {self.id} ({self.task}) was cancelled")
        if self.state is JobState.failed:
            e = self.error or {}
            raise JobFailed(f"job {self.id} ({self.task}) failed: {e.get('type', 'Error')}: {e.get('message', '')}")
        raise JobFailed(f"job {self.id} ({self.task}) is not finished (state {self.state_text})")


def _text(v: Any) -> str:
    "Stored text as a str: bytes are decoded (bad bytes replaced), anything else is formatted."
    if isinstance(v, str): return v
    if isinstance(v, (bytes, bytearray, memoryview)): return bytes(v).decode("utf-8", "replace")
    return str(v)


def _loads(text: Any) -> Any:
    "A stored JSON value; text that is not JSON (or not text) is returned as stored (bytes decoded)."
    if text is None: return None
    if not isinstance(text, str):
        if not isinstance(text, (bytes, bytearray, memoryview)): return text
        text = _text(text)
    try: return decode_value(text)
    except Exception: return text  # not JSON, or nested too deep for the decoder


def _error(stored: Any) -> dict[str, Any] | None:
    "A stored error as a dict with a str `type` and `message`, whatever shape it was stored in."
    e = _loads(stored)
    if e is None: return None
    if not isinstance(e, dict): e = {"message": e}
    t, m = e.get("type"), e.get("message")
    return {**e, "type": t if isinstance(t, str) and t else "Error",
            "message": m if isinstance(m, str) else "" if m is None else _text(m)}


#: Seconds of waiting one unit of priority is worth: a job of priority p is ordered as if it had been due p minutes
#: earlier (no starvation; docs/flow.md). The due index (migration 007) and the `due` query say the same in SQL.
PRIORITY_STEP = 60.0


@dataclass(slots=True)
class NewJob:
    "A row to insert: a deferred call not yet stored."
    id: str
    task: str
    args: str
    queue: str = "default"
    max_attempts: int = 1
    timeout: float | None = None
    run_at: float = 0.0
    created_at: float = 0.0
    parent: str | None = None
    owner: str | None = None  #: the deferring session's token (see `JobRecord.owner`)
    priority: int = 0         #: higher runs first within its queue
    key: str | None = None    #: uniqueness key: one live job per key (`with_options(key=...)`)
    limit_key: str | None = None  #: what the task's concurrency and rate limits count against (None: no limits)
    takes: str | None = None  #: "parent" or "group": the job gets that result (results) before its own arguments
    group: str | None = None  #: a group member: the id of the group's callback job

    @property
    def rank(self) -> float:
        "Its place in the due order of its queue (`PRIORITY_STEP`): lower runs first."
        return self.run_at - self.priority * PRIORITY_STEP

    @property
    def state(self) -> str:
        if self.parent: return "waiting"
        return "scheduled" if self.run_at > self.created_at else "queued"


@dataclass(slots=True)
class Claim:
    """A job a worker holds under lease; `attempt` is its fencing token. `suspect`: it was running in a worker that
    died, so it runs alone (its worker claims nothing beside it)."""
    id: str
    task: str
    queue: str
    args: str
    attempt: int
    max_attempts: int
    timeout: float | None
    created_at: float
    started: float = 0.0
    suspect: bool = False


@dataclass(slots=True)
class WorkerInfo:
    "A worker as registered in the store: what it serves and when it was last seen (`live`: seen lately)."
    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    tasks: tuple[str, ...]
    concurrency: int
    lease: float
    started_at: float = 0.0
    last_seen: float = 0.0
    live: bool = True


@dataclass(slots=True)
class Outcome:
    "How one attempt ended, recorded by `Store.finish`."
    kind: Literal["succeed", "fail", "retry", "release"]
    id: str
    attempt: int
    result: str | None = None
    error: str | None = None
    run_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueOrder:
    """The queues a worker serves and the order it takes them in (`Tasks(queues=...)`, `fh-tasks worker --queues`).

    - merged (the default): `["high", "default"]` or `"high,default"`: every claim takes the due jobs of all the
      queues together, in due order (run_at - priority * 60).
    - strict: the same with `strict=True` (`--strict-queues`): a queue's due jobs go before any of the next queue's.
    - weighted: `{"high": 3, "default": 1}` or `"high=3,default=1"`: each claim orders the queues by a weighted
      random draw (high comes first 3 times in 4), then takes them one after the other, as strict does.

    >>> QueueOrder.of("high=3,default=1").weights
    (3.0, 1.0)
    """
    names: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    strict: bool = False

    @classmethod
    def of(cls, queues: QueueOrder | str | Mapping[str, Any] | Sequence[str], *, strict: bool = False) -> QueueOrder:
        "Read queues as given to `Tasks(queues=...)`; a `ValueError` says what is wrong."
        if isinstance(queues, QueueOrder): return queues.ordered() if strict else queues
        if isinstance(queues, str): queues = _queue_text(queues)
        if isinstance(queues, Mapping):
            names, ws = tuple(queues), tuple(queues.values())
            for n, w in zip(names, ws, strict=True):
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 < w < math.inf):
                    raise ValueError(f"queue {n!r}: its weight must be a number > 0, not {w!r}")
            if strict: raise ValueError("queues with weights are taken by weight: strict=True does not apply to them")
            order = cls(names, tuple(float(w) for w in ws))
        elif isinstance(queues, Sequence):
            order = cls(tuple(queues), None, strict)
        else: raise ValueError(f"queues must be a list of names, a dict of weights or a string, not {queues!r}")
        if not order.names: raise ValueError("queues names no queue")
        for n in order.names:
            if not isinstance(n, str) or not n: raise ValueError(f"{n!r} is not a queue name (a non-empty string)")
        if len(set(order.names)) < len(order.names): raise ValueError(f"queues {list(order.names)} name a queue twice")
        return order

    def ordered(self) -> QueueOrder:
        "The same queues, taken in strict order."
        if self.weights is not None: raise ValueError("queues with weights are taken by weight, not in strict order")
        return QueueOrder(self.names, None, True)

    @property
    def mode(self) -> Literal["merged", "strict", "weighted"]:
        return "weighted" if self.weights is not None else "strict" if self.strict else "merged"

    def draw(self, rng: random.Random) -> tuple[tuple[str, ...], bool]:
        """The queues for one claim, and whether to take them one after the other (strict and weighted). Weighted:
        the first queue is drawn with chances in proportion to the weights, then the next among the rest, and so on."""
        if self.weights is None: return self.names, self.strict
        left, out = list(zip(self.names, self.weights, strict=True)), []
        while left:
            x, i = rng.random() * sum(w for _, w in left), 0
            while i < len(left) - 1 and x >= left[i][1]: x -= left[i][1]; i += 1
            out.append(left.pop(i)[0])
        return tuple(out), True

    def __str__(self) -> str:
        "As `fh-tasks worker --queues` takes it: `high,default` or `high=3,default=1`."
        if self.weights is None: return ",".join(self.names)
        return ",".join(f"{n}={w:g}" for n, w in zip(self.names, self.weights, strict=True))


def _queue_text(text: str) -> list[str] | dict[str, Any]:
    "`high,default` as a list of names, `high=3,default=1` as a dict of weights (checked by `QueueOrder.of`)."
    parts = [q.strip() for q in text.split(",") if q.strip()]
    if not parts: raise ValueError(f"queues {text!r} names no queue (give a comma-separated list)")
    if not any("=" in q for q in parts): return parts
    if not all("=" in q for q in parts):
        raise ValueError(f"queues {text!r}: give every queue a weight (like high=3,default=1), or none")
    pairs = [tuple(x.strip() for x in q.split("=", 1)) for q in parts]
    weights = {n: float(w) if re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9})?", w) else w for n, w in pairs}
    if len(weights) < len(pairs): raise ValueError(f"queues {text!r} names a queue twice")
    return weights
