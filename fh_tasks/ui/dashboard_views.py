"""The jobs dashboard's views: FT components, rendered by FastHTML (every text and attribute escaped by it).

Nothing here reads the store: the routes (`dashboard.py`) read, these draw. Secrets are redacted (`fh_tasks.redact`)
in arguments, results, errors and tracebacks before they are drawn. No inline script or style: the pages run under a
strict Content-Security-Policy, so the chart is SVG with presentation attributes and classes only."""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlencode

from fasthtml.common import (
    H1,
    H2,
    A,
    Article,
    Button,
    Details,
    Div,
    Form,
    Input,
    Label,
    Option,
    P,
    Pre,
    Progress,
    Section,
    Select,
    Small,
    Span,
    Strong,
    Summary,
    Table,
    Tbody,
    Td,
    Th,
    Thead,
    Tr,
)
from fasthtml.svg import Line, Rect, Svg, Text

from ..engine import Capabilities, Overview
from ..records import JobRecord, JobState
from ..redact import redact, redact_text

__all__ = ["overview_view", "jobs_view", "job_view", "STATE_ORDER", "SINCE"]

STATE_ORDER = ("queued", "scheduled", "waiting", "running", "retrying", "succeeded", "failed", "cancelled", "unknown")
#: The job list's time filter: query value -> (label, seconds).
SINCE = {"15m": ("last 15 minutes", 900), "1h": ("last hour", 3600), "24h": ("last 24 hours", 86400),
         "7d": ("last 7 days", 7 * 86400)}
#: Longest text a page shows of an argument dump, a result, an error or a traceback.
SHOWN = 20_000


def _cut(text: str, n: int = SHOWN) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def ago(t: float | None, now: float) -> Any:
    "A relative time ('12 s ago', 'in 3 min'), its UTC time as a tooltip."
    if t is None: return Span("–")
    d = now - t
    a = abs(d)
    n = f"{a:.0f} s" if a < 90 else f"{a / 60:.0f} min" if a < 5400 else f"{a / 3600:.1f} h" if a < 172800 \
        else f"{a / 86400:.0f} d"
    return Span(f"{n} ago" if d >= 0 else f"in {n}", title=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)))


def seconds(d: float | None) -> str:
    if d is None: return "–"
    return f"{d * 1000:.0f} ms" if d < 1 else f"{d:.1f} s" if d < 120 else f"{d / 60:.1f} min"


def badge(state: str) -> Any:
    known = state if state in STATE_ORDER else "unknown"
    return Span(_cut(state, 40), cls=f"fh-dash-state fh-dash-{known}", data_state=known)


def post(action: str, label: str, csrf: str, *fields: tuple[str, str], confirm: str | None = None,
         secondary: bool = False) -> Any:
    "A one-button form that POSTs `action` with the CSRF token (and hidden `fields`)."
    hidden = [Input(type="hidden", name=k, value=v) for k, v in fields]
    return Form(Input(type="hidden", name="csrf", value=csrf), *hidden,
                Button(label, type="submit", cls="secondary outline" if secondary else None),
                method="post", action=action, cls="fh-dash-action", data_confirm=confirm)


def missing(caps_name: str, engine: str, what: str) -> Any:
    return P(Small(f"{what}: not available on the {engine} engine (capability {caps_name!r})."),
             cls="fh-dash-missing")


# -- overview -----------------------------------------------------------------------------------------------------
def chart(o: Overview) -> Any:
    "Runs per minute over the window: succeeded (up) and failed attempts, as an SVG bar chart drawn on the server."
    n = max(1, len(o.succeeded))
    w, h, pad = 600, 140, 18
    top = max([a + b for a, b in zip(o.succeeded, o.failed, strict=False)] + [1])
    bw = (w - 2) / n
    bars: list[Any] = []
    for i, (ok, bad) in enumerate(zip(o.succeeded, o.failed, strict=False)):
        x = 1 + i * bw
        hok, hbad = (h - 2 * pad) * ok / top, (h - 2 * pad) * bad / top
        if ok: bars.append(Rect(x=f"{x:.1f}", y=f"{h - pad - hok:.1f}", width=f"{max(bw - 1, 1):.1f}",
                                height=f"{hok:.1f}", cls="fh-dash-ok"))
        if bad: bars.append(Rect(x=f"{x:.1f}", y=f"{h - pad - hok - hbad:.1f}", width=f"{max(bw - 1, 1):.1f}",
                                 height=f"{hbad:.1f}", cls="fh-dash-bad"))
    mins = int(o.window // 60)
    return Svg(Line(x1="0", y1=str(h - pad), x2=str(w), y2=str(h - pad), cls="fh-dash-axis"), *bars,
               Text(f"{top}/min", x="2", y="12", cls="fh-dash-label"),
               Text(f"-{mins} min", x="2", y=str(h - 4), cls="fh-dash-label"),
               Text("now", x=str(w - 2), y=str(h - 4), cls="fh-dash-label fh-dash-end"),
               viewBox=f"0 0 {w} {h}", role="img", cls="fh-dash-chart",
               aria_label=f"jobs per minute over the last {mins} minutes")


def _tasks_table(o: Overview, base: str, csrf: str, caps: Capabilities, engine: str) -> Any:
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for task, state, n in o.counts: per[task][state] += n
    cols = [s for s in STATE_ORDER if any(c[s] for c in per.values())]
    rows = []
    for task in sorted(per):
        c = per[task]
        cells = [Td(A(str(c[s]), href=_list_url(base, state=s, task=task)) if c[s] else "0", cls="num") for s in cols]
        act = post(f"{base}/tasks/retry-failed", "Retry failed", csrf, ("task", task),
                   confirm=f"Retry every failed job of {task}?", secondary=True) \
            if c["failed"] and caps.admin else ""
        rows.append(Tr(Th(A(task, href=_list_url(base, task=task)), scope="row"), *cells, Td(act)))
    if not rows: return P("No jobs yet.", cls="fh-dash-empty")
    return Div(Table(Thead(Tr(Th("task"), *[Th(s, cls="num") for s in cols], Th(""))), Tbody(*rows)),
               cls="overflow-auto")


def _queues_table(o: Overview, queues: Iterable[str], base: str, csrf: str, caps: Capabilities, engine: str) -> Any:
    depth = {q: (n, t) for q, n, t in o.queues}
    rows = []
    for q in sorted(set(queues) | set(depth) | set(o.paused)):
        n, t = depth.get(q, (0, None))
        paused = q in o.paused
        act: Any = ""
        if caps.admin:
            act = post(f"{base}/queues/{'resume' if paused else 'pause'}", "Resume" if paused else "Pause", csrf,
                       ("queue", q), secondary=not paused)
        rows.append(Tr(Th(A(q, href=_list_url(base, queue=q)), scope="row"), Td(str(n), cls="num"),
                       Td(seconds(o.at - t) if t is not None else "–", cls="num"),
                       Td(Span("paused", cls="fh-dash-paused") if paused else "active"), Td(act)))
    return Div(Table(Thead(Tr(Th("queue"), Th("due", cls="num"), Th("oldest waits", cls="num"), Th("status"),
                              Th(""))), Tbody(*rows)), cls="overflow-auto")


def _workers_table(o: Overview) -> Any:
    if not o.workers: return P("No worker has registered lately.", cls="fh-dash-empty")
    rows = [Tr(Td(Span(w.id[:12], title=w.id)), Td(f"{w.host}:{w.pid}"), Td(", ".join(w.queues)),
               Td(str(w.concurrency), cls="num"), Td(str(running), cls="num"), Td(ago(w.last_seen, o.at)),
               Td("live" if w.live else Span("silent", cls="fh-dash-bad-text")))
            for w, running in o.workers]
    return Div(Table(Thead(Tr(Th("worker"), Th("host"), Th("queues"), Th("concurrency", cls="num"),
                              Th("running", cls="num"), Th("last seen"), Th(""))), Tbody(*rows)),
               cls="overflow-auto")


def overview_view(o: Overview | None, counts: dict[str, int] | None, queues: Iterable[str], base: str, csrf: str,
                  caps: Capabilities, engine: str) -> Any:
    "The overview page's content; without `o` (an engine without `stats`) the counts per state only."
    if o is not None:
        counts = Counter()
        for _, s, n in o.counts: counts[s] += n
    counts = counts or {}
    cards = [A(Article(Strong(str(counts.get(s, 0))), Small(s)), href=_list_url(base, state=s),
               cls=f"fh-dash-card fh-dash-{s}", data_state=s, id=f"fh-dash-count-{s}")
             for s in STATE_ORDER if counts.get(s) or s in ("queued", "running", "failed", "succeeded")]
    parts: list[Any] = [Section(H1("Jobs"), Div(*cards, cls="fh-dash-cards"), id="fh-dash-counts", data_live="1")]
    if o is None:
        parts.append(missing("stats", engine, "Throughput, queues and workers"))
        return parts
    ok, bad = sum(o.succeeded), sum(o.failed)
    rate = f"{100 * bad / (ok + bad):.1f} %" if ok + bad else "–"
    parts += [
        Section(H2("Last hour"), P(f"{ok} succeeded, {bad} failed attempts, failure rate {rate}"), chart(o),
                id="fh-dash-throughput", data_live="1"),
        Section(H2("Tasks"), _tasks_table(o, base, csrf, caps, engine), id="fh-dash-tasks", data_live="1"),
        Section(H2("Queues"), _queues_table(o, queues, base, csrf, caps, engine),
                *([] if caps.admin else [missing("admin", engine, "Pausing queues")]), id="fh-dash-queues",
                data_live="1"),
        Section(H2("Workers"), _workers_table(o), id="fh-dash-workers", data_live="1"),
    ]
    return parts


# -- job list -----------------------------------------------------------------------------------------------------
def _list_url(base: str, **q: Any) -> str:
    q = {k: v for k, v in q.items() if v not in (None, "")}
    return f"{base}/jobs" + (f"?{urlencode(q)}" if q else "")


def _select(name: str, label: str, options: Iterable[tuple[str, str]], chosen: str | None) -> Any:
    return Label(label, Select(Option("any", value=""), *[Option(text, value=v, selected=v == chosen)
                                                          for v, text in options], name=name))


def jobs_view(rows: list[JobRecord], nxt: str | None, f: dict[str, str | None], tasks: Iterable[str],
              queues: Iterable[str], base: str, now: float, note: str | None = None) -> Any:
    "The job list: filters (GET), one page of jobs, and the link to the next page."
    form = Form(Div(_select("state", "State", [(s, s) for s in STATE_ORDER], f.get("state")),
                    _select("task", "Task", [(t, t) for t in sorted(tasks)], f.get("task")),
                    _select("queue", "Queue", [(q, q) for q in sorted(queues)], f.get("queue")),
                    _select("since", "Created", [(k, v[0]) for k, v in SINCE.items()], f.get("since")),
                    cls="grid"), Button("Filter", type="submit"), method="get", action=f"{base}/jobs",
                cls="fh-dash-filters")
    body = [Tr(Td(A(r.id[:12], href=f"{base}/jobs/{quote(r.id, safe='')}", title=r.id)), Td(r.task), Td(r.queue),
               Td(badge(r.state_text)), Td(f"{r.attempts}/{r.max_attempts}", cls="num"), Td(ago(r.created_at, now)),
               Td(ago(r.finished_at, now) if r.finished_at else ago(r.started_at, now) if r.started_at else "–"),
               Td(_cut(redact_text(f"{r.error.get('type')}: {r.error.get('message')}"), 160) if r.error else ""))
            for r in rows]
    table = Div(Table(Thead(Tr(Th("job"), Th("task"), Th("queue"), Th("state"), Th("attempts", cls="num"),
                               Th("created"), Th("ended / started"), Th("error"))), Tbody(*body)),
                cls="overflow-auto") if body else P("No job matches.", cls="fh-dash-empty")
    pager = [A("First page", href=_list_url(base, **f), role="button", cls="secondary outline")] if f.get("before") \
        else []
    if nxt: pager.append(A("Next page", href=_list_url(base, **{**f, "before": nxt}), role="button", rel="next"))
    return [H1("Jobs"), form, *([P(Small(note))] if note else []),
            Section(table, Div(*pager, cls="fh-dash-pager"), id="fh-dash-list", data_live="1")]


# -- job detail ---------------------------------------------------------------------------------------------------
def _json(value: Any) -> str:
    try: text = json.dumps(redact(value), indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError): text = redact_text(str(value))
    return _cut(text)


def _error(e: dict[str, Any] | None) -> Any:
    if not e: return ""
    parts: list[Any] = [P(Strong(_cut(redact_text(str(e.get("type", "Error"))), 200)), ": ",
                          _cut(redact_text(str(e.get("message", ""))), 4000))]
    tb = e.get("traceback")
    if isinstance(tb, str) and tb:
        parts.append(Details(Summary("Traceback"), Pre(_cut(redact_text(tb)))))
    return Div(*parts, cls="fh-dash-error")


def _progress(p: Any) -> Any:
    if isinstance(p, dict) and isinstance(p.get("done"), (int, float)) and isinstance(p.get("total"), (int, float)) \
            and p["total"] > 0:
        return Div(Progress(value=str(p["done"]), max=str(p["total"])), Small(f"{p['done']} / {p['total']}"))
    if isinstance(p, (int, float)) and 0 <= p <= 1: return Progress(value=str(p), max="1")
    return _cut(redact_text(json.dumps(p, default=str) if not isinstance(p, str) else p), 500)


def job_view(r: JobRecord, attempts: list[dict[str, Any]] | None, chain: list[JobRecord], base: str, csrf: str,
             caps: Capabilities, engine: str, now: float) -> Any:
    "A job: its facts, actions, arguments (redacted), result, error, attempts and chain."
    jid = quote(r.id, safe="")
    url = f"{base}/jobs/{jid}"
    state = r.state.value
    actions: list[Any] = []
    if state in ("failed", "cancelled"):
        actions.append(post(f"{url}/retry", "Retry", csrf) if caps.retry else missing("retry", engine, "Retry"))
    if state in ("queued", "scheduled", "retrying", "waiting"):
        actions.append(post(f"{url}/cancel", "Cancel", csrf, secondary=True) if caps.cancel_queued
                       else missing("cancel_queued", engine, "Cancel"))
    if state == "running":
        actions.append(post(f"{url}/cancel", "Cancel", csrf, secondary=True) if caps.cancel_running
                       else missing("cancel_running", engine, "Cancelling a running job"))
    if r.done:
        actions.append(post(f"{url}/delete", "Delete", csrf, confirm="Delete this job for good?", secondary=True)
                       if caps.admin else missing("admin", engine, "Delete"))
    dur = r.finished_at - r.started_at if r.finished_at and r.started_at else None
    facts = [("Task", r.task), ("Queue", r.queue), ("State", badge(r.state_text)),
             ("Attempts", f"{r.attempts} of {r.max_attempts}"), ("Created", ago(r.created_at, now)),
             ("Due", ago(r.run_at, now)), ("Started", ago(r.started_at, now)), ("Finished", ago(r.finished_at, now)),
             ("Run time", seconds(dur)), ("Worker", r.worker or "–")]
    if r.progress is not None: facts.append(("Progress", _progress(r.progress)))
    dl = Table(Tbody(*[Tr(Th(k, scope="row"), Td(v)) for k, v in facts]), cls="fh-dash-facts")
    sections: list[Any] = [
        H1("Job ", Small(r.id)),
        Section(dl, Div(*actions, cls="fh-dash-actions"), id="fh-dash-job", data_live="1", data_state=state),
        Section(H2("Arguments"), Pre(_json({"args": r.args, "kwargs": r.kwargs}), cls="fh-dash-args")),
    ]
    if r.state is JobState.succeeded: sections.append(Section(H2("Result"), Pre(_json(r.result))))
    if r.error: sections.append(Section(H2("Last error"), _error(r.error), id="fh-dash-last-error", data_live="1"))
    if attempts is None: sections.append(missing("stats", engine, "Attempt history"))
    elif attempts:
        rows = [Tr(Td(str(a["attempt"]), cls="num"), Td(badge(str(a["state"]))), Td(ago(a["started_at"], now)),
                   Td(seconds(a["ended_at"] - a["started_at"]) if a["started_at"] and a["ended_at"] else "–"),
                   Td(_error(a["error"]))) for a in attempts]
        sections.append(Section(H2("Failed attempts"), Div(Table(
            Thead(Tr(Th("#", cls="num"), Th("became"), Th("started"), Th("ran"), Th("error"))), Tbody(*rows)),
            cls="overflow-auto"), id="fh-dash-attempts", data_live="1"))
    if chain:
        sections.append(Section(H2("Chain"), P(Small("Earlier jobs of its chain, nearest first.")), Table(Tbody(*[
            Tr(Td(A(c.id[:12], href=f"{base}/jobs/{quote(c.id, safe='')}", title=c.id)), Td(c.task),
               Td(badge(c.state_text))) for c in chain]))))
    return sections
