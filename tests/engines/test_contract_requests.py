"""Contract: jobs deferred in FastHTML handlers are stored before the response, by none of a failed request, and
every way of handing a job back works. The app runs under Starlette's TestClient with its lifespan."""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract_tasks import lines
from engines_support import Engine, site, wait_until
from fasthtml.common import Div, FtResponse, P, Titled
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse
from starlette.testclient import TestClient

import fh_tasks
from fh_tasks import JobState


class ResponseProbe:
    "ASGI wrapper: calls `check()` when the response starts, before its first byte goes out, and keeps the answers."

    def __init__(self, app: Any, check: Callable[[], Any]) -> None:
        self.app, self.check, self.seen = app, check, []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def probe(message: Any) -> None:
            if message["type"] == "http.response.start": self.seen.append(self.check())
            await send(message)

        await self.app(scope, receive, probe if scope["type"] == "http" else send)


def ids_in(html: str) -> list[str]:
    "The job ids a page shows in elements with id 'job'."
    return re.findall(r'id="job"[^>]*>([0-9a-f]{32})<', html)


def test_job_is_stored_before_the_response_starts_and_runs_after_it(engine: Engine, tmp_path: Path) -> None:
    # Given a handler deferring a job that cannot finish until a file appears
    app, rt, tasks, t = site(engine)
    release, deferred = tmp_path / "release", []

    @rt("/go")
    def go():
        job = t.progress_then_wait.defer(str(release))
        deferred.append(job)
        return P(job.id, id="job"), job

    probe = ResponseProbe(app, lambda: tasks.get(deferred[-1].id) if deferred else None)
    with TestClient(probe) as client:
        try:
            # When it is requested
            r = client.get("/go")
            # Then the job was on disk when the response started, and had not finished
            assert r.status_code == 200 and ids_in(r.text) == [deferred[0].id]
            at_start = probe.seen[0]
            assert at_start is not None and at_start.id == deferred[0].id
            assert at_start.state in (JobState.queued, JobState.running) and not at_start.done
        finally:
            release.touch()
        # And it runs after the response, once
        rec = deferred[0].wait(20)
    assert (rec.state, rec.attempts, rec.result) == (JobState.succeeded, 1, "released")


def test_handler_that_raises_stores_none_of_its_jobs(engine: Engine, tmp_path: Path) -> None:
    # Given handlers that defer jobs and then fail: an exception (500) and an HTTPException (404)
    app, rt, tasks, t = site(engine)
    log, deferred = str(tmp_path / "ran"), []

    @rt("/boom")
    def boom():
        deferred.extend([t.append.defer(log, "boom-1"), t.append.defer(log, "boom-2")])
        raise RuntimeError("handler bug")

    @rt("/missing")
    def missing():
        deferred.append(t.append.defer(log, "missing"))
        raise HTTPException(404, "no such thing")

    @rt("/fine")
    def fine():
        job = t.append.defer(log, "fine")
        return P(job.id, id="job"), job

    with TestClient(app, raise_server_exceptions=False) as client:
        # When they are requested
        assert client.get("/boom").status_code == 500
        assert client.get("/missing").status_code == 404
        # Then none of their jobs was stored
        assert len(deferred) == 3 and all(tasks.get(j.id) is None for j in deferred)
        assert tasks.counts() == {} and tasks.jobs() == []
        # And the next good request's job is stored and runs (the hub is unharmed)
        (good,) = ids_in(client.get("/fine").text)
        wait_until(lambda: (r := tasks.get(good)) and r.done, what="the good job finishing")
    engine.drain(tasks)
    assert tasks.counts() == {"succeeded": 1} and lines(log) == ["fine"]


def test_error_response_stores_none_of_its_jobs(engine: Engine, tmp_path: Path) -> None:
    # Given handlers answering with a 4xx status: the job as Response(background=), as FtResponse(background=),
    # and not handed back at all
    app, rt, tasks, t = site(engine)
    log, deferred = str(tmp_path / "ran"), {}

    @rt("/response")
    def response():
        job = deferred["Response(background=job), 422"] = t.append.defer(log, "response")
        return HTMLResponse("<p>invalid form</p>", status_code=422, background=job)

    @rt("/ftresponse")
    def ftresponse():
        job = deferred["FtResponse(background=job), 409"] = t.append.defer(log, "ftresponse")
        return FtResponse(P("name taken"), status_code=409, background=job)

    @rt("/unreturned")
    def unreturned():
        deferred["not returned, 400"] = t.append.defer(log, "unreturned")
        return HTMLResponse("<p>bad request</p>", status_code=400)

    with TestClient(app) as client:
        # When they are requested
        assert [client.get(p).status_code for p in ("/response", "/ftresponse", "/unreturned")] == [422, 409, 400]
        engine.drain(tasks)
    # Then none of their jobs was stored, so none ran
    stored = {how: tasks.get(job.id) is not None for how, job in deferred.items()}
    assert stored == dict.fromkeys(deferred, False), f"stored despite the error status: {stored}"
    assert tasks.counts() == {} and lines(log) == []


def test_every_way_of_handing_back_a_job_stores_it(engine: Engine) -> None:
    # Given handlers that hand jobs back in a tuple, in FtResponse(background=), in Response(background=),
    # from an async handler, and one that does not return its job at all
    app, rt, tasks, t = site(engine)

    @rt("/tuple")
    def tuple_():
        a, b = t.echo.defer("tuple-1"), t.echo.defer("tuple-2")
        return Titled("two jobs", P(a.id, id="job"), P(b.id, id="job")), a, b

    @rt("/ftresponse")
    def ftresponse():
        job = t.echo.defer("ftresponse")
        return FtResponse(Div(job.id, id="job"), background=job)

    @rt("/response")
    def response():
        job = t.echo.defer("response")
        return HTMLResponse(f'<p id="job">{job.id}</p>', background=job)

    @rt("/async")
    async def async_():
        job = t.echo.defer("async")
        return P(job.id, id="job"), job

    @rt("/unreturned")
    def unreturned():
        job = t.echo.defer("unreturned")
        return P(job.id, id="job")

    ids: list[str] = []
    with TestClient(app) as client:
        for path in ("/tuple", "/ftresponse", "/response", "/async", "/unreturned"):
            # When each is requested
            r = client.get(path)
            assert r.status_code == 200, (path, r.text)
            found = ids_in(r.text)
            # Then its jobs were stored by the time the response arrived
            assert found and all(tasks.get(i) is not None for i in found), path
            ids += found
        # And each runs once, with its own argument
        recs = [wait_until(lambda i=i: (r := tasks.get(i)) and r.done and r, what=f"job {i}") for i in ids]
    assert [r.result for r in recs] == ["tuple-1", "tuple-2", "ftresponse", "response", "async", "unreturned"]
    assert all(r.state == JobState.succeeded and r.attempts == 1 for r in recs)


def test_background_tasks_run_in_order_and_a_failure_cancels_the_rest(engine: Engine, tmp_path: Path) -> None:
    # Given the seed's ordered BackgroundTasks: one chain that works (its first step slow), one whose second step fails
    app, rt, tasks, t = site(engine)
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")

    @rt("/good")
    def good_chain():
        bg = fh_tasks.BackgroundTasks()
        bg.add_task(t.append, good, "first", pause=0.2)
        bg.add_task(t.append, good, "second")
        return P(" ".join(bg.ids), id="ids"), bg

    @rt("/bad")
    def bad_chain():
        bg = fh_tasks.BackgroundTasks()
        bg.add_task(t.append, bad, "first")
        bg.add_task(t.fails_unless, str(tmp_path / "never"))
        bg.add_task(t.append, bad, "third")
        return P(" ".join(bg.ids), id="ids"), bg

    with TestClient(app) as client:
        # When both are requested
        chains = [re.search(r'id="ids">([0-9a-f ]+)<', client.get(p).text).group(1).split() for p in ("/good", "/bad")]
        ids = chains[0] + chains[1]
        wait_until(lambda: all((r := tasks.get(i)) and r.done for i in ids), what="both chains to end")
    # Then the good chain ran in order, the second step only after the slow first one
    assert lines(good) == ["first", "second"]
    assert [tasks.get(i).state for i in chains[0]] == [JobState.succeeded, JobState.succeeded]
    # And in the bad chain the step after the failure was cancelled without running
    assert [tasks.get(i).state for i in chains[1]] == [JobState.succeeded, JobState.failed, JobState.cancelled]
    assert lines(bad) == ["first"]

