"""The seed's "Background Task Dashboard" on fh-tasks: a durable job calls a slow service, each submission gets a live
status with its progress in a list (pushed over Server-Sent Events), and the seed's polled list of answers stays."""
# FastHTML apps use its star import, as the seed does.
# ruff: noqa: F403, F405
import os
import time

import httpx
from fasthtml.common import *
from fastlite import database

from fh_tasks import JobStatus, Tasks, current_job
from fh_tasks.ui import JobEvents

app, rt = fast_app()
tasks = Tasks(app, db=os.environ.get('FH_TASKS_DB') or 'dashboard_jobs.db')   # this example's own store file
tasks.notify(toast=True)                                      # a toast for this browser when its job ends
SLOW_API_URL = os.environ.get('SLOW_API_URL', 'http://127.0.0.1:8123')
POLL = os.environ.get('DASHBOARD_POLL', '5s')

# A file, not ':memory:': a job may run after a restart, or in a worker process beside the app.
db = database(os.environ.get('DASHBOARD_DB', 'dashboard.db'))

class TStamp: job: str; request_time: int; response_time: int   # (1)

# Keyed by the job's id: two submits in one second get two rows, and a job that runs again
# (delivery is at-least-once) overwrites its own row instead of adding a second one.
tstamps = db.create(TStamp, pk='job')

def hhmmss(ts: int) -> str: return time.strftime('%H:%M:%S', time.localtime(ts))

@tasks.task(retries=3, timeout=30, notify=True)               # (2) retried with backoff if the service is down
def task_submit(request_time: int) -> dict:
    job = current_job()
    job.progress({'done': 0, 'total': 2, 'message': 'calling the slow service'})
    with httpx.Client(timeout=20) as client:
        response = client.post(f'{SLOW_API_URL}/slow?ts={request_time}')   # (3)
    response.raise_for_status()
    job.progress({'done': 1, 'total': 2, 'message': 'storing the answer'})
    tstamps.upsert(job=job.id, **response.json())              # (4)
    return response.json()

def Row(t: TStamp):
    "One answer, in human times (the raw values stay in data- attributes)."
    return Li(f'Requested at {hhmmss(t.request_time)}, answered at {hhmmss(t.response_time)} '
              f'({t.response_time - t.request_time} s later)', data_job=t.job,
              data_request_time=t.request_time, data_response_time=t.response_time)

@rt
def submit():
    "Route that initiates a background task and returns immediately."
    request_time = int(time.time())
    job = task_submit.defer(request_time=request_time)         # (5)
    return (P(f'Request submitted at {hhmmss(request_time)}', data_request_time=request_time),
            Div(Li(JobStatus(job, live='sse', result=True)), hx_swap_oob='afterbegin:#jobs'),   # into the live list
            job)                                               # (6)

@rt
def show_tstamps(): return Ul(map(Row, tstamps()))            # (7)

@rt
def index():
    return Titled('Background Task Dashboard',
        P(Button('Press to call slow service',
                 hx_post=submit, hx_target='#res')),         # (8)
        H2('Responses from Tasks'),
        P('', id='res'),
        Div(Ul(map(Row, tstamps())),
            hx_get=show_tstamps, hx_trigger=f'every {POLL}'),  # (9) the seed's polling, kept
        H2('Your jobs'),
        JobEvents(Ul(id='jobs'), hub=tasks, result=True),      # one SSE stream for every job of this browser
    )

serve()
