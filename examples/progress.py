"""Send 200 emails with a live progress bar, ETA and a cancel button, pushed over Server-Sent Events (`/?live=ws`:
over a websocket). Everything the page needs from fh-tasks is served by the app itself (no CDN for our parts)."""
# FastHTML apps use its star import.
# ruff: noqa: F403, F405
import os
import time

from fasthtml.common import *

from fh_tasks import JobStatus, Tasks, current_job
from fh_tasks.ui import JobEvents, JobSocket, Notifications

app, rt = fast_app()
tasks = Tasks(app, db=os.environ.get('FH_TASKS_DB') or 'progress_jobs.db')
tasks.notify(sse=True)                               # a notification on the page's stream when a send ends
EMAILS = int(os.environ.get('EMAILS', '200'))
DELAY = float(os.environ.get('EMAIL_DELAY', '0.05'))   # seconds to "send" one email

@tasks.task(notify=True)
def send_emails(n: int) -> dict:
    job = current_job()
    for i in range(n):
        time.sleep(DELAY)                            # sending one email
        job.progress({'done': i + 1, 'total': n, 'message': f'{i + 1} of {n} sent'})   # cheap: coalesced
    return {'sent': n}

@rt
def send(live: str = 'sse'):
    job = send_emails.defer(EMAILS)
    return JobStatus(job, live='ws' if live == 'ws' else 'sse', cancel=True, result=True), job

@rt
def index(live: str = 'sse'):
    Live = JobSocket if live == 'ws' else JobEvents     # one stream (or socket) for every job on the page
    return Titled(f'Send {EMAILS} emails',
        P(Button(f'Send {EMAILS} emails', hx_post=send.to(live=live), hx_target='#jobs', hx_swap='afterbegin')),
        Live(Div(id='jobs'), Notifications(), hub=tasks, cancel=True, result=True),
        P(A('over SSE', href='/?live=sse'), ' · ', A('over a websocket', href='/?live=ws')))

serve()
