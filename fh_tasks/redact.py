"""Redaction of secret-looking values before a job's data is shown (`fh-tasks show`, dashboards).

    redact({"user": "ada", "apiKey": "sk-1", "db": "postgres://ada:pw@host/x"})
    # {'user': 'ada', 'apiKey': '[redacted]', 'db': 'postgres://ada:[redacted]@host/x'}

A value is replaced when its key names a secret (password, token, api_key, signing_key, pin, otp, cvv, card
number..., matched by word part, in any case and naming style, at any depth), and secrets inside any string are
masked: a card number (13 to 19 digits passing the Luhn check), the password in `scheme://user:password@host`,
`name=value` and `"name": value` pairs with a secret's name (query strings, reprs, JSON), and `Bearer`/`Basic`
credentials. Redaction is for showing data: the store keeps it
in plain text.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["redact", "redact_text", "is_secret_key", "REDACTED", "MAX_DEPTH"]

REDACTED = "[redacted]"
#: Values nested deeper than this are shown as `TOO_DEEP`, so that no stored value can exhaust the stack.
MAX_DEPTH = 100
TOO_DEEP = "[nested too deep]"

#: One word part of a key that names a secret (parts are split at `_`, `-`, `.`, spaces, digits and camelCase).
_SECRET_PART = re.compile(r"""
    (db|user|admin|root|login|master)?pass(word|wd|phrase|code)?s? | pwd | passwords |
    (client|api|app|shared|webhook)?secrets? |
    (access|refresh|id|auth|api|session|csrf|xsrf|bearer|oauth|reset)?tokens? |
    (api|access|private|secret|signing|session|master|encryption|auth|license|ssh|gpg|pgp)?keys? | apikeys? |
    o?auth | authori[sz]ation | authentication | credentials? | creds? | cookies? | sessions? | session(id|key) |
    sessid | pins? | pincode | otp | [th]otp | jwts? | bearer |
    cvv2? | cvc2? | csc | ccnum(ber)? | cardnumber | creditcard | pan
    """, re.X)
#: Adjacent word parts that together name a secret.
_SECRET_PAIRS = {("card", "number"), ("card", "num"), ("card", "no"), ("cc", "number"), ("cc", "num"), ("cc", "no"),
                 ("credit", "card"), ("pass", "word"), ("pass", "phrase"), ("pass", "code"), ("pin", "code"),
                 ("security", "code"), ("account", "number")}
_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+")

_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/:@?#]*):[^\s/?#]*@")
#: `name=value` (query strings, form data, keyword arguments in a repr) and `"name": value` (JSON, dict reprs).
_ASSIGNED = re.compile(r"(?<![\w.\-])([A-Za-z][\w.\-]*)(\s*=\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&'\")\]}]+)")
_QUOTED = re.compile(r"([\"'])([^\"'\n]{1,100})\1(\s*:\s*)(\"[^\"]*\"|'[^']*'|-?\d[\d .\-]*\d|\d)")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]{3,}=*|\b(Basic)\s+[A-Za-z0-9+/]{8,}={0,2}")
_CARD = re.compile(r"(?<![0-9A-Za-z])\d(?:[ -]?\d){12,18}(?![0-9A-Za-z])")


def is_secret_key(key: Any) -> bool:
    "True when a key (or parameter name) names a secret: `password`, `apiKey`, `X-Auth-Token`, `card_number`..."
    parts = [p.lower() for p in _PARTS.findall(str(key))]
    if any(_SECRET_PART.fullmatch(p) for p in parts): return True
    return any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:], strict=False))


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", m.group(0))
    return REDACTED if 13 <= len(digits) <= 19 and _luhn(digits) else m.group(0)


def _masked(value: str) -> str:
    "REDACTED, in the quotes `value` had."
    return f"{value[0]}{REDACTED}{value[0]}" if value[:1] in ("'", '"') else REDACTED


def _assigned(m: re.Match[str]) -> str:
    return f"{m.group(1)}{m.group(2)}{_masked(m.group(3))}" if is_secret_key(m.group(1)) else m.group(0)


def _quoted(m: re.Match[str]) -> str:
    q, name, sep, value = m.groups()
    return f"{q}{name}{q}{sep}{_masked(value)}" if is_secret_key(name) else m.group(0)


def _scheme(m: re.Match[str]) -> str:
    return f"{m.group(1) or m.group(2)} {REDACTED}"


def redact_text(text: str) -> str:
    """`text` with the secrets inside it masked: URL passwords, `name=value` and `"name": value` pairs whose name is a
    secret's, bearer tokens, and card numbers."""
    if not text: return text
    if "://" in text: text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)
    text = _AUTH_SCHEME.sub(_scheme, text)
    if "=" in text: text = _ASSIGNED.sub(_assigned, text)
    if ":" in text and ("'" in text or '"' in text): text = _QUOTED.sub(_quoted, text)
    return _CARD.sub(_card, text)


def redact(value: Any, key: Any = "", _depth: int = 0) -> Any:
    """A copy of `value` (JSON-like: dicts, lists, strings, numbers) with secrets replaced by `REDACTED`: the value of
    every secret-named key, at any depth, and the secrets inside strings (`redact_text`)."""
    if key and is_secret_key(key): return REDACTED
    if _depth >= MAX_DEPTH and isinstance(value, (dict, list, tuple)): return TOO_DEEP
    if isinstance(value, dict): return {k: redact(v, k, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)): return [redact(v, "", _depth + 1) for v in value]
    if isinstance(value, str): return redact_text(value)
    return value
