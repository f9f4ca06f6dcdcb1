"""`JobStatus`: an FT component that shows a job's state and progress, refreshed by htmx until it is final."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastcore.xml import to_xml
from fasthtml.common import Div, Progress, Span
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..job import Job, JobRecord

if TYPE_CHECKING:
    from ..app import Tasks

__all__ = ["JobStatus", "status_routes", "PREFIX"]

#: Where the hub serves its status fragments.
PREFIX = "/_tasks"


def _progress(p: Any) -> Any:
    num = (int, float)
    if isinstance(p, dict) and isinstance(p.get("done"), num) and isinstance(p.get("total"), num) and p["total"] > 0:
        return Progress(value=str(p["done"]), max=str(p["total"]))
    if isinstance(p, (int, float)) and 0 <= p <= 1: return Progress(value=str(p), max="1")
    return Span(str(p), cls="fh-job-progress") if p is not None else ""


def JobStatus(job: Job | str | JobRecord, hub: Tasks | None = None, every: str = "1s") -> Any:
    "A `<div>` with the job's state (escaped), polling its status route until the job is final."
    if isinstance(job, Job): hub, rec, jid = job.hub, job.get(), job.id
    elif isinstance(job, JobRecord): rec, jid = job, job.id
    else:
        if hub is None: raise TypeError("JobStatus(id) needs the hub: JobStatus(id, tasks)")
        rec, jid = hub.get(job), job
    # A job deferred in this request is not stored until the response starts: show the state it was deferred in.
    state = rec.state.value if rec else job.new.state if isinstance(job, Job) and not job.stored else "unknown"
    parts: list[Any] = [Span(state, cls="fh-job-state")]
    if rec is not None and rec.state.value == "running": parts.append(_progress(rec.progress))
    if rec is not None and rec.state.value == "failed" and rec.error:
        parts.append(Span(f"{rec.error.get('type')}: {rec.error.get('message')}", cls="fh-job-error"))
    live = rec is None or not rec.done
    poll = dict(hx_get=f"{PREFIX}/jobs/{jid}/status", hx_trigger=f"every {every}", hx_swap="outerHTML") if live else {}
    return Div(*parts, id=f"job-{jid}", cls=f"fh-job fh-job-{state}", data_state=state, **poll)


def status_routes(hub: Tasks) -> list[Any]:
    "The Starlette routes `Tasks.init_app` mounts: `GET /_tasks/jobs/{id}/status` (fragment)."
    from starlette.routing import Route

    async def status(req: Request) -> Response:
        jid = req.path_params["id"]
        rec = hub.get(jid)
        # 200, not 404: htmx swaps only successful responses, and this final fragment stops the polling.
        if rec is None:
            return HTMLResponse(to_xml(Div("unknown job", id=f"job-{jid}", cls="fh-job", data_state="unknown")))
        return HTMLResponse(to_xml(JobStatus(rec, hub)))

    return [Route(f"{PREFIX}/jobs/{{id:str}}/status", status, methods=["GET"])]
