"""Notifications when a job ends, opt-in per task: `tasks.notify(...)` then `@tasks.task(notify=True)`.

- `toast`: a FastHTML toast for the session that deferred the job, shown with its next page or htmx response
  (the ids it waits for live in its session; a `before` function checks them, and FastHTML's toasts render them).
- `sse`: an `fh-tasks-notify` event on the session's `JobEvents()` stream (and a message on its `JobSocket()`):
  `Notifications()` inside the container shows them.
- `webhook`: a JSON POST to a URL, signed with HMAC-SHA256 over `{timestamp}.{body}` (`X-FhTasks-Signature:
  sha256=<hex>`, `X-FhTasks-Timestamp`), delivered as a job of its own (`fh_tasks:webhook`) with retries and backoff.
  Each delivery has a stable id (`X-FhTasks-Delivery`, the same on every attempt): a receiver checks the signature and
  the timestamp with `verify_signature(...)` and drops ids it has seen, so a replayed request is refused.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fasthtml.common import Div
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..hooks import Hook
from .status import LABELS, _cut

if TYPE_CHECKING:
    from ..events import JobEvent
    from ..hub import Tasks
    from ..records import JobRecord, NewJob
    from ..task import Task

__all__ = ["Notify", "Notifications", "notification", "sign", "verify_signature", "WEBHOOK_TASK", "NOTES_ID"]

log = logging.getLogger("fh_tasks.notify")

#: The task that delivers webhooks.
WEBHOOK_TASK = "fh_tasks:webhook"
#: The session key listing the jobs whose end the session waits to be toasted.
WATCH_KEY = "fh_tasks_watch"
#: Jobs one session waits for at most (the oldest are dropped).
MAX_WATCHED = 20
#: The id of the element live notifications are added to.
NOTES_ID = "fh-tasks-notifications"
SIGNATURE, TIMESTAMP, DELIVERY = "X-FhTasks-Signature", "X-FhTasks-Timestamp", "X-FhTasks-Delivery"
_NS = uuid.UUID("5b7c1f0e-61a4-4f0b-9d8e-1c2a3b4c5d6e")
_TOAST = {"succeeded": "success", "failed": "error", "cancelled": "warning"}


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    "The signature header's value: `sha256=` and the hex HMAC-SHA256 of `{timestamp}.{body}`."
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, headers: Mapping[str, str], *, tolerance: float = 300.0,
                     now: float | None = None) -> bool:
    """True when `headers` carry a valid signature of `body` made less than `tolerance` seconds ago (either way).
    A receiver should also refuse a `X-FhTasks-Delivery` id it has already processed."""
    h = {k.lower(): v for k, v in headers.items()}
    ts, sig = h.get(TIMESTAMP.lower(), ""), h.get(SIGNATURE.lower(), "")
    if not ts.isdigit() or not sig: return False
    if abs((time.time() if now is None else now) - int(ts)) > tolerance: return False
    return hmac.compare_digest(sign(secret, int(ts), body), sig)


def _message(rec: JobRecord) -> str:
    name = rec.task.rsplit(":", 1)[-1]
    text = f"{name}: {LABELS.get(rec.state.value, rec.state_text).lower()}"
    if rec.state.value == "failed" and rec.error: text += f" ({rec.error.get('type')}: {rec.error.get('message')})"
    return _cut(text, 300)


class Notify(Hook):
    "The notifications hook; see the module docstring. Made and added by `tasks.notify(...)`."

    options = {"notify": bool}

    def __init__(self, hub: Tasks, *, toast: bool = False, sse: bool = True, webhook: str | None = None,
                 secret: str | None = None, retries: int = 5, retry_delay: float = 2.0, timeout: float = 10.0,
                 message: Callable[[JobRecord], str] = _message) -> None:
        if webhook is not None:
            if not webhook.startswith(("http://", "https://")): raise ValueError("webhook must be an http(s) URL")
            if not secret: raise ValueError("a webhook needs a secret= to sign its requests")
        self.hub, self.toast, self.sse, self.url, self.secret = hub, toast, sse, webhook, secret
        self.timeout, self.message = timeout, message
        if webhook is not None:
            hub.task(name=WEBHOOK_TASK, retries=retries, retry_delay=retry_delay, timeout=timeout + 5)(self.deliver)

    def wants(self, task: str) -> bool:
        t = self.hub.registry.get(task)
        return bool(t is not None and t.option("notify"))

    # -- (a) toasts --------------------------------------------------------------------------------
    def before_enqueue(self, job: NewJob, task: Task[Any, Any]) -> None:
        if not self.toast or not task.option("notify"): return
        sess = self.hub.request_session()
        if sess is None: return
        watched = [i for i in sess.get(WATCH_KEY, []) if isinstance(i, str)][-(MAX_WATCHED - 1):]
        sess[WATCH_KEY] = [*watched, job.id]

    async def before_request(self, req: Any) -> None:
        "The app's `before` function: toast the session's watched jobs that have ended (read in a thread)."
        sess = req.scope.get("session")
        if not isinstance(sess, dict) or not sess.get(WATCH_KEY): return
        ids = [i for i in sess[WATCH_KEY] if isinstance(i, str)]
        recs = await run_in_threadpool(lambda: [(i, self.hub.summary(i)) for i in ids])
        from fasthtml.toaster import add_toast
        left = []
        for i, rec in recs:
            if rec is None: continue
            if not rec.done: left.append(i)
            elif self.hub.visible(req, rec): add_toast(sess, self.message(rec), _TOAST.get(rec.state.value, "info"))
        sess[WATCH_KEY] = left

    def install(self, app: Any) -> None:
        "Toasts on a FastHTML app: FastHTML's toasts (set up unless they are) and the `before` function."
        if not (self.toast and hasattr(app, "before")): return
        if getattr(app.state, "toast_duration", None) is None:
            from fasthtml.toaster import setup_toasts
            setup_toasts(app)
        before = self.before_request

        async def fh_tasks_toasts(req: Request) -> None: await before(req)  # FastHTML injects `req` by its type
        app.before.append(fh_tasks_toasts)

    # -- (c) webhooks ------------------------------------------------------------------------------
    def on_event(self, event: JobEvent) -> None:
        if self.url is None or not event.final or event.task == WEBHOOK_TASK or not self.wants(event.task): return
        # Every process with subscribers sees the event: the delivery's id is the same in each, so one is stored.
        did = uuid.uuid5(_NS, f"{event.id}\n{self.url}").hex
        if self.hub.summary(did) is not None: return
        task = self.hub.registry[WEBHOOK_TASK]
        payload = {"id": event.id, "task": event.task, "state": event.state, "attempt": event.attempt,
                   "at": event.at}
        new = task.new_job((did, payload), {}, task.options)
        new.id = did
        try: self.hub.enqueue(new, task)
        except Exception:
            if self.hub.summary(did) is None: log.exception("could not store the webhook of job %s", event.id)

    def deliver(self, delivery: str, payload: dict[str, Any]) -> int:
        "The webhook task: POST the signed payload (with the job's error, read now); raises (so retries) unless 2xx."
        assert self.url is not None and self.secret is not None
        rec = self.hub.summary(str(payload.get("id")))
        if rec is not None and rec.error: payload = {**payload, "error": rec.error}
        body = json.dumps({"delivery": delivery, **payload}, separators=(",", ":")).encode()
        ts = int(time.time())
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "fh-tasks", DELIVERY: delivery, TIMESTAMP: str(ts),
            SIGNATURE: sign(self.secret, ts, body)})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 (http(s) only, checked above)
            return int(r.status)


def notification(hub: Tasks, rec: JobRecord, oob: bool = False) -> Any:
    "The live notification of a job that ended (None unless `Notify(sse=True)` and the task opted in)."
    hook = next((h for h in hub.hooks if isinstance(h, Notify)), None)
    if hook is None or not hook.sse or not hook.wants(rec.task): return None
    typ = _TOAST.get(rec.state.value, "info")
    note = Div(hook.message(rec), cls=f"fh-tasks-note fh-tasks-note-{typ}", role="status", data_job=rec.id,
               data_state=rec.state.value)
    return Div(note, id=NOTES_ID, hx_swap_oob="beforeend") if oob else note


def Notifications(**kw: Any) -> Any:
    "Where live notifications appear: put it inside a `JobEvents()` (SSE) or `JobSocket()` (websocket) container."
    return Div(id=NOTES_ID, sse_swap="fh-tasks-notify", hx_swap="beforeend", cls="fh-tasks-notifications",
               aria_live="polite", **kw)
