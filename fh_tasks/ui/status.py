"""`JobStatus`: an FT component that shows a job's state and progress, refreshed by htmx until it is final, and
the status route the hub adds to its app (behind the app's own Beforeware on a FastHTML app)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastcore.xml import to_xml
from fasthtml.common import Div, Progress, Span
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..errors import StoreError
from ..job import Job, JobRecord

if TYPE_CHECKING:
    from ..hub import Tasks

__all__ = ["JobStatus", "status_routes", "mount_routes", "PREFIX", "HEADERS"]

#: Where a hub serves its status fragments by default (`Tasks(app, prefix=...)`; None serves none).
PREFIX = "/_tasks"
#: Headers on every response of the library's routes.
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
#: Longest text (error message, progress, unknown state) a fragment shows.
SHOWN = 1000
#: The name of the status route (`request.url_for(STATUS_ROUTE, id=...)`).
STATUS_ROUTE = "fh_tasks_job_status"


def _cut(text: str, n: int = SHOWN) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _progress(p: Any) -> Any:
    num = (int, float)
    if isinstance(p, dict) and isinstance(p.get("done"), num) and isinstance(p.get("total"), num) and p["total"] > 0:
        return Progress(value=str(p["done"]), max=str(p["total"]))
    if isinstance(p, (int, float)) and 0 <= p <= 1: return Progress(value=str(p), max="1")
    return Span(_cut(str(p)), cls="fh-job-progress") if p is not None else ""


def _read(hub: Any, jid: str) -> JobRecord | None:
    "The job as a status page needs it: the store's `summary` (no arguments or result) where it has one."
    rec: JobRecord | None = hub.summary(jid)
    return rec


def JobStatus(job: Job | str | JobRecord, hub: Tasks | None = None, every: str = "1s") -> Any:
    """A `<div>` with the job's state (escaped), polling the hub's status route until the job is final.

    It reads the job (a short store read, without its arguments or result) unless given a `JobRecord`. It does
    not poll when its hub serves no routes (`prefix=None`). Any stored row renders: a state this version does not
    know shows its stored text with `data-state="unknown"`, and keeps polling."""
    if isinstance(job, Job): hub, rec, jid = job.hub, _read(job.hub, job.id), job.id
    elif isinstance(job, JobRecord): rec, jid = job, job.id
    else:
        if hub is None: raise TypeError("JobStatus(id) needs the hub: JobStatus(id, tasks)")
        rec, jid = _read(hub, job), job
    # A job deferred in this request is not stored until the response starts: show the state it was deferred in.
    if rec is not None: state, shown = rec.state.value, _cut(rec.state_text)
    else: state = shown = job.new.state if isinstance(job, Job) and not job.stored else "unknown"
    parts: list[Any] = [Span(shown, cls="fh-job-state")]
    if rec is not None and state == "running": parts.append(_progress(rec.progress))
    if rec is not None and state == "failed" and rec.error:
        parts.append(Span(_cut(f"{rec.error.get('type')}: {rec.error.get('message')}"), cls="fh-job-error"))
    prefix = getattr(hub, "prefix", PREFIX) if hub is not None else PREFIX
    live = (rec is None or not rec.done) and prefix is not None
    poll = dict(hx_get=f"{prefix}/jobs/{quote(jid, safe='')}/status", hx_trigger=f"every {every}",
                hx_swap="outerHTML") if live else {}
    return Div(*parts, id=f"job-{jid}", cls=f"fh-job fh-job-{state}", data_state=state, **poll)


def _html(ft: Any, status: int = 200) -> HTMLResponse:
    return HTMLResponse(to_xml(ft), status_code=status, headers=HEADERS)


def _status_endpoint(hub: Tasks) -> Any:
    async def status(req: Request) -> Response:
        jid = str(req.path_params["id"])
        # Read in a thread: a store read never blocks the event loop, however busy the file is.
        try: rec = await run_in_threadpool(_read, hub, jid)
        except StoreError:
            # Not 2xx, so htmx keeps the current fragment and polls again.
            return _html(Div("job status unavailable", cls="fh-job-unavailable"), 503)
        # 200, not 404: htmx swaps only successful responses, and this final fragment stops the polling.
        if rec is None: return _html(Div("unknown job", id=f"job-{jid}", cls="fh-job", data_state="unknown"))
        return _html(JobStatus(rec, hub))
    return status


def status_routes(hub: Tasks, prefix: str = PREFIX) -> list[Any]:
    "Plain Starlette routes for the hub's endpoints: `GET {prefix}/jobs/{id}/status` (fragment)."
    from starlette.routing import Route
    return [Route(f"{prefix}/jobs/{{id:str}}/status", _status_endpoint(hub), methods=["GET"], name=STATUS_ROUTE)]


def mount_routes(hub: Tasks, app: Any, prefix: str) -> None:
    """Add the hub's routes to `app`. On a FastHTML app they are FastHTML routes, so the app's `before` functions
    (Beforeware, with their `skip` patterns) run first, as for the app's own routes; a Starlette app has none."""
    path = f"{prefix}/jobs/{{id:str}}/status"
    if any(getattr(r, "path", None) == path for r in app.router.routes):
        raise ValueError(f"the app already has a route at {path} (another hub?); give this hub another prefix=")
    if not (hasattr(app, "_add_route") and hasattr(app, "before")):
        app.router.routes.extend(status_routes(hub, prefix))
        return
    endpoint = _status_endpoint(hub)

    async def fh_tasks_job_status(req: Request) -> Response: return await endpoint(req)  # type: ignore[no-any-return]

    app.route(path, methods=["get"], name=STATUS_ROUTE)(fh_tasks_job_status)
