"""The simulated slow service of FastHTML's "Background Task Dashboard" example: answers after SLOW_API_DELAY seconds
(default 3) on port 8123 (SLOW_API_PORT)."""
# FastHTML apps use its star import, as FastHTML's documentation does.
# ruff: noqa: F403, F405
import os
from time import sleep, time

from fasthtml.common import *

app, rt = fast_app()
DELAY = float(os.environ.get('SLOW_API_DELAY', '3'))

@rt('/slow')
def slow(ts: int):
    sleep(DELAY)                                               # (1) slow processing
    return dict(request_time=ts, response_time=int(time()))   # (2)

serve(port=int(os.environ.get('SLOW_API_PORT', '8123')))
