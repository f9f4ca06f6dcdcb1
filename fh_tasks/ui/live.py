"""Live job status over one Server-Sent Events stream or one websocket per page, carrying many jobs.

- `JobEvents(...)` (htmx `sse` extension) connects to `GET {prefix}/events`; each `JobStatus(job, live="sse")` inside
  it is swapped by the event `fh-job-{id}`. `JobSocket(...)` (htmx `ws` extension) connects to `{prefix}/ws`, whose
  messages swap `JobStatus(job, live="ws")` by id (out of band).
- With `jobs=[...]` the stream or socket carries those jobs (every one must be visible to the request, or the answer
  is 404), starts with their current state and ends by itself once all are final (the SSE stream then sends
  `fh-tasks-close`, which the container's `sse-close` turns into no reconnection). Without `jobs` it carries every
  job the request may see (by default: the session's own), from now on, and the notifications of `Notify(sse=True)`.
- Both end when the server shuts down: uvicorn waits for open connections before it stops, so `Server.shutdown` is
  wrapped (once, when a hub mounts its routes) to end the streams of its loop first; a hub's lifespan shutdown ends
  them too, for other servers. The client reconnects to the next server.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastcore.xml import to_xml
from fasthtml.common import Div
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..events import JobEvent
from ..job import Job
from ..owner import ensure_owner
from .status import HEADERS, JOB_ID, PREFIX, Missing, _flags, _read, render, visible_record

if TYPE_CHECKING:
    from ..hub import Tasks
    from ..records import JobRecord

__all__ = ["JobEvents", "JobSocket", "events_endpoint", "socket_endpoint", "end_streams", "CLOSE_EVENT",
           "NOTIFY_EVENT"]

log = logging.getLogger("fh_tasks.live")

#: The SSE event that tells the page the stream is over for good (no reconnection).
CLOSE_EVENT = "fh-tasks-close"
#: The SSE event carrying a notification (`Notify(sse=True)`): a toast fragment any page can swap in.
NOTIFY_EVENT = "fh-tasks-notify"
#: Seconds between keep-alive comments on an idle stream (a proxy would close a silent one).
HEARTBEAT = 15.0
#: Seconds a session stream lives before it ends and the browser reconnects (servers that do not shut down streams).
MAX_AGE = 600.0
#: Seconds after a job first appears on a session stream when its state is sent again (its element may have been
#: swapped into the page after the first events went by).
CATCH_UP = (0.5, 1.5)
#: Seconds before a job whose read failed is read again.
RETRY = 0.5
#: Jobs one stream or socket may name.
MAX_JOBS = 100


# -- ending streams when the server shuts down ---------------------------------------------------
_stops: dict[asyncio.AbstractEventLoop, set[asyncio.Event]] = {}
_hooked = False


def _stop_event() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    ev = asyncio.Event()
    _stops.setdefault(loop, set()).add(ev)
    return ev


def _forget(ev: asyncio.Event) -> None:
    for loop, evs in list(_stops.items()):
        evs.discard(ev)
        if not evs: _stops.pop(loop, None)


def end_streams(loop: asyncio.AbstractEventLoop | None = None) -> int:
    "End every open stream and socket of `loop` (default: the running one); returns how many."
    loop = loop or asyncio.get_running_loop()
    evs = list(_stops.get(loop, ()))
    for ev in evs: ev.set()
    return len(evs)


def hook_server_shutdown() -> None:
    """Wrap uvicorn's `Server.shutdown` (once per process) so that it ends this loop's streams before it waits for
    connections to close; it changes nothing else (running requests and background work still drain)."""
    global _hooked
    if _hooked: return
    try:
        from uvicorn.server import Server
    except ImportError:
        return
    _hooked = True
    inner = Server.shutdown
    if getattr(inner, "_fh_tasks", False): return

    async def shutdown(self: Any, *args: Any, **kwargs: Any) -> None:
        try: end_streams()
        except Exception: log.exception("could not end the job streams at shutdown")
        await inner(self, *args, **kwargs)

    shutdown._fh_tasks = True  # type: ignore[attr-defined]
    Server.shutdown = shutdown  # type: ignore[method-assign]


# -- one subscription, read on the loop ----------------------------------------------------------
class _Feed:
    "A stream's subscription: events of `jobs` (or all) queued on the loop, plus a stop event."

    def __init__(self, hub: Tasks, jobs: Sequence[str] | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.stop = _stop_event()
        self.finals: set[str] = set()
        self._unsubscribe = hub.subscribe(self._from_feed, jobs=jobs)

    def _from_feed(self, ev: JobEvent) -> None:
        if ev.final: self.finals.add(ev.id)
        try: self.loop.call_soon_threadsafe(self.queue.put_nowait, ev.id)
        except RuntimeError: pass  # the loop is closed

    def later(self, delay: float, jid: str) -> None:
        self.loop.call_later(delay, self.queue.put_nowait, jid)

    async def next(self, timeout: float) -> list[str] | None:
        """The ids of the jobs that changed (each once, oldest first); [] on timeout; None once stopping."""
        if self.stop.is_set(): return None
        getter = asyncio.ensure_future(self.queue.get())
        stopper = asyncio.ensure_future(self.stop.wait())
        try: await asyncio.wait({getter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not getter.done(): getter.cancel()
        if self.stop.is_set(): return None
        if not getter.done() or getter.cancelled(): return []
        ids = [getter.result()]
        while not self.queue.empty(): ids.append(self.queue.get_nowait())
        return list(dict.fromkeys(ids))

    def close(self) -> None:
        self._unsubscribe()
        _forget(self.stop)


class _Session:
    "What one page's stream or socket carries: fixed jobs, or every job the request may see (access decided once)."

    def __init__(self, hub: Tasks, request: Any, jobs: list[str] | None, cancel: bool, result: bool,
                 live: str) -> None:
        self.hub, self.request, self.jobs, self.live = hub, request, jobs, live
        self.cancel, self.result = cancel, result
        self.open: set[str] = set(jobs or ())
        self.seen: dict[str, bool] = {}

    async def visible(self, jid: str) -> JobRecord | None:
        "The job's record if this stream shows it (read in a thread)."
        if self.jobs is not None: return await run_in_threadpool(_read, self.hub, jid) if jid in self.jobs else None
        if self.seen.get(jid) is False: return None
        rec = await visible_record(self.hub, self.request, jid)
        self.seen[jid] = rec is not None
        return rec

    async def fragments(self, ids: list[str], feed: _Feed | None) -> AsyncIterator[tuple[str, str, JobRecord]]:
        "(job id, fragment HTML, record) of the jobs in `ids` this stream shows."
        for jid in ids:
            first = jid not in self.seen
            try:
                rec = await self.visible(jid)
                if rec is None: continue
                html = await render(self.hub, rec, self.live, self.cancel, self.result)  # type: ignore[arg-type]
            except Exception as e:
                # The store is busy or a read failed: this job's state is sent again soon, the stream goes on.
                log.warning("job stream: could not read job %s (%s: %s); trying again", jid, type(e).__name__, e)
                if feed is not None: feed.later(RETRY, jid)
                continue
            self.seen[jid] = True
            if first and self.jobs is None and feed is not None and not rec.done:
                for d in CATCH_UP: feed.later(d, jid)
            yield jid, html, rec
            if rec.done: self.open.discard(jid)

    @property
    def finished(self) -> bool:
        return self.jobs is not None and not self.open


async def _check_jobs(hub: Tasks, request: Any, ids: list[str]) -> list[JobRecord] | None:
    "The records of `ids` if the request may see every one of them; None otherwise."
    if len(ids) > MAX_JOBS or not all(JOB_ID.fullmatch(i) for i in ids): return None
    recs = [await visible_record(hub, request, i) for i in ids]
    return None if any(r is None for r in recs) else [r for r in recs if r is not None]


def _notification(hub: Tasks, rec: JobRecord, oob: bool = False) -> Any:
    from .notify import notification
    return notification(hub, rec, oob)


def _sse(event: str, html: str) -> str:
    data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
    return f"event: {event}\n{data}\n\n"


# -- Server-Sent Events ----------------------------------------------------------------------------
def events_endpoint(hub: Tasks) -> Callable[[Request], Any]:
    "`GET {prefix}/events[?job=ID&job=ID...][&o=cr]`: the page's SSE stream."
    async def events(req: Request) -> Response:
        if not hub.bus.available: return Response("this engine announces no job events", 501, headers=HEADERS)
        ids = list(dict.fromkeys(req.query_params.getlist("job")))
        recs = await _check_jobs(hub, req, ids) if ids else []
        if recs is None: return Response(to_xml(Missing(ids[0] if len(ids) == 1 else "?")), 404, headers=HEADERS)
        if not ids:
            sess = req.scope.get("session")
            # A page opened before its session deferred anything: give it its token now, so its jobs show later.
            if isinstance(sess, dict): ensure_owner(sess)
        cancel, result = _flags(req)
        s = _Session(hub, req, ids or None, cancel, result, "sse")
        headers = {**HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(_stream(hub, s, recs), media_type="text/event-stream", headers=headers)
    return events


async def _stream(hub: Tasks, s: _Session, recs: list[JobRecord]) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    feed = _Feed(hub, s.jobs)
    born = loop.time()
    try:
        yield "retry: 1000\n\n"
        # The current state first: whatever happened between the page's render and this subscription is not lost.
        async for jid, html, _rec in s.fragments([r.id for r in recs], feed): yield _sse(f"fh-job-{jid}", html)
        while not s.finished:
            ids = await feed.next(HEARTBEAT)
            if ids is None: return  # the server is shutting down: the browser reconnects to the next one
            if not ids:
                if s.jobs is None and loop.time() - born > MAX_AGE: return
                yield ": keep-alive\n\n"
                continue
            async for jid, html, rec in s.fragments(ids, feed):
                yield _sse(f"fh-job-{jid}", html)
                if rec.done and s.jobs is None and jid in feed.finals:
                    feed.finals.discard(jid)
                    if (note := _notification(hub, rec)) is not None: yield _sse(NOTIFY_EVENT, to_xml(note))
        yield _sse(CLOSE_EVENT, "")
    finally:
        feed.close()


def JobEvents(*children: Any, hub: Tasks | None = None, jobs: Sequence[Job | str] | None = None,
              cancel: bool = False, result: bool = False, **kw: Any) -> Any:
    """A container holding one SSE stream for every `JobStatus(job, live="sse")` inside it (also ones swapped in
    later). With `jobs` the stream carries those and closes once all are final; without, every job of the session
    (needs `hub`, or a `Job` child's hub), and `Notify(sse=True)` notifications (event `fh-tasks-notify`)."""
    ids = [j.id if isinstance(j, Job) else j for j in jobs or ()]
    hub = hub or next((j.hub for j in jobs or () if isinstance(j, Job)), None)
    if hub is not None: hub.owner()  # rendered in a request: its session gets an owner token before the stream opens
    prefix = hub.prefix if hub is not None and hub.prefix is not None else PREFIX
    q = [("job", i) for i in ids] + ([("o", ("c" if cancel else "") + ("r" if result else ""))] if cancel or result
                                     else [])
    from urllib.parse import urlencode
    url = f"{prefix}/events" + (f"?{urlencode(q)}" if q else "")
    return Div(*children, hx_ext="sse", sse_connect=url, sse_close=CLOSE_EVENT, cls="fh-job-events", **kw)


# -- websocket -------------------------------------------------------------------------------------
async def _allowed_by_beforeware(app: Any, ws: WebSocket) -> bool:
    """Run a FastHTML app's `before` functions (Beforeware and its `skip` patterns) on the handshake, as FastHTML
    runs them for HTTP routes (it does not for websockets); False when one answers (a redirect to a login...)."""
    befores = list(getattr(app, "before", None) or ())
    if not befores: return True
    import re

    from fasthtml.core import Beforeware, _params, _wrap_call
    async def no_body() -> dict[str, Any]: return {"type": "http.request", "body": b"", "more_body": False}
    req = Request({**ws.scope, "type": "http", "method": "GET"}, no_body)
    req.injects = []  # type: ignore[attr-defined]
    for b in befores:
        bf, skip = (b.f, b.skip) if isinstance(b, Beforeware) else (b, [])
        if any(re.fullmatch(r, req.url.path) for r in skip): continue
        if await _wrap_call(bf, req, _params(bf)): return False
    return True


async def _deny(ws: WebSocket, status: int) -> None:
    "Refuse the handshake with an HTTP status where the server can send one, else close (HTTP 403)."
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(Response(to_xml(Missing("?")) if status == 404 else "", status, headers=HEADERS))
    else:
        await ws.close(code=1008)


def socket_endpoint(hub: Tasks, app: Any) -> Callable[[WebSocket], Any]:
    "`{prefix}/ws[?job=ID...][&o=cr]`: the page's websocket; messages are `JobStatus` fragments swapped by id."
    async def socket(ws: WebSocket) -> None:
        if app is not None and not await _allowed_by_beforeware(app, ws): return await _deny(ws, 403)
        if not hub.bus.available: return await _deny(ws, 501)
        ids = list(dict.fromkeys(ws.query_params.getlist("job")))
        recs = await _check_jobs(hub, ws, ids) if ids else []
        if recs is None: return await _deny(ws, 404)
        o = ws.query_params.get("o", "")
        await ws.accept()
        await _serve_socket(hub, ws, _Session(hub, ws, ids or None, "c" in o, "r" in o, "ws"), recs)
    return socket


async def _serve_socket(hub: Tasks, ws: WebSocket, s: _Session, recs: list[JobRecord]) -> None:
    feed = _Feed(hub, s.jobs)
    # The client says nothing we need; reading tells us when it leaves.
    gone = asyncio.ensure_future(_until_gone(ws, feed))
    try:
        async for _jid, html, _rec in s.fragments([r.id for r in recs], feed): await ws.send_text(html)
        while not s.finished:
            ids = await feed.next(HEARTBEAT)
            if ids is None or gone.done(): break
            async for _jid, html, rec in s.fragments(ids, feed):
                await ws.send_text(html)
                if rec.done and s.jobs is None and rec.id in feed.finals:
                    feed.finals.discard(rec.id)
                    if (note := _notification(hub, rec, True)) is not None: await ws.send_text(to_xml(note))
        if not gone.done(): await ws.close(1000 if s.finished else 1012)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left (or the server closed the socket) mid-send
    finally:
        gone.cancel()
        feed.close()


async def _until_gone(ws: WebSocket, feed: _Feed) -> None:
    try:
        while (await ws.receive())["type"] != "websocket.disconnect": pass
    except Exception: pass
    feed.stop.set()


def JobSocket(*children: Any, hub: Tasks | None = None, jobs: Sequence[Job | str] | None = None,
              cancel: bool = False, result: bool = False, **kw: Any) -> Any:
    "Like `JobEvents`, over one websocket (htmx `ws` extension): for `JobStatus(job, live='ws')` children."
    ids = [j.id if isinstance(j, Job) else j for j in jobs or ()]
    hub = hub or next((j.hub for j in jobs or () if isinstance(j, Job)), None)
    if hub is not None: hub.owner()
    prefix = hub.prefix if hub is not None and hub.prefix is not None else PREFIX
    from urllib.parse import urlencode
    q = [("job", i) for i in ids] + ([("o", ("c" if cancel else "") + ("r" if result else ""))] if cancel or result
                                     else [])
    url = f"{prefix}/ws" + (f"?{urlencode(q)}" if q else "")
    return Div(*children, hx_ext="ws", ws_connect=url, cls="fh-job-socket", **kw)
