"""The web binding: how a hub plugs into a FastHTML (or Starlette) app.

- `JobsMiddleware` (ASGI) holds the jobs deferred while handling a request and has the hub store them in one
  transaction just before the response starts; a failed request stores none of them.
- The app's lifespan starts and stops the hub's in-process workers.
- The hub's routes (`ui/status.py`) go through the app's own routing, behind its Beforeware.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .owner import ensure_owner
from .ui.status import mount_routes

if TYPE_CHECKING:
    from .hub import Tasks
    from .job import Job

__all__ = ["JobsMiddleware", "bind", "hold", "holds", "owner", "session"]


class _Batch:
    "The jobs deferred during one request, stored together when the response starts."
    __slots__ = ("jobs", "open", "scope")

    def __init__(self, scope: Scope) -> None:
        self.jobs: list[Job] = []
        self.open = True
        self.scope = scope


_batch: ContextVar[_Batch | None] = ContextVar("fh_tasks_batch", default=None)


def hold(job: Job) -> bool:
    "Keep `job` in the current request's batch; False outside a request (or after its response started)."
    batch = _batch.get()
    if batch is None or not batch.open: return False
    batch.jobs.append(job)
    return True


def owner() -> str | None:
    """The owner token of the current request's session, made and kept in the session if it has none yet; None
    outside a request or without sessions (Starlette's `SessionMiddleware`, always on in FastHTML)."""
    sess = session()
    return ensure_owner(sess) if sess is not None else None


def session() -> dict[str, Any] | None:
    "The current request's session (a dict), or None outside a request or without sessions."
    batch = _batch.get()
    sess = batch.scope.get("session") if batch is not None else None
    return sess if isinstance(sess, dict) else None


def holds(job: Job) -> bool:
    "True while `job` waits in the current request's batch for the response to start."
    batch = _batch.get()
    return batch is not None and batch.open and any(j is job for j in batch.jobs)


class JobsMiddleware:
    """Stores the jobs deferred while handling a request in one transaction, just before the response starts.

    A failed request stores none of them: a handler that raised (its 500 is sent past this middleware) or a
    response with an error status (4xx/5xx, e.g. from `HTTPException`), wherever the job went (returned in the
    tuple, a response's `background`, or not returned at all). Later `defer()` calls store at once.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http": return await self.app(scope, receive, send)
        batch = _Batch(scope)
        token = _batch.set(batch)

        async def send_jobs_first(message: Message) -> None:
            if message["type"] == "http.response.start" and batch.open:
                batch.open = False
                if message["status"] >= 400:
                    for j in batch.jobs: j.dropped = True  # a response's `background` must not store it later
                elif batch.jobs:
                    by_hub: dict[int, list[Job]] = {}
                    for j in batch.jobs: by_hub.setdefault(id(j.hub), []).append(j)
                    for jobs in by_hub.values(): await jobs[0].hub.store_request(jobs)
            await send(message)

        try:
            await self.app(scope, receive, send_jobs_first)
        finally:
            batch.open = False
            _batch.reset(token)


def bind(hub: Tasks, app: Any) -> None:
    "Bind `hub` to `app`: its routes (first: a clash leaves the app as it was), the middleware, the lifespan."
    if hub.prefix is not None:
        from .ui.live import hook_server_shutdown
        mount_routes(hub, app, hub.prefix)
        hook_server_shutdown()
    state = app.state
    if not getattr(state, "fh_tasks_middleware", False):
        app.add_middleware(JobsMiddleware)
        state.fh_tasks_middleware = True
    ls = getattr(app, "lifespan", None)
    if ls is not None and hasattr(ls, "startup") and hasattr(ls, "shutdown"):  # FastHTML's own Lifespan
        ls.startup.append(hub.start)
        ls.shutdown.append(_end_streams)
        ls.shutdown.append(hub.stop)
    else:
        _wrap_lifespan(app, hub)


def _wrap_lifespan(app: Any, hub: Tasks) -> None:
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> Any:
        await hub.start()
        try:
            async with inner(a) as state: yield state
        finally:
            await _end_streams()
            await hub.stop()

    app.router.lifespan_context = lifespan


async def _end_streams() -> None:
    "The live streams and sockets of this loop end (for servers that shut down the app before its connections)."
    from .ui.live import end_streams
    end_streams()
