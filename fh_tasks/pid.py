"""This process's id without a system call: `os.getpid()` asks the kernel each time, and the job path checks it on
every store and broker call (a connection made before a fork must not be used after it). Kept up to date by
`os.register_at_fork`, so a forked child (a process pool's, Celery's prefork pool's) sees its own id."""
from __future__ import annotations

import os

__all__ = ["pid"]

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"): os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    "This process's id (`os.getpid()`, cached across calls and updated in a forked child)."
    return _pid
