"""Log lines that stored text cannot forge: control characters (newlines included) are escaped.

A job's error message, task name or arguments come from the database and may hold newlines or terminal escape
sequences; logged raw, they could fake log lines or drive the terminal reading the log. `fh-tasks worker` formats
its log with `EscapingFormatter`; use it for your own handler in an app. `EscapingFilter` escapes each record
before any handler sees it, whatever the handler's formatter; a logger's filters apply only to the records logged
on that very logger (not on its children), so add it to the logger that logs:

    worker_log.addFilter(EscapingFilter())

For log shippers, `JsonFormatter` writes one JSON object per line (`fh-tasks worker --log-format json`): the time,
level, logger, message, process, and the record's extra fields; every worker line about a job has `job_id` and
`task`. JSON escapes control characters, so stored text cannot forge a line there either.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from typing import Any

from .encoding import storable_text

__all__ = ["escape", "EscapingFormatter", "EscapingFilter", "JsonFormatter"]

#: The attributes every `LogRecord` has; the others are the `extra=` fields a JSON line carries.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def escape(text: Any) -> str:
    "Printable text: every control character (newline, carriage return, ESC...) is written as its escape, `\\n`."
    s = str(text)
    if s.isprintable(): return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _block(text: str) -> str:
    "A traceback under its log line: each of its lines escaped and indented, so none can pass for a log line."
    return "\n".join("    " + escape(line) for line in text.splitlines())


class EscapingFormatter(logging.Formatter):
    "A `logging.Formatter` whose lines hold no raw control characters; a traceback follows, indented, line by line."

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime(): record.asctime = self.formatTime(record, self.datefmt)
        out = escape(self.formatMessage(record))
        if record.exc_info: out += "\n" + _block(self.formatException(record.exc_info))
        elif record.exc_text: out += "\n" + _block(record.exc_text)
        if record.stack_info: out += "\n" + _block(self.formatStack(record.stack_info))
        return out


class EscapingFilter(logging.Filter):
    "Escapes a record in place (message, traceback, stack) before handlers format it; never drops a record."

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = escape(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _block("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        if record.stack_info: record.stack_info = _block(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, `process`, the record's
    extra fields (`job_id`, `task`, `action`, `attempt`, `error_type`...), and `traceback` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {"time": t, "level": record.levelname, "logger": record.name,
                               "message": record.getMessage(), "process": record.process}
        out.update((k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info: out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text: out["traceback"] = record.exc_text
        if record.stack_info: out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def log_failed_attempt(log: logging.Logger, id: str, task: str, attempt: int, max_attempts: int, type_: str,
                       message: str, retry_in: float | None = None) -> None:
    """Every failed attempt, on every engine's workers, is this WARNING: the job's id and task, the attempt, the error
    type and message (cut to 500 characters), and when it runs again; the same as `extra` fields for JSON lines."""
    extra = {"action": "fail" if retry_in is None else "retry", "job_id": id, "task": task, "error_type": type_,
             "attempt": attempt}
    msg = storable_text(message if len(message) <= 500 else message[:497] + "...")
    if retry_in is None:
        log.warning("job %s (%s) failed after %s attempt(s): %s: %s", id, task, attempt, type_, msg, extra=extra)
    else:
        log.warning("job %s (%s) attempt %s/%s failed: %s: %s; retrying in %.2fs", id, task, attempt, max_attempts,
                    type_, msg, retry_in, extra=extra)
