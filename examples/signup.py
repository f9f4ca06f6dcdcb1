"""The signup example of FastHTML's "Background Tasks" page (several tasks per request), durable: in order with
`BackgroundTasks`, or independent jobs. Run `python examples/signup.py` and open
http://localhost:5001/signup?email=ada@example.com&username=ada (or /signup_independent?...)."""
# FastHTML apps use its star import, as FastHTML's documentation does.
# ruff: noqa: F403, F405
import asyncio
import os

from fasthtml.common import *

from fh_tasks import BackgroundTasks, Tasks

app, rt = fast_app()
tasks = Tasks(app, db=os.environ.get('FH_TASKS_DB') or 'signup.db')      # this example's own store file

@rt
async def signup(email: str, username: str):
    "The page's handler, unchanged: the jobs run in order, and a failure cancels the ones after it."
    tasks = BackgroundTasks()
    tasks.add_task(send_welcome_email, to_address=email)
    tasks.add_task(send_admin_notification, username=username)
    return Titled('Signup successful!'), tasks

@rt
async def signup_independent(email: str, username: str):
    "Separate jobs in the tuple: each runs (and fails) on its own."
    return (Titled('Signup successful!'),
            send_welcome_email.defer(to_address=email), send_admin_notification.defer(username=username))

@tasks.task
async def send_welcome_email(to_address: str):
    if '@' not in to_address: raise ValueError(f'cannot send a welcome email to {to_address!r}: not an email address')
    await asyncio.sleep(0.1)   # the mail server
    print(f'welcome email sent to {to_address}')
    return to_address

@tasks.task
async def send_admin_notification(username: str):
    await asyncio.sleep(0.1)
    print(f'admin notified of new user {username}')
    return username

serve()
