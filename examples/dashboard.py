"""The seed's "Background Task Dashboard" on fh-tasks: a durable job calls a slow service; a list polls results."""
# FastHTML apps use its star import, as the seed does.
# ruff: noqa: F403, F405
import os
import time

import httpx
from fasthtml.common import *
from fastlite import database

from fh_tasks import JobStatus, Tasks, current_job

app, rt = fast_app()
tasks = Tasks(app, db=os.environ.get('FH_TASKS_DB', 'fh_tasks.db'))
SLOW_API_URL = os.environ.get('SLOW_API_URL', 'http://127.0.0.1:8123')
POLL = os.environ.get('DASHBOARD_POLL', '5s')

# A file, not ':memory:': a job may run after a restart, or in a worker process beside the app.
db = database(os.environ.get('DASHBOARD_DB', 'dashboard.db'))

class TStamp: job: str; request_time: int; response_time: int   # (1)

# Keyed by the job's id: two submits in one second get two rows, and a job that runs again
# (delivery is at-least-once) overwrites its own row instead of adding a second one.
tstamps = db.create(TStamp, pk='job')

@tasks.task(retries=3, timeout=30)                            # (2) retried with backoff if the service is down
def task_submit(request_time: int):
    with httpx.Client(timeout=20) as client:
        response = client.post(f'{SLOW_API_URL}/slow?ts={request_time}')   # (3)
    response.raise_for_status()
    tstamps.upsert(job=current_job().id, **response.json())    # (4)

@rt
def submit():
    "Route that initiates a background task and returns immediately."
    request_time = int(time.time())
    job = task_submit.defer(request_time=request_time)         # (5)
    return P(f'Request submitted at: {request_time}'), JobStatus(job), job   # (6) the job's state, live

@rt
def show_tstamps(): return Ul(map(Li, tstamps()))             # (7)

@rt
def index():
    return Titled('Background Task Dashboard',
        P(Button('Press to call slow service',
                 hx_post=submit, hx_target='#res')),         # (8)
        H2('Responses from Tasks'),
        P('', id='res'),
        Div(Ul(map(Li, tstamps())),
            hx_get=show_tstamps, hx_trigger=f'every {POLL}'),  # (9)
    )

serve()
