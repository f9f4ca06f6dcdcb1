"""Log lines that stored text cannot forge: control characters (newlines included) are escaped.

A job's error message, task name or arguments come from the database and may hold newlines or terminal escape
sequences; logged raw, they could fake log lines or drive the terminal reading the log. `fh-tasks worker` formats
its log with `EscapingFormatter`; use it for your own handler in an app. `EscapingFilter` escapes each record
before any handler sees it, whatever the handler's formatter; a logger's filters apply only to the records logged
on that very logger (not on its children), so add it to the logger that logs:

    worker_log.addFilter(EscapingFilter())
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

__all__ = ["escape", "EscapingFormatter", "EscapingFilter"]


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
