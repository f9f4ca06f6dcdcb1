"""Log lines that stored text cannot forge: control characters are escaped in the message and in tracebacks."""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from fh_tasks.logs import EscapingFilter, EscapingFormatter, escape

HOSTILE = "boom\n2026-01-01 00:00:00 INFO    [1] fh_tasks.worker: job forged succeeded\r\x1b[2J\x07"


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    log = logging.getLogger("fh_tasks.test_logs")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, out
    log.removeHandler(handler)
    log.filters.clear()
    log.propagate = True


def check(text: str) -> None:
    "No control character but the newlines between lines, and every line after the first indented."
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    first, *rest = text.rstrip("\n").split("\n")
    assert first.startswith("job j1 failed: boom\\n2026-01-01") and "\\x1b[2J\\x07" in first
    assert all(line.startswith("    ") for line in rest)
    assert not any(line.startswith("2026") for line in text.split("\n"))


def fail(log: logging.Logger) -> None:
    try: raise ValueError(HOSTILE)
    except ValueError: log.exception("job %s failed: %s", "j1", HOSTILE)


def test_the_formatter_escapes_the_message_and_indents_the_traceback(logger) -> None:
    log, out = logger
    log.handlers[0].setFormatter(EscapingFormatter("%(message)s"))
    fail(log)
    text = out.getvalue()
    check(text)
    assert "\n    Traceback (most recent call last):\n" in text and "\n    ValueError: boom\n    2026-01-01" in text


def test_the_filter_escapes_records_for_any_handler(logger) -> None:
    # Given a logger with the filter and a handler with a plain formatter (as an app's would be)
    log, out = logger
    log.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    log.addFilter(EscapingFilter())
    fail(log)
    check(out.getvalue())


def test_escape_keeps_printable_text() -> None:
    assert escape("héllo wörld ✓") == "héllo wörld ✓"
    assert escape("a\tb\nc\x1b") == "a\\tb\\nc\\x1b"
