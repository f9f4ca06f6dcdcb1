"""Jobs deferred in FastHTML handlers: stored before the response, dropped when the handler fails, run after."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fasthtml.common import Div, FtResponse, P, Titled
from integration_support import wait_until
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import fh_tasks
from fh_tasks import JobState


class ResponseProbe:
    "Wraps an ASGI app and calls `check()` at the moment the response starts, before any byte is sent."

    def __init__(self, app, check) -> None:
        self.app, self.check, self.seen = app, check, []

    async def __call__(self, scope, receive, send) -> None:
        async def probe(message) -> None:
            if message["type"] == "http.response.start": self.seen.append(self.check())
            await send(message)

        await self.app(scope, receive, probe if scope["type"] == "http" else send)


def test_job_is_stored_before_the_response_starts_and_runs_after(site):
    # Given a task that cannot finish until the test lets it
    app, rt, tasks = site()
    release, jobs = threading.Event(), []

    @tasks.task
    def slow(n: int) -> int:
        assert release.wait(10)
        return n * 2

    @rt("/go")
    def go():
        job = slow.defer(21)
        jobs.append(job)
        return P("accepted"), job

    probe = ResponseProbe(app, lambda: jobs[-1].get() if jobs else None)
    with TestClient(probe) as cli:
        try:
            # When the handler returns the job
            r = cli.get("/go")
            # Then the row was committed when the response started, and the job had not finished
            assert r.status_code == 200 and "accepted" in r.text
            at_start = probe.seen[0]
            assert at_start is not None and at_start.id == jobs[0].id
            assert at_start.state in (JobState.queued, JobState.running)
            assert not jobs[0].get().done
        finally:
            release.set()
        # And it runs after the response
        rec = jobs[0].wait(10)
        assert rec.state == "succeeded" and rec.result == 42 and rec.attempts == 1


def test_handler_that_raises_stores_none_of_its_jobs(site):
    # Given a handler that defers two jobs and then fails
    app, rt, tasks = site()
    ran: list[str] = []

    @tasks.task
    def note(x: str) -> None: ran.append(x)

    @rt("/boom")
    def boom():
        note.defer("a")
        note.defer("b")
        raise RuntimeError("handler bug")

    @rt("/fine")
    def fine(): return P("ok"), note.defer("c")

    with TestClient(app, raise_server_exceptions=False) as cli:
        # When it is requested
        r = cli.get("/boom")
        # Then the client gets a 500 and nothing was stored
        assert r.status_code == 500
        assert tasks.counts() == {}
        # And the next request's job is stored and runs (the hub is unharmed)
        assert cli.get("/fine").status_code == 200
        wait_until(lambda: tasks.counts() == {"succeeded": 1}, what="the good job finishing")
    assert ran == ["c"]


def test_handler_that_raises_http_exception_stores_none(site):
    app, rt, tasks = site()

    @tasks.task
    def note(x: str) -> None: ...

    @rt("/missing")
    def missing():
        note.defer("a")
        raise HTTPException(404, "no such thing")

    with TestClient(app) as cli:
        r = cli.get("/missing")
        assert r.status_code == 404
        assert tasks.counts() == {}


def test_every_way_of_handing_back_a_job_stores_it(site):
    # Given handlers that hand a job back in each way FastHTML and Starlette allow, and one that does not return it
    app, rt, tasks = site()

    @tasks.task
    def echo(tag: str) -> str: return tag

    @rt("/tuple")
    def tuple_():
        a, b = echo.defer("tuple-1"), echo.defer("tuple-2")
        return Titled("t", P(a.id, id="a"), P(b.id, id="b")), a, b

    @rt("/ftresponse")
    def ftresponse():
        job = echo.defer("ftresponse")
        return FtResponse(Div(job.id, id="a"), background=job)

    @rt("/response")
    def response():
        job = echo.defer("response")
        return HTMLResponse(f'<p id="a">{job.id}</p>', background=job)

    @rt("/unreturned")
    def unreturned():
        job = echo.defer("unreturned")
        return P(job.id, id="a")

    @rt("/async")
    async def async_():
        job = echo.defer("async")
        await asyncio.sleep(0)
        return P(job.id, id="a"), job

    with TestClient(app) as cli:
        ids = []
        for path in ("/tuple", "/ftresponse", "/response", "/unreturned", "/async"):
            # When each is requested
            r = cli.get(path)
            assert r.status_code == 200, (path, r.text)
            found = [_between(r.text, f'id="{k}">', "<") for k in ("a", "b") if f'id="{k}"' in r.text]
            # Then its jobs are stored by the time the response arrives
            assert found and all(tasks.get(i) is not None for i in found), path
            ids += found
        # And each runs once, with its own arguments
        recs = [wait_until(lambda i=i: (r := tasks.get(i)) and r.done and r, what=i) for i in ids]
    assert [r.result for r in recs] == ["tuple-1", "tuple-2", "ftresponse", "response", "unreturned", "async"]
    assert all(r.state == "succeeded" and r.attempts == 1 for r in recs)


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_jobs_of_one_handler_are_independent(site):
    # Given a handler returning a failing job first and a good job after it
    app, rt, tasks = site()
    ran: list[str] = []

    @tasks.task
    def fails() -> None:
        raise ValueError("first job breaks")

    @tasks.task
    def works() -> None: ran.append("works")

    @rt("/both")
    def both():
        return P("ok"), fails.defer(), works.defer()

    with TestClient(app) as cli:
        # When it is requested
        assert cli.get("/both").status_code == 200
        # Then the failure of the first does not stop the second
        wait_until(lambda: tasks.counts() == {"failed": 1, "succeeded": 1}, what="both jobs final")
    assert ran == ["works"]
    assert tasks.jobs(state="failed")[0].error["message"] == "first job breaks"


def test_background_tasks_run_in_order(site):
    # Given the seed's signup handler with one import changed
    app, rt, tasks = site()
    events: list[tuple[str, str]] = []

    @tasks.task
    async def send_welcome_email(to_address: str) -> None:
        events.append(("start", to_address))
        await asyncio.sleep(0.05)  # the next job must not start meanwhile
        events.append(("end", to_address))

    @tasks.task
    async def send_admin_notification(username: str) -> None:
        events.append(("start", username))
        events.append(("end", username))

    @rt("/signup")
    async def signup(email: str, username: str):
        bg = fh_tasks.BackgroundTasks()
        bg.add_task(send_welcome_email, to_address=email)
        bg.add_task(send_admin_notification, username=username)
        return Titled("Signup successful!"), bg

    with TestClient(app) as cli:
        # When a user signs up
        r = cli.post("/signup", data={"email": "ada@example.com", "username": "ada"})
        assert r.status_code == 200 and "Signup successful!" in r.text
        # Then the second job starts only after the first has ended
        wait_until(lambda: tasks.counts() == {"succeeded": 2}, what="both jobs done")
    assert events == [("start", "ada@example.com"), ("end", "ada@example.com"), ("start", "ada"), ("end", "ada")]


def test_background_tasks_failure_cancels_the_rest(site):
    # Given a chain whose second job fails (after its retry)
    app, rt, tasks = site()
    ran: list[str] = []

    @tasks.task
    def step(name: str) -> None: ran.append(name)

    @tasks.task(retries=1, retry_delay=0.01)
    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("step two failed")

    @rt("/chain")
    def chain():
        bg = fh_tasks.BackgroundTasks()
        bg.add_task(step, "one")
        bg.add_task(broken)
        bg.add_task(step, "three")
        bg.add_task(step, "four")
        return P(" ".join(bg.ids), id="ids"), bg

    with TestClient(app) as cli:
        # When it runs
        ids = _between(cli.get("/chain").text, 'id="ids">', "<").split()
        wait_until(lambda: all((r := tasks.get(i)) and r.done for i in ids), what="the chain to end")
    # Then the first succeeded, the second failed after both attempts, and the rest were cancelled unrun
    one, two, three, four = (tasks.get(i) for i in ids)
    assert (one.state, two.state, two.attempts) == ("succeeded", "failed", 2)
    assert three.state == four.state == "cancelled" and three.error["type"] == "Cancelled"
    assert ran == ["one", "broken", "broken"]


def test_background_tasks_refuses_a_plain_function(make_tasks):
    make_tasks(workers=0)

    def send_welcome_email(to_address: str) -> None: ...

    bg = fh_tasks.BackgroundTasks()
    with pytest.raises(TypeError, match=r"send_welcome_email is not a registered task.*@tasks.task"):
        bg.add_task(send_welcome_email, to_address="a@b.c")


def test_async_handler_defers_async_task_that_runs_on_the_loop(site):
    app, rt, tasks = site()

    @tasks.task
    async def shout(word: str) -> dict:
        await asyncio.sleep(0)
        return {"word": word.upper(), "on_loop": asyncio.get_running_loop().is_running()}

    @rt("/shout")
    async def shout_page(word: str):
        return P("ok"), shout.defer(word)

    with TestClient(app) as cli:
        cli.get("/shout", params={"word": "hey"})
        rec = wait_until(lambda: (r := tasks.jobs(task=shout)) and r[0].done and r[0], what="the job")
    assert rec.state == "succeeded" and rec.result == {"word": "HEY", "on_loop": True}


def test_sync_tasks_run_in_the_workers_own_threads(site):
    # Given a sync handler and a sync task that both record their thread
    app, rt, tasks = site()
    threads: dict[str, str] = {}

    @tasks.task
    def where() -> str:
        return threading.current_thread().name

    @rt("/where")
    def where_page():
        threads["handler"] = threading.current_thread().name
        return P("ok"), where.defer()

    with TestClient(app) as cli:
        cli.get("/where")
        rec = wait_until(lambda: (r := tasks.jobs(task=where)) and r[0].done and r[0], what="the job")
    # Then the task ran in an fh-tasks pool thread, not in the thread pool serving sync handlers
    assert rec.result.startswith("fh-tasks"), rec.result
    assert not threads["handler"].startswith("fh-tasks")


def test_worker_is_woken_at_once_not_by_polling(site):
    # Given a worker that polls only every 5 s
    app, rt, tasks = site(poll_interval=5.0)

    @tasks.task
    def quick(n: int) -> int: return n

    @rt("/q")
    def q(): return P("ok"), quick.defer(1)

    with TestClient(app) as cli:
        started = time.monotonic()
        # When a handler defers a job, and when code outside a request defers one
        cli.get("/q")
        outside = quick.defer(2)
        # Then both finish long before the next poll would have found them
        wait_until(lambda: tasks.counts() == {"succeeded": 2}, timeout=4.0, what="the wake-up")
        assert time.monotonic() - started < 4.0
    assert outside.get().result == 2


def test_full_durability_in_a_request(site):
    app, rt, tasks = site(durability="full")

    @tasks.task
    def echo(x: int) -> int: return x

    @rt("/e")
    def e(x: int):
        jobs = [echo.defer(x + i) for i in range(3)]
        return P(" ".join(j.id for j in jobs), id="ids"), *jobs

    with TestClient(app) as cli:
        ids = _between(cli.get("/e", params={"x": 10}).text, 'id="ids">', "<").split()
        assert all(tasks.get(i) is not None for i in ids)
        wait_until(lambda: tasks.counts() == {"succeeded": 3}, what="three jobs")
    assert sorted(tasks.get(i).result for i in ids) == [10, 11, 12]
    assert tasks.store.durability == "full"
    assert tasks.store._read("PRAGMA synchronous")[0][0] == 2  # FULL


def test_plain_starlette_app(make_tasks):
    # Given a Starlette app (no FastHTML `after` hook): a 5xx response means the handler failed
    ran: list[str] = []
    holder: dict = {}

    async def ok(request):
        holder["t"].defer("ok")
        return PlainTextResponse("fine")

    async def fail(request):
        holder["t"].defer("fail")
        return PlainTextResponse("broken", status_code=503)

    app = Starlette(routes=[Route("/ok", ok), Route("/fail", fail)])
    tasks = make_tasks(app)

    @tasks.task
    def note(x: str) -> None: ran.append(x)

    holder["t"] = note
    with TestClient(app) as cli:
        assert cli.get("/fail").status_code == 503
        assert cli.get("/ok").status_code == 200
        wait_until(lambda: tasks.counts() == {"succeeded": 1}, what="the ok job")
    assert ran == ["ok"]


def test_scheduled_jobs_and_retries_do_not_wait_for_the_next_poll(site):
    # Given a worker that polls only every 5 s
    app, _, tasks = site(poll_interval=5.0)
    tries: list[int] = []

    @tasks.task(retries=1, retry_delay=0.05)
    def flaky() -> int:
        tries.append(1)
        if len(tries) == 1: raise RuntimeError("once")
        return len(tries)

    @tasks.task
    def later() -> str: return "done"

    with TestClient(app):
        # When a job is scheduled 0.2 s ahead, and another job's retry falls due 0.05 s after its failure
        scheduled = later.with_options(delay=0.2).defer()
        retried = flaky.defer()
        # Then both run when due, long before the next poll
        assert scheduled.wait(timeout=3.0).result == "done"
        assert retried.wait(timeout=3.0).result == 2


def test_job_deferred_after_the_response_started_is_stored_at_once(site):
    # Given a handler whose plain Starlette background task defers a job after the response was sent
    app, rt, tasks = site()
    from starlette.background import BackgroundTask
    ids: list[str] = []

    @tasks.task
    def follow_up(x: int) -> int: return x

    def after_response() -> None:
        job = follow_up.defer(9)
        ids.append(job.id)
        assert job.stored and job.get() is not None

    @rt("/later")
    def later(): return P("ok"), BackgroundTask(after_response)

    with TestClient(app) as cli:
        assert cli.get("/later").status_code == 200
        assert ids and tasks.get(ids[0]) is not None
        wait_until(lambda: tasks.counts() == {"succeeded": 1}, what="the follow-up job")


def test_redirecting_handler_stores_its_job(site):
    # Given a handler that defers a job and redirects (a 3xx is a success)
    from fasthtml.common import Redirect
    app, rt, tasks = site()
    ids: list[str] = []

    @tasks.task
    def audit(who: str) -> str: return who

    @rt("/login")
    def login():
        ids.append(audit.defer("ada").id)
        return Redirect("/home")

    with TestClient(app) as cli:
        r = cli.get("/login", follow_redirects=False)
        assert r.status_code in (302, 303) and r.headers["location"] == "/home"
        assert tasks.get(ids[0]) is not None


def test_waiting_inside_the_deferring_handler_is_a_clear_error(site):
    # Given a handler that defers a job and then waits for it before responding
    app, rt, tasks = site()

    @tasks.task
    def work() -> int:
        return 1

    @rt("/impatient")
    def impatient():
        job = work.defer()
        try:
            job.wait(timeout=5)
        except RuntimeError as e:
            return P(str(e), id="err"), job
        return P("waited")

    # When it is requested
    with TestClient(app) as cli:
        r = cli.get("/impatient")
    # Then the wait fails at once with the reason, and the job is still stored with the response
    assert r.status_code == 200 and "stored when the response starts" in r.text
    assert len(tasks.jobs()) == 1


def test_the_status_fragment_polls_until_final_and_stops_for_an_unknown_job(site):
    # Given a job that is waiting on an event, and an id no job has
    app, rt, tasks = site()
    gate = threading.Event()

    @tasks.task
    def slow() -> str:
        gate.wait(10)
        return "<b>done</b>"

    @rt("/go")
    def go() -> str: return slow.defer().id

    with TestClient(app) as cli:
        job = tasks.get(cli.get("/go").text)  # deferred by this client's session: its status is this session's
        assert job is not None
        # When its status fragment is fetched while it runs, Then it keeps polling
        live = cli.get(f"/_tasks/jobs/{job.id}/status").text
        assert 'hx-trigger="every 1s"' in live
        gate.set()
        wait_until(lambda: tasks.get(job.id).done)
        # Then once final it stops polling
        final = cli.get(f"/_tasks/jobs/{job.id}/status").text
        assert 'data-state="succeeded"' in final and "hx-trigger" not in final
        # And an unknown id gets a final fragment with a 404 (the polling element swaps a 404 in, and stops)
        r = cli.get("/_tasks/jobs/nope/status")
        assert r.status_code == 404 and 'data-state="unknown"' in r.text and "hx-trigger" not in r.text
        assert "this.outerHTML=event.detail.xhr.response" in live


def test_the_status_fragment_escapes_what_a_task_wrote(site):
    # Given a job that failed with hostile text in its error
    app, rt, tasks = site()

    @tasks.task
    def hostile() -> None:
        raise ValueError('<script>alert(1)</script>"><img src=x onerror=alert(2)>')

    @rt("/go")
    def go() -> str: return hostile.defer().id

    with TestClient(app) as cli:
        job = tasks.get(cli.get("/go").text)
        assert job is not None
        wait_until(lambda: tasks.get(job.id).done)
        # When its status fragment is rendered, Then the text is escaped, never markup
        html = cli.get(f"/_tasks/jobs/{job.id}/status").text
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
