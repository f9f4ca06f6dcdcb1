"""The `fh-tasks` command: run workers beside a web app, and look after the jobs in a store.

    fh-tasks worker myapp:tasks --processes 2 --concurrency 8
    fh-tasks ls --state failed          fh-tasks show ID        fh-tasks retry --failed
    fh-tasks cancel ID                  fh-tasks purge --older-than 7d
    fh-tasks stats                      fh-tasks wait --timeout 60
    fh-tasks backup backups/jobs.db     fh-tasks worker myapp:tasks --burst --log-format json

Every option can also come from an `FH_TASKS_*` environment variable (named in `--help`); flags win.
This module parses the command line; `workers.py` runs workers (and their supervisor), `jobs.py` holds the
commands on stored jobs, `target.py` finds the hub and store, `values.py` checks option values and cleans output.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..errors import StoreError
from ..hub import DEFAULT_DB
from ..records import JobState
from ..redact import redact
from . import jobs, values
from .target import load_target
from .values import CliError, arg, parse_duration
from .workers import BURST_WINDOW, cmd_worker

__all__ = ["main", "build_parser", "load_target", "redact", "parse_duration", "CliError"]

#: Environment variables mirrored by flags: (flag dest, variable).
ENV = {"app": "FH_TASKS_APP", "db": "FH_TASKS_DB", "processes": "FH_TASKS_PROCESSES",
       "concurrency": "FH_TASKS_CONCURRENCY", "queues": "FH_TASKS_QUEUES", "log_level": "FH_TASKS_LOG_LEVEL",
       "grace": "FH_TASKS_GRACE", "lease": "FH_TASKS_LEASE", "log_format": "FH_TASKS_LOG_FORMAT",
       "strict_queues": "FH_TASKS_STRICT_QUEUES"}
_CONVERT: dict[str, Callable[[str], Any]] = {
    "processes": values.whole(1, 256), "concurrency": values.whole(1, 100_000), "queues": values.queues,
    "grace": parse_duration, "lease": values.seconds, "log_level": values.level, "log_format": values.log_format,
    "strict_queues": values.flag}
_WORKER_OPTIONS = (
    ("processes", "N", "worker processes (default 1)"),
    ("concurrency", "N", "jobs each process runs at once (default: the hub's)"),
    ("queues", "LIST", "comma-separated queues to serve, taken together in due order; with weights "
                       "(high=3,default=1) each claim draws their order (default: the hub's)"),
    ("grace", "SECONDS", "time running jobs get to finish when stopping: seconds, or like 2m (default: the hub's)"),
    ("lease", "SECONDS", "time before a silent worker's jobs are taken back: seconds, or like 2m (default: the "
                         "hub's)"),
    ("log_level", "LEVEL", "debug, info, warning or error (default info)"),
    ("log_format", "FORMAT", "text, or json: one JSON object per line, with job_id and task (default text)"))


def _env_help(dest: str, text: str) -> str:
    return f"{text} [env {ENV[dest]}]"


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", help=_env_help("db", f"SQLite job store (default ./{DEFAULT_DB})"))
    p.add_argument("--app", metavar="MODULE:ATTR", help=_env_help("app", "the app's Tasks hub; its store is used"))


def build_parser() -> argparse.ArgumentParser:
    "The argument parser of `fh-tasks`."
    p = argparse.ArgumentParser(prog="fh-tasks", description="Workers and job management for fh-tasks.",
                                epilog="Environment variables give defaults; flags win.")
    p.add_argument("--version", action="version", version=f"fh-tasks {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser("worker", help="run workers", description=cmd_worker.__doc__)
    w.add_argument("app", nargs="?", metavar="MODULE:ATTR",
                   help=_env_help("app", "the Tasks hub (or the app it is bound to)"))
    for dest, metavar, text in _WORKER_OPTIONS:
        w.add_argument(f"--{dest.replace('_', '-')}", type=arg(_CONVERT[dest]), metavar=metavar,
                       help=_env_help(dest, text))
    w.add_argument("--db", metavar="PATH", help=_env_help("db", "use this SQLite file instead of the hub's"))
    w.add_argument("--strict-queues", action="store_true", default=None,
                   help=_env_help("strict_queues", "take the queues in the order given: all due jobs of a queue "
                                                   "before any of the next"))
    w.add_argument("--burst", action="store_true",
                   help=f"stop once nothing is queued, running or due within {BURST_WINDOW:g}s; exit code 0: no job "
                        "failed, 1: some job failed")
    w.set_defaults(func=cmd_worker)
    _add_commands(sub)
    return p


def _add_commands(sub: Any) -> None:
    ls = sub.add_parser("ls", help="list jobs", description=jobs.cmd_ls.__doc__)
    ls.add_argument("--state", choices=[s.value for s in JobState])
    ls.add_argument("--task", help="only jobs of this task (its stored name)")
    ls.add_argument("--limit", type=arg(values.positive_int), default=50, help="at most this many (default 50)")
    show = sub.add_parser("show", help="show one job", description=jobs.cmd_show.__doc__)
    show.add_argument("id")
    retry = sub.add_parser("retry", help="requeue a failed job, or all of them", description=jobs.cmd_retry.__doc__)
    retry.add_argument("id", nargs="?")
    retry.add_argument("--failed", action="store_true", help="requeue every failed job")
    cancel = sub.add_parser("cancel", help="cancel a job that has not started", description=jobs.cmd_cancel.__doc__)
    cancel.add_argument("id")
    purge = sub.add_parser("purge", help="delete old finished jobs", description=jobs.cmd_purge.__doc__)
    purge.add_argument("--older-than", required=True, type=arg(values.age), metavar="AGE",
                       help="with its unit: 12h, 7d, 2w (a bare number is refused)")
    stats = sub.add_parser("stats", help="jobs per state and throughput", description=jobs.cmd_stats.__doc__)
    wait = sub.add_parser("wait", help="wait for the queue to drain", description=jobs.cmd_wait.__doc__)
    wait.add_argument("--timeout", type=arg(values.seconds),
                      help="give up (exit 1) after this long: seconds, or like 5m")
    wait.add_argument("--interval", type=arg(values.seconds), default=0.2, help=argparse.SUPPRESS)
    backup = sub.add_parser("backup", help="copy the job store, safely, while it is in use",
                            description=jobs.cmd_backup.__doc__)
    backup.add_argument("dest", metavar="DEST", help="the file to write (or a directory to write it in)")
    backup.add_argument("--force", action="store_true", help="replace DEST if it exists")
    cron = sub.add_parser("cron", help="list periodic tasks and their next runs", description=jobs.cmd_cron.__doc__)
    cron.add_argument("target", nargs="?", metavar="MODULE:ATTR",
                      help=_env_help("app", "the Tasks hub (or the app it is bound to)"))
    cron.add_argument("--next", type=arg(values.whole(1, 100)), default=3, metavar="N",
                      help="show the next N runs of each (default 3)")
    for name, sp in (("ls", ls), ("show", show), ("retry", retry), ("cancel", cancel), ("purge", purge),
                     ("stats", stats), ("wait", wait), ("backup", backup), ("cron", cron)):
        _store_options(sp)
        sp.set_defaults(func=getattr(jobs, f"cmd_{name}"))


def _apply_env(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    "Fill options not given on the command line from FH_TASKS_* variables; a bad value names its variable."
    for dest, var in ENV.items():
        if getattr(args, dest, "absent") is not None or not (raw := os.environ.get(var, "")): continue
        try: setattr(args, dest, _CONVERT.get(dest, str)(raw))
        except ValueError as e: parser.error(f"{var}: {e}")
    if getattr(args, "command", None) == "worker":
        args.processes = args.processes or 1
        args.log_level = args.log_level or "INFO"
        args.log_format = args.log_format or "text"


def main(argv: Sequence[str] | None = None) -> int:
    "Entry point of the `fh-tasks` console script."
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_env(args, parser)
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # here, so that a closed pipe is handled below rather than at exit
        return rc
    except (CliError, StoreError) as e:
        print(f"fh-tasks: error: {values.clean(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`fh-tasks ls | head`): stop quietly, as Unix tools do on SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130
