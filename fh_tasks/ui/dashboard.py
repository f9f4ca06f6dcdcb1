"""The jobs dashboard: `tasks.dashboard(path="/tasks", auth=...)` mounts it into the hub's FastHTML app.

Its routes are the app's own (an `APIRouter` added with `to_app`), so the app's `hdrs` (Pico), Beforeware and
sessions apply. Safe by default:
- it refuses to mount without `auth`, unless `local_only=True` (local development): then it answers loopback
  requests only, and none that came through a proxy;
- every action is a POST carrying a CSRF token (double-submit: a random cookie, `SameSite=Strict`, scoped to the
  dashboard's path, and the same value in the form), and a cross-site `Origin` is refused; no GET changes anything;
- every page has `Cache-Control: no-store` and a strict Content-Security-Policy: scripts and styles from this
  server (the package's own `dashboard.css`/`dashboard.js`), from the origins of the app's own `hdrs` (its Pico,
  its htmx) and the app's inline `hdrs` by hash; no inline script or style of its own, no eval, no framing.

Live: `dashboard.js` listens to `{path}/events` (Server-Sent Events fed by `tasks.events()`) and re-reads the page's
live regions when jobs change; it polls every few seconds where events are missing or while the stream reconnects.
What an engine cannot do (its `Capabilities`) is said on the page, not hidden.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from fastcore.xml import to_xml
from fasthtml.common import (
    A,
    APIRouter,
    HttpHeader,
    Li,
    Link,
    Main,
    Nav,
    P,
    Script,
    Small,
    Strong,
    Title,
    Ul,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse

from ..engine import Overview
from ..errors import StoreError, Unsupported
from ..records import JobRecord, JobState
from . import dashboard_views as v
from .metrics import CONTENT_TYPE
from .status import HEADERS

if TYPE_CHECKING:
    from ..hub import Tasks

__all__ = ["mount", "Dashboard", "CSRF_COOKIE"]

CSRF_COOKIE = "fh_tasks_csrf"
#: Seconds the overview's figures are reused (one pass over the job table per refresh at most this often).
OVERVIEW_TTL = 2.0
PAGE_SIZE = 50
#: URL name -> (file in static/, media type). No extension in the URL: the app's own static route would take it.
ASSETS = {"css": ("dashboard.css", "text/css; charset=utf-8"), "js": ("dashboard.js", "text/javascript; charset=utf-8")}
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|::1|::ffff:127\.\d+\.\d+\.\d+)$")
PROXIED = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")
NOTICES = {"retried": "The job was queued again.", "cancelled": "The job was cancelled.", "deleted": "Job deleted.",
           "retried-all": "The failed jobs were queued again.", "paused": "Queue paused: workers take none of its "
           "jobs (within a second).", "resumed": "Queue resumed.", "refused": "The job is no longer in a state "
           "that allows this.", "unsupported": "This engine cannot do that."}
_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def _asset(name: str) -> bytes:
    return files(__package__).joinpath("static").joinpath(name).read_bytes()


@dataclass
class Dashboard:
    "One mounted dashboard: its hub, where it lives, who may use it."
    hub: Tasks
    app: Any
    path: str
    auth: Callable[[Any], Any] | None
    local_only: bool
    stream_seconds: float = 15.0
    _cache: tuple[float, Overview] | None = field(default=None, repr=False)

    # -- who may come in ------------------------------------------------------------------------------------------
    async def gate(self, req: Request) -> Response | None:
        "None when `req` may use the dashboard, else the answer to send."
        if self.local_only:
            host = req.client.host if req.client else ""
            if not LOOPBACK.match(host) or any(h in req.headers for h in PROXIED):
                return self._text("This dashboard was mounted local_only=True: it answers this machine only.", 403)
        if self.auth is None: return None
        ok = self.auth(req)
        if inspect.isawaitable(ok): ok = await ok
        if isinstance(ok, Response): return ok
        return None if ok else self._text("Forbidden", 403)

    def csrf_ok(self, req: Request, form: Any) -> bool:
        "The form's token matches the cookie's, and the request does not come from another site."
        cookie, sent = _token(req), str(form.get("csrf", ""))
        if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()): return False
        if req.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"): return False
        origin = req.headers.get("origin")
        return origin is None or origin == f"{req.url.scheme}://{req.url.netloc}"

    # -- responses ------------------------------------------------------------------------------------------------
    def headers(self, req: Request) -> dict[str, str]:
        return {**HEADERS, "Content-Security-Policy": self.csp(), "Referrer-Policy": "same-origin",
                "X-Frame-Options": "DENY"}

    def csp(self) -> str:
        "A strict policy that still lets the app's own `hdrs` work: their origins, and their inline parts by hash."
        scripts, styles = {"'self'"}, {"'self'"}
        for h in _flat(getattr(self.app, "hdrs", ()) or ()):
            tag, attrs = getattr(h, "tag", ""), getattr(h, "attrs", {}) or {}
            if tag == "script" and attrs.get("src"): scripts.add(_origin(str(attrs["src"])))
            elif tag == "link" and "stylesheet" in str(attrs.get("rel", "")): styles.add(_origin(str(attrs["href"])))
            elif tag in ("script", "style"):
                m = re.match(r"(?s)^<[^>]*>(.*)</\w+>\s*$", to_xml(h))
                if m: (scripts if tag == "script" else styles).add(_hash(m.group(1)))
        return (f"default-src 'none'; script-src {' '.join(sorted(scripts))}; style-src {' '.join(sorted(styles))}; "
                "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; form-action 'self'; "
                "frame-ancestors 'none'; base-uri 'none'")

    def _text(self, text: str, status: int = 200) -> Response:
        return PlainTextResponse(text, status, headers={**HEADERS, "Content-Security-Policy": "default-src 'none'"})

    def page(self, req: Request, title: str, *content: Any, notice: str | None = None) -> tuple[Any, ...]:
        "A whole page in the app's layout (its hdrs, Pico): nav, notice, content, our stylesheet and script."
        token = _token(req) or secrets.token_urlsafe(32)
        b, caps = self.path, self.hub.engine.capabilities
        nav = Nav(Ul(Li(Strong(A("fh-tasks", href=b)))), Ul(Li(A("Overview", href=b)), Li(A("Jobs", href=f"{b}/jobs")),
                                                              Li(A("Failed", href=f"{b}/jobs?state=failed"))))
        events = f"{b}/events" if caps.events else ""
        body = Main(nav, *([P(notice, cls="fh-dash-notice", role="status")] if notice else []), *content,
                    P(Small(f"{self.hub.engine.name} engine"), cls="fh-dash-foot"),
                    cls="container fh-dash", data_fh_dash="1", data_events=events, data_poll="5000")
        secure = "; Secure" if req.url.scheme == "https" else ""
        cookie = f"{CSRF_COOKIE}={token}; Path={b}; HttpOnly; SameSite=Strict{secure}"
        return (Title(f"{title} · jobs"), Link(rel="stylesheet", href=f"{b}/static/css"), body,
                Script(src=f"{b}/static/js", defer=True),
                *[HttpHeader(k, val) for k, val in self.headers(req).items()], HttpHeader("Set-Cookie", cookie))

    # -- reads (in a thread: the store never blocks the event loop) -------------------------------------------------
    def overview(self) -> Overview:
        now = time.monotonic()
        if self._cache is None or now - self._cache[0] > OVERVIEW_TTL:
            self._cache = (now, self.hub.engine.overview())
        return self._cache[1]

    def queues(self, o: Overview | None) -> set[str]:
        qs = set(self.hub.queues) | {t.options.queue for t in self.hub.registry.values()}
        if o is not None: qs |= {q for q, _, _ in o.queues} | set(o.paused)
        return qs


def _token(req: Request) -> str:
    "The CSRF cookie's token if it is one this dashboard could have made, else ''."
    t = req.cookies.get(CSRF_COOKIE, "")
    return t if _TOKEN.match(t) else ""


def _flat(items: Any) -> list[Any]:
    return [x for i in items for x in (_flat(i) if isinstance(i, (tuple, list)) else [i])]


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}" if p.scheme in ("http", "https") and p.netloc else "'self'"


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def mount(hub: Tasks, app: Any, path: str = "/tasks", *, auth: Callable[[Any], Any] | None = None,
          local_only: bool = False, metrics: bool = True, stream_seconds: float = 15.0) -> Dashboard:
    "Add the dashboard's routes under `path` to the FastHTML `app` (see `Tasks.dashboard`)."
    if auth is None and not local_only:
        raise ValueError("the jobs dashboard needs auth= (a callable deciding who may see and steer jobs); for local "
                         "development only, pass local_only=True: it then answers requests from this machine only")
    if auth is not None and not callable(auth): raise TypeError(f"auth must be callable, not {type(auth).__name__}")
    if app is None: raise RuntimeError("the hub is not bound to an app: Tasks(app) or tasks.dashboard(app=app)")
    if not (hasattr(app, "_add_route") and hasattr(app, "hdrs")):
        raise TypeError("the jobs dashboard mounts into a FastHTML app (it renders in the app's own layout)")
    if not _PATH.match(path): raise ValueError(f"path must look like '/tasks' (no trailing '/'), not {path!r}")
    d = Dashboard(hub, app, path, auth, local_only, stream_seconds)
    r = _Routes(d)
    ar = APIRouter()  # full paths: the prefix would turn the overview's empty path into one named after its function
    routes: list[tuple[str, str, Callable[..., Any]]] = [
        ("", "get", r.overview), ("/jobs", "get", r.jobs), ("/jobs/{id:str}", "get", r.job),
        ("/events", "get", r.events), ("/static/{name:str}", "get", r.asset),
        ("/jobs/{id:str}/retry", "post", r.action(r.retry)), ("/jobs/{id:str}/cancel", "post", r.action(r.cancel)),
        ("/jobs/{id:str}/delete", "post", r.action(r.delete)),
        ("/tasks/retry-failed", "post", r.action(r.retry_failed)),
        ("/queues/pause", "post", r.action(r.pause)), ("/queues/resume", "post", r.action(r.resume)),
    ]
    if metrics: routes.append(("/metrics", "get", r.metrics))
    tag = hashlib.sha1(path.encode()).hexdigest()[:8]
    for sub, method, fn in routes:
        route = r.guarded(fn)
        ar(f"{path}{sub}", methods=[method], name=f"fh_tasks_dashboard_{fn.__name__}_{tag}")(route)
    ar.to_app(app)
    return d


class _Routes:
    "The dashboard's endpoints (each behind `guarded`: the gate, then the store's errors as a 503)."

    def __init__(self, d: Dashboard) -> None:
        self.d, self.hub, self.path = d, d.hub, d.path
        self.caps, self.eng = d.hub.engine.capabilities, d.hub.engine.name

    def guarded(self, fn: Callable[[Request], Any]) -> Callable[..., Any]:
        d = self.d

        async def route(req: Request) -> Any:
            if (denied := await d.gate(req)) is not None: return denied
            try: return await fn(req)
            except StoreError as e: return d._text(f"The job store is unavailable: {e}", 503)
        route.__name__ = f"fh_tasks_dashboard_{fn.__name__}"
        return route

    def action(self, fn: Callable[[Request, Any], tuple[str, str]]) -> Callable[[Request], Any]:
        "A POST: the CSRF check, `fn` in a thread, then a redirect (303) back with a notice."
        d, path = self.d, self.path

        async def run(req: Request) -> Any:
            form = await req.form()
            if not d.csrf_ok(req, form): return d._text("CSRF check failed: reload the page and try again.", 403)
            try: done, to = await run_in_threadpool(fn, req, form)
            except Unsupported: done, to = "unsupported", path
            d._cache = None
            sep = "&" if "?" in to else "?"
            return RedirectResponse(f"{to}{sep}done={done}", 303, headers=d.headers(req))
        run.__name__ = fn.__name__
        return run

    # -- pages ----------------------------------------------------------------------------------------------------
    async def overview(self, req: Request) -> Any:
        caps, hub = self.caps, self.hub
        o = await run_in_threadpool(self.d.overview) if caps.stats else None
        counts = None if caps.stats else (await run_in_threadpool(hub.counts) if caps.listing else {})
        token = _token(req)
        parts = self.d.page(req, "Overview", *v.overview_view(o, counts, self.d.queues(o), self.path, token, caps,
                                                              self.eng), notice=_notice(req))
        return _with_token(parts, token)

    async def jobs(self, req: Request) -> Any:
        q, caps, hub = req.query_params, self.caps, self.hub
        f: dict[str, str | None] = {k: (q.get(k) or None) for k in ("state", "task", "queue", "since", "before")}
        if f["state"] not in (*v.STATE_ORDER, None): f["state"] = None
        if f["since"] not in (*v.SINCE, None): f["since"] = None
        o = await run_in_threadpool(self.d.overview) if caps.stats else None
        tasks_ = set(hub.registry) | ({t for t, _, _ in o.counts} if o else set())
        note, now, before = None, hub.clock(), f["before"] or ""
        if caps.stats:
            since = now - v.SINCE[f["since"]][1] if f["since"] else None
            rows, nxt = await run_in_threadpool(lambda: hub.engine.page(
                state=f["state"], task=f["task"], queue=f["queue"], since=since, before=before, limit=PAGE_SIZE))
        elif caps.listing:
            off = int(before) if before.isdigit() else 0
            rows = await run_in_threadpool(lambda: hub.engine.jobs(state=f["state"], task=f["task"], limit=PAGE_SIZE,
                                                                   offset=off))
            nxt = str(off + PAGE_SIZE) if len(rows) == PAGE_SIZE else None
            note = f"The {self.eng} engine pages by offset and filters by state and task only (capability 'stats')."
        else:
            rows, nxt, note = [], None, f"The {self.eng} engine cannot list jobs (capability 'listing')."
        return self.d.page(req, "Jobs", *v.jobs_view(rows, nxt, f, tasks_, self.d.queues(o), self.path, now, note))

    async def job(self, req: Request) -> Any:
        hub, jid = self.hub, req.path_params["id"]
        rec = await run_in_threadpool(hub.get, jid)
        if rec is None: return self.d._text("No such job (it may have been deleted or pruned).", 404)
        attempts = await run_in_threadpool(hub.engine.attempts, jid) if self.caps.stats else None
        chain = await run_in_threadpool(_chain, hub, rec)
        token = _token(req)
        parts = self.d.page(req, f"Job {rec.task}", *v.job_view(rec, attempts, chain, self.path, token, self.caps,
                                                                self.eng, hub.clock()), notice=_notice(req))
        return _with_token(parts, token)

    async def events(self, req: Request) -> Any:
        if not self.caps.events: return self.d._text("This engine announces no job events: the page polls.", 404)
        return StreamingResponse(_stream(self.hub, self.d.stream_seconds), media_type="text/event-stream",
                                 headers={**self.d.headers(req), "X-Accel-Buffering": "no"})

    async def asset(self, req: Request) -> Any:
        name = req.path_params["name"]
        if name not in ASSETS: return self.d._text("Not found", 404)
        return Response(_asset(ASSETS[name][0]), media_type=ASSETS[name][1],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def metrics(self, req: Request) -> Any:
        if not self.caps.stats: return self.d._text(f"The {self.eng} engine reports no metrics (capability 'stats').",
                                                    404)
        return Response(await run_in_threadpool(self.hub.metrics), media_type=CONTENT_TYPE, headers=HEADERS)

    # -- actions (run in a thread; return the notice and where to go back) -------------------------------------------
    def _job_url(self, req: Request) -> str:
        return f"{self.path}/jobs/{quote(req.path_params['id'], safe='')}"

    def retry(self, req: Request, form: Any) -> tuple[str, str]:
        return ("retried" if self.hub.retry(req.path_params["id"]) else "refused"), self._job_url(req)

    def cancel(self, req: Request, form: Any) -> tuple[str, str]:
        jid = req.path_params["id"]
        rec = self.hub.summary(jid)
        if rec is not None and rec.state is JobState.running:
            self.caps.require("cancel_running", self.eng, "cancel a running job")
        return ("cancelled" if self.hub.cancel(jid) else "refused"), self._job_url(req)

    def delete(self, req: Request, form: Any) -> tuple[str, str]:
        self.caps.require("admin", self.eng, "delete jobs")
        return ("deleted" if self.hub.engine.delete(req.path_params["id"]) else "refused"), f"{self.path}/jobs"

    def retry_failed(self, req: Request, form: Any) -> tuple[str, str]:
        self.caps.require("admin", self.eng, "retry every failed job of a task")
        self.hub.engine.retry_failed(str(form.get("task", "")))
        return "retried-all", self.path

    def pause(self, req: Request, form: Any) -> tuple[str, str]:
        self.caps.require("admin", self.eng, "pause queues")
        self.hub.engine.pause(str(form.get("queue", "")))
        return "paused", self.path

    def resume(self, req: Request, form: Any) -> tuple[str, str]:
        self.caps.require("admin", self.eng, "resume queues")
        self.hub.engine.resume(str(form.get("queue", "")))
        return "resumed", self.path


def _notice(req: Request) -> str | None:
    return NOTICES.get(req.query_params.get("done", ""))


def _with_token(parts: tuple[Any, ...], token: str) -> tuple[Any, ...]:
    "Pages render their forms before the cookie exists: forms then carry the token the page's cookie sets."
    if token: return parts
    cookie = next(p for p in parts if isinstance(p, HttpHeader) and p.k == "Set-Cookie")
    new = cookie.v.split(";", 1)[0].split("=", 1)[1]
    return tuple(_retoken(p, new) for p in parts)


def _retoken(ft: Any, token: str) -> Any:
    "Fill the empty CSRF fields of the forms in `ft` with `token`."
    if getattr(ft, "tag", None) == "input" and ft.attrs.get("name") == "csrf" and not ft.attrs.get("value"):
        ft.attrs["value"] = token
    for c in getattr(ft, "children", ()) or ():
        _retoken(c, token)
    return ft


def _chain(hub: Tasks, rec: JobRecord, limit: int = 20) -> list[JobRecord]:
    "The earlier jobs of `rec`'s chain, nearest first (at most `limit`)."
    out: list[JobRecord] = []
    parent = rec.parent
    while parent and len(out) < limit:
        p = hub.summary(parent)
        if p is None: break
        out.append(p)
        parent = p.parent
    return out


async def _stream(hub: Tasks, seconds: float) -> AsyncIterator[str]:
    """Job events as Server-Sent Events (`event: job`, the id, kind and state) for `seconds`, then the stream ends and
    the browser reconnects: a held-open stream must not keep the server from shutting down."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    events = aiter(hub.events())
    nxt: asyncio.Future[Any] = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)  # subscribed before the browser hears that the stream is open
    try:
        yield "retry: 1000\n\n"
        while (left := deadline - loop.time()) > 0:
            done, _ = await asyncio.wait({nxt}, timeout=left)
            if not done or nxt.exception() is not None: break
            ev = nxt.result()
            yield f"event: job\ndata: {json.dumps({'id': ev.id, 'kind': ev.kind, 'state': ev.state})}\n\n"
            nxt = asyncio.ensure_future(anext(events))
    finally:
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        await events.aclose()  # type: ignore[attr-defined]
