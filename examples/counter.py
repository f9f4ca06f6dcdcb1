"""The simple example of FastHTML's "Background Tasks" page, on fh-tasks: the page appears at once while a durable job
slowly counts in the terminal. Run `python examples/counter.py` and open http://localhost:5001/."""
# FastHTML apps use its star import, as FastHTML's documentation does.
# ruff: noqa: F403, F405
import os
from time import sleep

from fasthtml.common import *

from fh_tasks import Tasks

app, rt = fast_app()
tasks = Tasks(app, db=os.environ.get('FH_TASKS_DB') or 'counter.db')      # this example's own store file

@tasks.task                                             # (1) registered, so it can be stored and run later
def counter(loops: int):
    "Slowly print integers to the terminal"
    for i in range(loops):
        print(i)
        sleep(i)

@rt
def index():
    return Titled('Simple Background Task Example'), counter.defer(loops=5)   # (2) stored before the page is sent

serve()
