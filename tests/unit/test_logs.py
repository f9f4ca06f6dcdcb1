"""Log lines that stored text cannot forge: control characters are escaped in the message and in tracebacks."""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

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


# -- JSON lines -------------------------------------------------------------------------------------

def test_json_lines_carry_the_records_fields_and_escape_what_they_hold(logger) -> None:
    import json

    from fh_tasks.logs import JsonFormatter
    log, out = logger
    log.handlers[0].setFormatter(JsonFormatter())
    log.warning("job %s (%s) failed: %s", "j1", "app:t", HOSTILE, extra={"job_id": "j1", "task": "app:t", "attempt": 2})
    fail(log)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the newlines of the message and of the traceback stay inside their JSON strings
    first, second = map(json.loads, lines)
    assert first["level"] == "WARNING" and first["logger"] == "fh_tasks.test_logs" and first["time"].endswith("Z")
    assert (first["job_id"], first["task"], first["attempt"]) == ("j1", "app:t", 2)
    assert first["message"] == f"job j1 (app:t) failed: {HOSTILE}"
    assert second["traceback"].startswith("Traceback") and "ValueError: boom" in second["traceback"]
    assert "\x1b" not in out.getvalue() and "args" not in first and "msg" not in first


def _job_log_calls(path: Path) -> list[tuple[int, set[str]]]:
    "Each logging call whose message starts with 'job %s', with the keys of its `extra` dict (resolved by name)."
    import ast
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)): continue
        dicts = {t.id: {k.value for k in a.value.keys if isinstance(k, ast.Constant)}
                 for a in ast.walk(fn) if isinstance(a, ast.Assign) and isinstance(a.value, ast.Dict)
                 for t in a.targets if isinstance(t, ast.Name)}
        for call in ast.walk(fn):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.args
                    and call.func.attr in ("debug", "info", "warning", "error", "exception", "critical")
                    and isinstance(call.args[0], ast.Constant) and str(call.args[0].value).startswith("job %s")):
                continue
            extra = next((k.value for k in call.keywords if k.arg == "extra"), None)
            keys = ({k.value for k in extra.keys if isinstance(k, ast.Constant)} if isinstance(extra, ast.Dict)
                    else dicts.get(extra.id, set()) if isinstance(extra, ast.Name) else set())
            found.append((call.lineno, keys))
    return found


@pytest.mark.parametrize("module", ["worker/loop.py", "worker/runs.py", "worker/upkeep.py", "store/sqlite.py",
                                    "engines/sqlite.py", "logs.py"])
def test_every_worker_log_line_about_a_job_carries_its_id_and_task(module: str) -> None:
    # Given the logging calls of the embedded engine's worker and store that speak of one job
    calls = _job_log_calls(Path(__file__).resolve().parents[2] / "fh_tasks" / module)
    # Then each passes the job's id and task as `extra` fields (JSON log lines carry them)
    missing = [line for line, keys in calls if not {"job_id", "task"} <= keys]
    assert missing == [], f"fh_tasks/{module}: lines {missing} log a job without extra job_id and task"
