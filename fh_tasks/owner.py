"""Who deferred a job: an opaque random token kept in the deferring session (the app's session cookie, under
`OWNER_KEY`), stored with the job (`JobRecord.owner`). The hub's routes show a job only to the session holding its
token, unless the app gives `Tasks(access=...)`. Plain functions: no Starlette."""
from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["OWNER_KEY", "new_token", "session_owner", "same_owner", "ensure_owner"]

#: The session key holding the random token that identifies a session as the owner of the jobs it deferred.
OWNER_KEY = "fh_tasks_owner"


def new_token() -> str:
    "A fresh owner token: 24 random bytes, URL-safe."
    return secrets.token_urlsafe(24)


def session_owner(scope: Mapping[str, Any]) -> str | None:
    "The owner token a request's (or websocket's) session holds, if any; never makes one."
    sess = scope.get("session")
    token = sess.get(OWNER_KEY) if isinstance(sess, Mapping) else None
    return token if isinstance(token, str) and token else None


def ensure_owner(sess: MutableMapping[str, Any]) -> str:
    "The session's owner token, made and kept in it if it has none (or a malformed one)."
    token = sess.get(OWNER_KEY)
    if not isinstance(token, str) or len(token) < 16: token = sess[OWNER_KEY] = new_token()
    return token


def same_owner(a: str | None, b: str | None) -> bool:
    "True when both tokens are set and equal (compared in constant time)."
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())
