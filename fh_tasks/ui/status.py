"""`JobStatus`: an FT component that shows a job's state, progress, times and outcome, kept live by htmx polling,
Server-Sent Events or a websocket; and the routes the hub adds to its app (behind the app's own Beforeware on a
FastHTML app): the status fragment, cancel, the event stream and socket (`live.py`), and the scripts they need.

CSS classes (all on the job's `<div class="fh-job fh-job-{state}" data-state="{state}" id="job-{id}">`):
`fh-job-state` (the labelled state), `fh-job-task`, `fh-job-progress` (the `<progress>` bar), `fh-job-message`,
`fh-job-times` (elapsed and ETA), `fh-job-partial` (a running job's `progress({'partial': ...})`), `fh-job-result`,
`fh-job-error`, `fh-job-cancel` (the button).
"""
from __future__ import annotations

import json
import math
import re
import time
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlencode

from fastcore.xml import to_xml
from fasthtml.common import Button, Div, Link, Progress, Script, Small, Span
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..errors import StoreError, Unsupported
from ..job import Job, JobRecord

if TYPE_CHECKING:
    from ..hub import Tasks

__all__ = ["JobStatus", "status_routes", "mount_routes", "PREFIX", "HEADERS", "LABELS", "Live", "scripts",
           "human_duration"]

#: Where a hub serves its routes by default (`Tasks(app, prefix=...)`; None serves none).
PREFIX = "/_tasks"
#: Headers on every response of the library's routes.
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
#: Longest text (error message, progress message, result, unknown state) a fragment shows.
SHOWN = 1000
#: The name of the status route (`request.url_for(STATUS_ROUTE, id=...)`).
STATUS_ROUTE = "fh_tasks_job_status"
#: The label shown for each state.
LABELS = {"waiting": "Waiting", "scheduled": "Scheduled", "queued": "Queued", "running": "Running",
          "retrying": "Retrying", "succeeded": "Succeeded", "failed": "Failed", "cancelled": "Cancelled",
          "unknown": "Unknown"}
#: How a `JobStatus` stays current: polling its fragment, an SSE stream, a websocket, or not at all.
Live = Literal["poll", "sse", "ws"] | None
#: Files served from the package under `{prefix}/static/`: the htmx SSE and websocket extensions (0BSD, vendored
#: from npm with their licence header) and the component's stylesheet.
STATIC = {"htmx-ext-sse.js": "text/javascript", "htmx-ext-ws.js": "text/javascript", "fh-tasks.css": "text/css"}
#: Job ids the routes accept (the ids `defer()` makes are 32 hex digits).
JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _cut(text: str, n: int = SHOWN) -> str:
    "Stored text as shown: control characters escaped (they could not be seen, or could fool a reader), cut to `n`."
    if not text.isprintable(): text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= n else text[:n - 1] + "…"


def human_duration(seconds: float) -> str:
    "`42 s`, `3 min 5 s`, `2 h 10 min`."
    s = max(0, int(round(seconds)))
    if s < 60: return f"{s} s"
    if s < 3600: return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min" if s % 3600 // 60 else f"{s // 3600} h"


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fraction(p: Any) -> float | None:
    "The fraction done a progress value says: a number in [0, 1], `{'done', 'total'}` or `{'fraction'}`."
    if _num(p) and 0 <= p <= 1: return float(p)
    if isinstance(p, dict):
        if _num(p.get("fraction")) and 0 <= p["fraction"] <= 1: return float(p["fraction"])
        done: Any = p.get("done")
        total: Any = p.get("total")
        if _num(done) and _num(total) and total > 0: return float(min(max(done / total, 0.0), 1.0))
    return None


def _message(p: Any) -> str | None:
    if isinstance(p, dict):
        m = p.get("message")
        if m is not None: return _cut(str(m), 200)
        if _num(p.get("done")) and _num(p.get("total")): return f"{p['done']:g} / {p['total']:g}"
        return None
    if p is None or _num(p): return None
    return _cut(str(p), 200)


def _times(rec: JobRecord, now: float, frac: float | None) -> str | None:
    if rec.started_at is None: return None
    end = rec.finished_at if rec.done and rec.finished_at is not None else now
    elapsed = max(0.0, end - rec.started_at)
    text = f"{'took' if rec.done else 'elapsed'} {human_duration(elapsed)}"
    if not rec.done and frac is not None and 0 < frac < 1 and elapsed >= 0.5:
        left = elapsed * (1 - frac) / frac  # a tiny fraction done estimates forever: say nothing then
        if left < 100 * 86400: text += f" · about {human_duration(left)} left"
    return text


def _read(hub: Any, jid: str) -> JobRecord | None:
    "The job as a status page needs it: the store's `summary` (no arguments or result) where it has one."
    rec: JobRecord | None = hub.summary(jid)
    return rec


def _result_of(hub: Any, rec: JobRecord) -> Any:
    "A succeeded job's result, read in full (only when a component asks to show it)."
    full = hub.get(rec.id)
    return full.result if full is not None else None


def _can_cancel(hub: Any, rec: JobRecord | None, state: str) -> bool:
    if hub is None or getattr(hub, "prefix", None) is None or state in ("succeeded", "failed", "cancelled", "unknown"):
        return False
    caps = hub.engine.capabilities
    return bool(caps.cancel_running if state == "running" else caps.cancel_queued)


def _opts(cancel: bool, result: bool) -> str:
    return ("c" if cancel else "") + ("r" if result else "")


def JobStatus(job: Job | str | JobRecord, hub: Tasks | None = None, every: str = "1s", *, live: Live = "poll",
              cancel: bool = False, result: bool | Any = False, now: float | None = None) -> Any:
    """A `<div>` with the job's state (labelled, `data-state` and `fh-job-{state}` classes), a `<progress>` bar while it
    runs, elapsed time and ETA, its error once failed (and its result with `result=True`), and a cancel button with
    `cancel=True` (when the engine can cancel the job in its state). Everything shown is escaped.

    `live` says how it stays current until the job is final: `"poll"` fetches its fragment `every` interval;
    `"sse"` and `"ws"` are swapped by a page's `JobEvents(...)` / `JobSocket(...)` container (one stream or socket
    for every job on the page). It reads the job (a short store read, without its arguments or result) unless given
    a `JobRecord`, and is not live when its hub serves no routes (`prefix=None`)."""
    if isinstance(job, Job): hub, rec, jid = job.hub, _read(job.hub, job.id), job.id
    elif isinstance(job, JobRecord): rec, jid = job, job.id
    else:
        if hub is None: raise TypeError("JobStatus(id) needs the hub: JobStatus(id, tasks)")
        rec, jid = _read(hub, job), job
    # A job deferred in this request is not stored until the response starts: show the state it was deferred in.
    if rec is not None: state, shown = rec.state.value, _cut(rec.state_text)
    else: state = shown = job.new.state if isinstance(job, Job) and not job.stored else "unknown"
    label = LABELS.get(shown, shown) if state != "unknown" or rec is None else shown
    task = rec.task if rec is not None else job.task if isinstance(job, Job) else None
    parts: list[Any] = [Span(label, cls="fh-job-state")]
    if task: parts.append(Small(_cut(task.rsplit(":", 1)[-1], 100), cls="fh-job-task"))
    parts += _details(hub, rec, state, time.time() if now is None else now, result)
    if cancel and _can_cancel(hub, rec, state):
        prefix = getattr(hub, "prefix", PREFIX)
        parts.append(Button("Cancel", cls="fh-job-cancel secondary outline", hx_swap="outerHTML",
                            hx_post=f"{prefix}/jobs/{quote(jid, safe='')}/cancel?o={_opts(cancel, result is True)}",
                            hx_target=f"#job-{jid}" if JOB_ID.fullmatch(jid) else None))
    prefix = getattr(hub, "prefix", PREFIX) if hub is not None else PREFIX
    final = rec is not None and rec.done
    if live in ("sse", "ws") and hub is not None and not hub.engine.capabilities.events: live = "poll"  # no pushes
    attrs: dict[str, Any] = {}
    if not final and prefix is not None and live == "poll":
        q = f"?o={_opts(cancel, result is True)}" if cancel or result is True else ""
        attrs = dict(hx_get=f"{prefix}/jobs/{quote(jid, safe='')}/status{q}", hx_trigger=f"every {every}",
                     hx_swap="outerHTML")
        # A job the route does not show (gone, or not this session's) answers 404: show that answer, stop polling.
        attrs["hx-on--response-error"] = "if(event.detail.xhr.status===404)this.outerHTML=event.detail.xhr.response"
    elif live in ("sse", "ws") and prefix is not None:
        attrs = dict(sse_swap=f"fh-job-{jid}") if live == "sse" else {}
        if not final:
            # Whenever the page's stream or socket (re)opens, fetch the job's state once: what happened while it was
            # down (a restart, a lost connection) is not lost.
            q = urlencode({"l": live, **({"o": _opts(cancel, result is True)} if cancel or result is True else {})})
            box = ".fh-job-events" if live == "sse" else ".fh-job-socket"
            attrs.update(hx_get=f"{prefix}/jobs/{quote(jid, safe='')}/status?{q}",
                         hx_trigger=f"htmx:{live}Open from:closest {box}")
        # No settle delay: htmx registers the new element's `sse-swap` listener when it settles (20 ms later by
        # default), and an event arriving in between (the final state right after a progress update) would be lost.
        attrs["hx_swap"] = "outerHTML settle:0ms"
    return Div(*parts, id=f"job-{jid}", cls=f"fh-job fh-job-{state}", data_state=state, aria_live="polite", **attrs)


def _details(hub: Any, rec: JobRecord | None, state: str, now: float, result: bool | Any) -> list[Any]:
    "The bar, progress message, times, result and error of a `JobStatus`."
    p = rec.progress if rec is not None else None
    frac, out = fraction(p), []
    if state in ("queued", "scheduled", "waiting", "retrying", "running"):
        # Pico draws a <progress> without a value as an indeterminate bar.
        bar = Progress(value=f"{frac:.4f}", max="1") if frac is not None and state == "running" else Progress()
        out.append(Div(bar, cls="fh-job-progress"))
    elif state == "succeeded":
        out.append(Div(Progress(value="1", max="1"), cls="fh-job-progress"))
    if rec is None: return out
    if (msg := _message(p)) and state in ("running", "retrying", "failed", "cancelled"):
        out.append(Span(msg, cls="fh-job-message"))
    if (t := _times(rec, now, frac)): out.append(Small(t, cls="fh-job-times"))
    if state == "running" and isinstance(p, dict) and p.get("partial") is not None:
        partial = p["partial"] if isinstance(p["partial"], str) else json.dumps(p["partial"], ensure_ascii=False)
        out.append(Span(_cut(partial), cls="fh-job-partial"))
    if state == "succeeded" and result is not False and hub is not None:
        value = result if result is not True else _result_of(hub, rec)
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            out.append(Span(_cut(text), cls="fh-job-result"))
    if state in ("failed", "retrying") and rec.error:
        out.append(Span(_cut(f"{rec.error.get('type')}: {rec.error.get('message')}"), cls="fh-job-error"))
    return out


def Missing(jid: str) -> Any:
    "What the routes answer for a job they do not show (unknown, pruned, or another session's): final, not live."
    # An id that is not an id's shape is not echoed (it may hold anything a client sent).
    return Div(Span(LABELS["unknown"], cls="fh-job-state"), Small("no such job", cls="fh-job-message"),
               id=f"job-{jid}" if JOB_ID.fullmatch(jid) else None, cls="fh-job fh-job-unknown", data_state="unknown")


def scripts(prefix: str = PREFIX) -> tuple[Any, ...]:
    "The `<script>`/`<link>` tags live components need, all served by the hub from the package (no CDN)."
    return (Link(rel="stylesheet", href=f"{prefix}/static/fh-tasks.css"),
            Script(src=f"{prefix}/static/htmx-ext-sse.js"), Script(src=f"{prefix}/static/htmx-ext-ws.js"))


def _html(ft: Any, status: int = 200) -> HTMLResponse:
    return HTMLResponse(to_xml(ft), status_code=status, headers=HEADERS)


async def visible_record(hub: Tasks, request: Any, jid: str) -> JobRecord | None:
    "The job if this request may see it (read in a thread); None when it is unknown or not the request's."
    if not JOB_ID.fullmatch(jid): return None
    rec = await run_in_threadpool(_read, hub, jid)
    if rec is None: return None
    return rec if await run_in_threadpool(hub.visible, request, rec) else None


def _flags(req: Request) -> tuple[bool, bool]:
    o = req.query_params.get("o", "")
    return "c" in o, "r" in o


async def render(hub: Tasks, rec: JobRecord, live: Live, cancel: bool, result: bool) -> str:
    "A job's fragment as HTML, built in a thread when it reads the result."
    if result and rec.state.value == "succeeded":
        return await run_in_threadpool(lambda: to_xml(JobStatus(rec, hub, live=live, cancel=cancel, result=True)))
    return to_xml(JobStatus(rec, hub, live=live, cancel=cancel))


def _status_endpoint(hub: Tasks) -> Any:
    async def status(req: Request) -> Response:
        jid = str(req.path_params["id"])
        # Read in a thread: a store read never blocks the event loop, however busy the file is.
        try: rec = await visible_record(hub, req, jid)
        except StoreError:
            # Not 2xx, so htmx keeps the current fragment and polls again.
            return _html(Div("job status unavailable", cls="fh-job-unavailable"), 503)
        # 404 alike for an unknown job and another session's: nothing tells them apart.
        if rec is None: return _html(Missing(jid), 404)
        cancel, result = _flags(req)
        live: Live = {"sse": "sse", "ws": "ws"}.get(req.query_params.get("l", ""), "poll")  # type: ignore[assignment]
        return HTMLResponse(await render(hub, rec, live, cancel, result), headers=HEADERS)
    return status


def _cancel_endpoint(hub: Tasks) -> Any:
    async def cancel(req: Request) -> Response:
        jid = str(req.path_params["id"])
        rec = await visible_record(hub, req, jid)
        if rec is None: return _html(Missing(jid), 404)
        try: await run_in_threadpool(lambda: hub.cancel(jid, running=True))
        except Unsupported as e: return _html(Div(str(e), cls="fh-job-error"), 409)
        rec = await run_in_threadpool(_read, hub, jid) or rec
        c, r = _flags(req)
        return HTMLResponse(await render(hub, rec, "poll", c or True, r), headers=HEADERS)
    return cancel


def _static_endpoint() -> Any:
    cache: dict[str, bytes] = {}

    async def static(req: Request) -> Response:
        name = str(req.path_params["name"])
        if name not in STATIC: return Response("not found", 404, headers=HEADERS)
        if name not in cache: cache[name] = files(__package__).joinpath("static").joinpath(name).read_bytes()
        return Response(cache[name], media_type=STATIC[name],
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})
    return static


def _routes(hub: Tasks, prefix: str) -> list[tuple[str, list[str], str, Any]]:
    "(path, methods, name, endpoint) of every HTTP route the hub adds."
    from .live import events_endpoint
    return [(f"{prefix}/jobs/{{id:str}}/status", ["GET"], STATUS_ROUTE, _status_endpoint(hub)),
            (f"{prefix}/jobs/{{id:str}}/cancel", ["POST"], "fh_tasks_job_cancel", _cancel_endpoint(hub)),
            (f"{prefix}/events", ["GET"], "fh_tasks_events", events_endpoint(hub)),
            (f"{prefix}/static/{{name:str}}", ["GET"], "fh_tasks_static", _static_endpoint())]


def status_routes(hub: Tasks, prefix: str = PREFIX) -> list[Any]:
    "Plain Starlette routes for the hub's endpoints (status fragment, cancel, events, static files, websocket)."
    from starlette.routing import Route, WebSocketRoute

    from .live import socket_endpoint
    out: list[Any] = [Route(p, e, methods=m, name=n) for p, m, n, e in _routes(hub, prefix)]
    return [*out, WebSocketRoute(f"{prefix}/ws", socket_endpoint(hub, None), name="fh_tasks_ws")]


def mount_routes(hub: Tasks, app: Any, prefix: str) -> None:
    """Add the hub's routes to `app`, first in its routing (a catch-all of the app's, or FastHTML's static files,
    cannot shadow them). On a FastHTML app they are FastHTML routes, so the app's `before` functions (Beforeware,
    with their `skip` patterns) run first, as for the app's own routes; the websocket runs them on its handshake.
    A FastHTML app also gets the stylesheet and scripts in its headers."""
    path = f"{prefix}/jobs/{{id:str}}/status"
    if any(getattr(r, "path", None) == path for r in app.router.routes):
        raise ValueError(f"the app already has a route at {path} (another hub?); give this hub another prefix=")
    had = {id(r) for r in app.router.routes}
    if not (hasattr(app, "_add_route") and hasattr(app, "before")):
        app.router.routes.extend(status_routes(hub, prefix))
    else:
        from starlette.routing import WebSocketRoute

        from .live import socket_endpoint
        for p, methods, name, endpoint in _routes(hub, prefix):
            app.route(p, methods=[m.lower() for m in methods], name=name)(_fasthtml_endpoint(endpoint, name))
        app.router.routes.append(WebSocketRoute(f"{prefix}/ws", socket_endpoint(hub, app), name="fh_tasks_ws"))
        app.hdrs = [*app.hdrs, *scripts(prefix)]
    routes = app.router.routes  # FastHTML replaces the list as it adds a route
    routes[:] = [r for r in routes if id(r) not in had] + [r for r in routes if id(r) in had]


def _fasthtml_endpoint(endpoint: Any, name: str) -> Any:
    "A FastHTML handler (takes `req`) calling a Starlette endpoint; named so FastHTML infers nothing from it."
    async def handler(req: Request) -> Response: return await endpoint(req)  # type: ignore[no-any-return]
    handler.__name__ = handler.__qualname__ = name
    return handler
