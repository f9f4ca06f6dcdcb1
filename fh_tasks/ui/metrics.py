"""The hub's figures in the Prometheus text exposition format (version 0.0.4), written out by hand: no dependency.

Counts are read from the store when scraped (`Tasks.metrics()`, or `{dashboard}/metrics`). `fh_tasks_runs_total` never
goes back: runs of jobs pruned or deleted are kept apart (`fh_gone`). `fh_tasks_recent_run_seconds` covers the runs
that finished in the last hour (a window, not a process's lifetime)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..hub import Tasks

__all__ = ["render", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help: str, samples: list[tuple[str, dict[str, Any], float]]) -> list[str]:
    out = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        out.append(f"{name}{suffix}{{{lab}}} {value:g}" if lab else f"{name}{suffix} {value:g}")
    return out


def render(hub: Tasks) -> str:
    "The metrics of `hub` as Prometheus text (needs an engine with capability `stats`)."
    hub.engine.capabilities.require("stats", hub.engine.name, "report metrics")
    o = hub.engine.overview()
    ok: Counter[str] = Counter(o.gone_succeeded)
    for task, state, n in o.counts:
        if state == "succeeded": ok[task] += n
    runs = [("", {"task": t, "outcome": "succeeded"}, float(n)) for t, n in sorted(ok.items())]
    runs += [("", {"task": t, "outcome": "failed"}, float(n)) for t, n in sorted(o.failed_attempts.items())]
    depth = {q: (n, t) for q, n, t in o.queues}
    queues = sorted(set(depth) | set(o.paused))
    hist = [("_bucket", {"le": repr(b)}, float(n)) for b, n in o.run_times]
    runs_n = float(o.run_count)
    hist += [("_bucket", {"le": "+Inf"}, runs_n), ("_sum", {}, o.run_sum), ("_count", {}, runs_n)]
    lines = [
        *_family("fh_tasks_jobs", "gauge", "Jobs in the store, by task and state.",
                 [("", {"task": t, "state": s}, float(n)) for t, s, n in sorted(o.counts)]),
        *_family("fh_tasks_runs_total", "counter", "Attempts that ended, by task and outcome.", runs),
        *_family("fh_tasks_queue_depth", "gauge", "Jobs due and waiting for a worker, by queue.",
                 [("", {"queue": q}, float(depth.get(q, (0, None))[0])) for q in queues]),
        *_family("fh_tasks_oldest_job_age_seconds", "gauge", "How long the oldest due job of a queue has waited.",
                 [("", {"queue": q}, max(0.0, o.at - (depth.get(q, (0, None))[1] or o.at))) for q in queues]),
        *_family("fh_tasks_queue_paused", "gauge", "1 while a queue is paused.",
                 [("", {"queue": q}, float(q in o.paused)) for q in queues]),
        *_family("fh_tasks_workers", "gauge", "Workers seen lately.",
                 [("", {}, float(sum(w.live for w, _ in o.workers)))]),
        *_family("fh_tasks_recent_run_seconds", "histogram", "Run time of the jobs finished in the last hour.", hist),
    ]
    return "\n".join(lines) + "\n"
