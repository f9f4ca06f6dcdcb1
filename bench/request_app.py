"""The FastHTML app of the request benchmark; BENCH_VARIANT picks what `GET /` does besides returning the page.

plain: the page only. starlette: + a Starlette `BackgroundTask` no-op. fh: + an fh-tasks job (`Tasks(app)`:
SQLite file, in-process worker). huey: + a SqliteHuey enqueue. celery: + a Celery `.delay()` (Redis broker).
Handlers are `async def`, so the only difference between variants is the task system's own work.
"""
from __future__ import annotations

import os
from typing import Any

from fasthtml.common import H1, FastHTML, Main, P, Title
from starlette.background import BackgroundTask

from bench.peers import job_arg
from bench.probe import record

VARIANT = os.environ.get("BENCH_VARIANT", "plain")
app = FastHTML()


def page() -> tuple[Any, ...]:
    return Title("Thanks"), Main(H1("Thanks!"), P("Your request was received; we will email you shortly."))


if VARIANT == "plain":
    @app.get("/")
    async def plain() -> Any:
        return page()

elif VARIANT == "starlette":
    def noop(arg: dict[str, Any]) -> None:
        record(arg)

    @app.get("/")
    async def starlette_bg() -> Any:
        return *page(), BackgroundTask(noop, job_arg())

elif VARIANT == "fh":
    from bench.peers.fh_peer import make_hub
    tasks = make_hub(os.environ["BENCH_FH_DB"], app=app, workers=1)
    fh_noop = tasks.registry["bench.noop"]

    @app.get("/")
    async def fh_job() -> Any:
        fh_noop.defer(job_arg())
        return page()

elif VARIANT == "huey":
    from bench.peers.huey_peer import noop as huey_noop

    @app.get("/")
    async def huey_job() -> Any:
        huey_noop(job_arg())
        return page()

elif VARIANT == "celery":
    from bench.peers.celery_peer import noop as celery_noop

    @app.get("/")
    async def celery_job() -> Any:
        celery_noop.delay(job_arg())
        return page()

else:
    raise SystemExit(f"unknown BENCH_VARIANT {VARIANT!r}")
