"""The `fh-tasks` command: run workers beside a web app, and look after the jobs in a store.

    fh-tasks worker myapp:tasks --processes 2 --concurrency 8
    fh-tasks ls --state failed          fh-tasks show ID        fh-tasks retry --failed
    fh-tasks cancel ID                  fh-tasks purge --older-than 7d
    fh-tasks stats                      fh-tasks wait --timeout 60
    fh-tasks backup backups/jobs.db     fh-tasks worker myapp:tasks --burst --log-format json

Every option can also come from an `FH_TASKS_*` environment variable (named in `--help`); flags win.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import StoreError, Unsupported
from .hub import DEFAULT_DB, Tasks
from .logs import EscapingFormatter, JsonFormatter, escape
from .records import JobRecord, JobState, QueueOrder
from .redact import REDACTED, is_secret_key, redact, redact_text

if TYPE_CHECKING:
    from .store.sqlite import SQLiteStore

__all__ = ["main", "load_target", "redact", "parse_duration"]

log = logging.getLogger("fh_tasks.cli")

#: Environment variables mirrored by flags: (flag dest, variable).
ENV = {"app": "FH_TASKS_APP", "db": "FH_TASKS_DB", "processes": "FH_TASKS_PROCESSES",
       "concurrency": "FH_TASKS_CONCURRENCY", "queues": "FH_TASKS_QUEUES", "log_level": "FH_TASKS_LOG_LEVEL",
       "grace": "FH_TASKS_GRACE", "lease": "FH_TASKS_LEASE", "log_format": "FH_TASKS_LOG_FORMAT",
       "strict_queues": "FH_TASKS_STRICT_QUEUES"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PENDING = ("queued", "running", "retrying", "waiting")
#: Longest duration any option takes (100 years): more is a typo, and would overflow timers.
MAX_DURATION = 100 * 365 * 86400.0
#: Commands that only read the store: they open it read-only, so they can never change it.
READ_ONLY = ("ls", "show", "stats", "wait", "backup", "cron")
#: `show` cuts each field at this many characters, and a traceback at this many lines.
SHOW_CHARS, SHOW_LINES = 4000, 200
#: Supervisor: a worker process that dies is restarted after a delay that doubles from the first to the second
#: figure while it keeps dying, and starts over once a worker has stayed up for `STABLE` seconds.
BACKOFF, STABLE = (0.5, 30.0), 60.0
#: `worker --burst` waits for a job due within this many seconds (a short retry backoff) before it exits.
BURST_WINDOW = 5.0


class CliError(Exception):
    """A mistake in how the command was called; printed without a traceback."""


# -- values ----------------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    "Seconds in `30s`, `15m`, `12h`, `7d`, `2w` (a bare number is seconds), at most 100 years."
    m = re.fullmatch(r"\s*([0-9]{1,12}(?:\.[0-9]{1,9})?)\s*([smhdw]?)\s*", text)
    if not m: raise ValueError(f"{text!r} is not a duration like 30s, 15m, 12h, 7d or 2w")
    v = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if v > MAX_DURATION: raise ValueError(f"{text!r} is longer than 100 years")
    return v


def _age(text: str) -> float:
    "A duration with its unit: a bare number is refused, so that `3` cannot mean 3 seconds where 3 days was meant."
    if re.fullmatch(r"\s*[0-9]+(?:\.[0-9]+)?\s*", text):
        raise ValueError(f"{text!r} has no unit: write it like {text.strip()}d (s, m, h, d or w)")
    return parse_duration(text)


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    "A converter of whole numbers from `lo` to `hi`."
    def whole(text: str) -> int:
        if not re.fullmatch(r"\s*[0-9]{1,12}\s*", text) or not lo <= int(text) <= hi:
            raise ValueError(f"{text!r} is not a whole number from {lo} to {hi}")
        return int(text)
    return whole


_positive_int = _whole(1, 10**6)


def _seconds(text: str) -> float:
    v = parse_duration(text)
    if v <= 0: raise ValueError(f"{text!r} must be more than 0 seconds")
    return v


def _queues(text: str) -> QueueOrder:
    "`high,default` (merged in due order) or `high=3,default=1` (weighted): see `QueueOrder`."
    return QueueOrder.of(text)


def _flag(text: str) -> bool:
    if text.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{text!r} is not 1/true/yes/on or 0/false/no/off")
    return text.strip().lower() in ("1", "true", "yes", "on")


def _level(text: str) -> str:
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"{text!r} is not one of debug, info, warning, error")
    return text.upper()


def _log_format(text: str) -> str:
    if text.lower() not in ("text", "json"): raise ValueError(f"{text!r} is not text or json")
    return text.lower()


def _arg(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    "An argparse type whose error message says why the value is wrong."
    def convert(text: str) -> Any:
        try: return conv(text)
        except ValueError as e: raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = conv.__name__.strip("_")
    return convert


def _clean(text: Any, width: int | None = None) -> str:
    "Printable text: control characters from stored data are escaped so they cannot drive the terminal."
    s = escape(text)
    return s if width is None or len(s) <= width else s[: max(1, width - 1)] + "…"


def _cut(text: str, limit: int = SHOW_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], widths: Sequence[int | None] = ()) -> str:
    "Rows aligned under their headers; cells are cleaned and cut to `widths`."
    cells = [[_clean(c, widths[i] if i < len(widths) else None) for i, c in enumerate(r)] for r in rows]
    cols = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(cols[i]) for i, c in enumerate(r)).rstrip()
    return "\n".join([line(headers), line(["-" * n for n in cols]), *map(line, cells)])


# -- loading the app -------------------------------------------------------------------------------
def load_target(spec: str) -> Tasks:
    "The `Tasks` hub named by `module:attr` (a hub, or an app a hub is bound to; `module` alone: its one hub)."
    mod_name, _, attr = spec.partition(":")
    if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        module = re.sub(r"\.py$", "", mod_name).replace("\\", "/")
        module = ".".join(p for p in module.split("/") if p not in ("", "."))
        raise CliError(f"{spec!r} names a file; name its module instead: {module}{':' + attr if attr else ''} "
                       "(from the folder its path starts in)")
    if not mod_name or not re.fullmatch(r"[\w.]+", mod_name):
        raise CliError(f"{spec!r} is not module:attribute (for example myapp:tasks)")
    if os.getcwd() not in sys.path: sys.path.insert(0, os.getcwd())  # like `python -m`, find the project's modules
    try: mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (mod_name == e.name or mod_name.startswith(e.name + ".")): raise
        raise CliError(f"cannot import {mod_name!r}: no such module "
                       "(run from the project directory or set PYTHONPATH)") from None
    hubs = [v for v in vars(mod).values() if isinstance(v, Tasks)]
    if not attr:
        if len(hubs) == 1: return hubs[0]
        raise CliError(f"{mod_name} defines {len(hubs)} Tasks hubs; name one: {mod_name}:tasks")
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part): raise CliError(f"{mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Tasks): return obj
    bound = [h for h in hubs if h.app is obj]
    if len(bound) == 1: return bound[0]
    raise CliError(f"{spec} is a {type(obj).__name__}, not a Tasks hub, and no hub in {mod_name} is bound to it; "
                   f"point at the hub instead (for example {mod_name}:tasks)")


def _hub(args: argparse.Namespace) -> Tasks:
    """The hub to inspect: from --app (its registry and store), else the store file --db. The store must exist
    already; `ls`, `show`, `stats` and `wait` open it read-only."""
    from .store.sqlite import SQLiteStore
    readonly = args.command in READ_ONLY
    if args.app:
        hub = load_target(args.app)
        if args.db: _use_db(hub, args.db, readonly=readonly, create=False)
        elif (store := _sqlite(hub)) is not None and not store.memory:
            _use_db(hub, store.path, readonly=readonly, create=False)
        return hub
    path = args.db or DEFAULT_DB
    if not os.path.exists(path):
        raise CliError(f"no job store at {path}; pass --db PATH or --app module:attr (or set FH_TASKS_DB)")
    return Tasks(store=SQLiteStore(path, readonly=readonly, create=False), workers=0, retention=None)


def _sqlite(hub: Tasks) -> SQLiteStore | None:
    "The hub's SQLite store, or None on another engine."
    from .engines.sqlite import SQLiteEngine
    return hub.engine.store if isinstance(hub.engine, SQLiteEngine) else None


def _use_db(hub: Tasks, path: str, *, readonly: bool = False, create: bool = True) -> None:
    "Point the hub's SQLite engine at the store file `path` (`--db`)."
    from .engines.sqlite import SQLiteEngine
    from .store.sqlite import SQLiteStore
    if not isinstance(hub.engine, SQLiteEngine):
        raise CliError(f"--db names a SQLite store, but {hub.engine.name!r} is this hub's engine")
    hub.engine.use_store(SQLiteStore(path, durability=hub.settings.durability, readonly=readonly, create=create))


# -- worker ----------------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    "Run workers until SIGTERM/SIGINT (a second signal gives running jobs back at once)."
    if not args.app: raise CliError("name the app's hub: fh-tasks worker module:attr (or set FH_TASKS_APP)")
    _logging(args.log_level, args.log_format)
    hub = load_target(args.app)
    if args.db: _use_db(hub, args.db)
    try:  # opens the store now: a missing directory or read-only file fails here, clearly
        if (store := _sqlite(hub)) is not None: store.expire()
    except StoreError as e: raise CliError(str(e)) from None
    queues = args.queues
    if args.strict_queues:
        try: queues = QueueOrder.of(queues or hub.queue_order, strict=True)
        except ValueError as e: raise CliError(f"--strict-queues: {e}") from None
    if isinstance(queues, QueueOrder) and queues.mode != "merged":
        try: hub.engine.capabilities.require("queue_order", hub.engine.name, f"take queues by {queues.mode} order")
        except Unsupported as e: raise CliError(str(e)) from None
    elif isinstance(queues, QueueOrder): queues = queues.names  # plain names: what every engine's worker takes
    if args.processes > 1: return _supervise(args)
    opts: dict[str, Any] = {k: v for k, v in (("concurrency", args.concurrency), ("queues", queues),
                                             ("grace", args.grace), ("lease", args.lease)) if v is not None}
    if args.burst: return asyncio.run(_burst(hub, opts))
    w = hub.worker(**opts)
    _started(w)
    asyncio.run(_run_worker(w))
    log.info("worker %s stopped after %d job(s)", w.id, w.processed)
    return 0


def _started(w: Any) -> None:
    log.info("worker %s serving queue(s) %s with concurrency %d (lease %gs, grace %gs)", w.id, ",".join(w.queues),
             w.concurrency, w.lease, w.grace)


class _Failures(logging.Handler):
    "Counts the jobs the worker's log reports as failed for good (records with `action='fail'` and a `job_id`)."

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.ids: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) == "fail" and (jid := getattr(record, "job_id", None)): self.ids.add(jid)


async def _burst(hub: Tasks, opts: dict[str, Any]) -> int:
    """`--burst`: run until nothing is queued, running or due within `BURST_WINDOW` seconds (a job waiting for a
    short retry backoff is finished first). 0: no job failed; 1: some job failed; 128+N: stopped by signal N."""
    failures, top = _Failures(), logging.getLogger("fh_tasks")
    top.addHandler(failures)
    if top.getEffectiveLevel() > logging.WARNING: top.setLevel(logging.WARNING)  # failures are WARNING records
    done, w = 0, None
    try:
        while True:
            w = hub.worker(burst=True, **opts)
            if done == 0: _started(w)
            if (sig := await _run_worker(w)): return 128 + sig
            done += w.processed
            store = _sqlite(hub)
            due = store.next_due(w.queues, w.task_names()) if store is not None else None
            wait = None if due is None or store is None else due - store.clock()
            if wait is None or wait > BURST_WINDOW: break
            if (sig := await _nap(max(0.0, wait))): return 128 + sig
    finally: top.removeHandler(failures)
    log.info("worker %s stopped after %d job(s): nothing is due within %gs; %d job(s) failed", w.id if w else "-",
             done, BURST_WINDOW, len(failures.ids))
    return 1 if failures.ids else 0


async def _nap(seconds: float) -> int:
    "Sleep unless SIGTERM or SIGINT comes first; returns that signal (0: none)."
    loop = asyncio.get_running_loop()
    got: asyncio.Future[int] = loop.create_future()
    def on_signal(sig: signal.Signals) -> None:
        if not got.done(): got.set_result(int(sig))

    for s in (signal.SIGTERM, signal.SIGINT): loop.add_signal_handler(s, on_signal, s)
    try: return await asyncio.wait_for(got, seconds)
    except asyncio.TimeoutError: return 0
    finally:
        for s in (signal.SIGTERM, signal.SIGINT): loop.remove_signal_handler(s)


async def _run_worker(w: Any) -> int:
    "Run the worker until it stops; returns the first signal that stopped it (0: none)."
    loop, hits, first = asyncio.get_running_loop(), [0], []

    def on_signal(sig: signal.Signals) -> None:
        first.append(int(sig))
        hits[0] += 1
        if hits[0] == 1:
            log.info("%s: no new jobs; running ones get %gs to finish (send it again to give them back now)",
                     sig.name, w.grace)
            w.stop()
        else:
            log.warning("%s again: giving running jobs back to the queue now", sig.name)
            w.stop(now=True)

    for s in (signal.SIGTERM, signal.SIGINT): loop.add_signal_handler(s, on_signal, s)
    try: await w.run()
    finally:
        for s in (signal.SIGTERM, signal.SIGINT): loop.remove_signal_handler(s)
    return first[0] if first else 0


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "fh_tasks", "worker", args.app, "--processes", "1", "--log-level", args.log_level,
            "--log-format", args.log_format]
    for dest in ("db", "concurrency", "grace", "lease"):
        if (v := getattr(args, dest)) is not None: argv += [f"--{dest}", str(v)]
    if args.queues: argv += ["--queues", str(args.queues)]
    if args.strict_queues: argv += ["--strict-queues"]
    return argv + (["--burst"] if args.burst else [])


def _start_child(argv: list[str]) -> subprocess.Popen[bytes]:
    parent = os.getpid()

    def die_with_supervisor() -> None:
        if sys.platform.startswith("linux"):
            import ctypes
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a graceful stop if we are killed
        if os.getppid() != parent: os._exit(1)

    # Detached from the terminal: its Ctrl-C reaches the supervisor only, which forwards it once.
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_supervisor)


def _supervise(args: argparse.Namespace) -> int:
    "Run `--processes` worker processes; restart one that dies (with a growing delay while it keeps dying)."
    argv, signals = _child_argv(args), []
    procs = {i: (_start_child(argv), time.monotonic()) for i in range(args.processes)}
    delays: dict[int, float] = {}
    restart_at: dict[int, float] = {}
    log.info("supervisor %d started worker processes %s", os.getpid(), " ".join(str(p.pid) for p, _ in procs.values()))

    def forward(sig: int, _frame: Any) -> None:
        signals.append(sig)
        for p, _ in procs.values():
            if p.poll() is None: p.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    worst = 0
    try:
        while procs or (restart_at and not signals):
            time.sleep(0.05)
            now = time.monotonic()
            for i, (p, started) in list(procs.items()):
                if (rc := p.poll()) is None: continue
                del procs[i]
                # stopping, finished (--burst; 1: some job failed), or a start-up error
                if signals or rc == 0 or rc == 2 or (args.burst and rc == 1):
                    worst = max(worst, rc if rc > 0 else 0)
                    continue
                delays[i] = _backoff(delays.get(i), now - started)
                restart_at[i] = now + delays[i]
                log.warning("worker process %d ended with %s after %.1fs; starting another in %gs", p.pid,
                            _exit_text(rc), now - started, delays[i])
            for i, at in list(restart_at.items()):
                if signals: restart_at.clear()  # told to stop meanwhile
                elif now >= at:
                    del restart_at[i]
                    procs[i] = (_start_child(argv), time.monotonic())
    finally:
        for s, h in old.items(): signal.signal(s, h)
    log.info("supervisor %d: every worker process has stopped", os.getpid())
    return worst


def _backoff(last: float | None, uptime: float) -> float:
    """Seconds to wait before restarting a worker process that died after `uptime` seconds: the first delay, doubled
    on each death in a row up to the cap, and the first delay again once a worker stayed up for `STABLE` seconds."""
    first, cap = BACKOFF
    if last is None or uptime >= STABLE: return first
    return min(cap, last * 2)


def _exit_text(rc: int) -> str:
    if rc < 0:
        try: return f"signal {signal.Signals(-rc).name}"
        except ValueError: return f"signal {-rc}"
    return f"exit code {rc}"


def _logging(level: str, fmt: str = "text") -> None:
    """Log to stderr, every line escaped: stored text (a job's error, its task name) cannot forge log lines.
    `fmt="json"`: one JSON object per line, with the record's extra fields (`job_id`, `task`...)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         EscapingFormatter("%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


# -- inspecting and managing jobs ------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    "List jobs, newest first."
    hub = _hub(args)
    rows = [(r.id, r.task, r.state.value, f"{r.attempts}/{r.max_attempts}", _when(r.created_at), _when(r.finished_at),
             _error_line(r)) for r in hub.jobs(state=args.state, task=args.task, limit=args.limit)]
    print(table(("ID", "TASK", "STATE", "TRIES", "CREATED", "FINISHED", "ERROR"), rows, (32, 40, 9, 7, 19, 19, 60)))
    return 0


def _error_line(r: JobRecord) -> str:
    if not isinstance(r.error, dict): return "" if r.error is None else str(r.error)
    return f"{r.error.get('type', 'Error')}: {r.error.get('message', '')}".splitlines()[0] if r.error else ""


def _record(hub: Tasks, id: str) -> JobRecord:
    rec = hub.get(id)
    if rec is None: raise CliError(f"no job {id!r} in {(store := _sqlite(hub)) and store.path or 'the store'}")
    return rec


def cmd_show(args: argparse.Namespace) -> int:
    "Show one job; secret-looking arguments and the secrets inside stored text are redacted."
    hub = _hub(args)
    r = _record(hub, args.id)
    task = hub.registry.get(r.task)
    names = [p for p in task.signature.parameters] if task else []
    positional = [REDACTED if i < len(names) and is_secret_key(names[i]) else redact(a) for i, a in enumerate(r.args)]
    fields: list[tuple[str, Any]] = [
        ("id", r.id), ("task", r.task), ("queue", r.queue), ("state", r.state_text),
        ("attempts", f"{r.attempts} of {r.max_attempts}"), ("created", _when(r.created_at)),
        ("run at", _when(r.run_at)), ("started", _when(r.started_at)), ("finished", _when(r.finished_at)),
        ("worker", r.worker or "-"), ("parent", r.parent or "-"), ("args", _json(positional)),
        ("kwargs", _json(redact(r.kwargs))), ("progress", _json(redact(r.progress))),
        ("result", _json(redact(r.result)))]
    if isinstance(r.error, dict):
        fields.append(("error", redact_text(f"{r.error.get('type', 'Error')}: {r.error.get('message', '')}")))
    width = max(len(k) for k, _ in fields)
    for k, v in fields: print(f"{k.ljust(width)}  {_cut(_clean(v))}")
    tb = r.error.get("traceback") if isinstance(r.error, dict) else None
    if tb:
        print("traceback:")
        lines = redact_text(str(tb)).rstrip().splitlines()
        if len(lines) > SHOW_LINES:
            print(f"    ... ({len(lines) - SHOW_LINES:,} earlier lines)")
            lines = lines[-SHOW_LINES:]
        for line in lines: print("    " + _cut(_clean(line), 1000))
    return 0


def _json(v: Any) -> str:
    if v is None: return "-"
    try: return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError): return repr(v)


def cmd_retry(args: argparse.Namespace) -> int:
    "Queue a failed or cancelled job again (or every failed job) with fresh attempts."
    hub = _hub(args)
    if args.failed == bool(args.id): raise CliError("give either a job ID or --failed")
    if args.id:
        if not hub.retry(args.id):
            r = _record(hub, args.id)
            raise CliError(f"job {r.id} is {r.state.value}; only failed or cancelled jobs can be retried")
        print(f"requeued {args.id}")
        return 0
    total = 0
    while batch := hub.jobs(state="failed", limit=500):
        n = sum(hub.retry(r.id) for r in batch)
        total += n
        if n == 0: break  # retried elsewhere meanwhile
    print(f"requeued {total} failed job(s)")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    "Cancel a job that has not started."
    hub = _hub(args)
    if not hub.cancel(args.id):
        r = _record(hub, args.id)
        raise CliError(f"job {r.id} is {r.state.value}; only jobs that have not started can be cancelled")
    print(f"cancelled {args.id}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    "Delete finished (succeeded, failed, cancelled) jobs older than --older-than."
    n = _hub(args).prune(args.older_than)
    print(f"deleted {n} finished job(s) older than {_ago(args.older_than)}")
    return 0


def _ago(seconds: float) -> str:
    for unit in "dhm":
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0: return f"{seconds // _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def cmd_stats(args: argparse.Namespace) -> int:
    "Jobs per state, throughput over the last minute, live workers, and tasks no live worker runs."
    hub = _hub(args)
    counts = hub.counts()
    known = [s.value for s in JobState]
    rows = [(s, counts.get(s, 0)) for s in known]
    rows += [(f"unknown:{_clean(s)}", n) for s, n in counts.items() if s not in known]  # written behind fh-tasks' back
    print(table(("STATE", "JOBS"), rows + [("total", sum(counts.values()))]))
    if (store := _sqlite(hub)) is not None:
        n = store.finished_since(time.time() - 60)
        print(f"\nfinished in the last minute: {n} ({n / 60:.1f} jobs/s)")
        print(f"workers with running jobs: {store.running_workers()}")
        _workers_and_orphans(store, store.workers())
    return 0


def _workers_and_orphans(store: SQLiteStore, workers: list[Any]) -> None:
    "Live workers, then every task with jobs waiting that no live worker can run (they stay queued until one can)."
    live, now = [w for w in workers if w.live], time.time()
    silent = f" ({len(workers) - len(live)} silent, ignored)" if len(workers) > len(live) else ""
    print(f"live workers: {len(live)}{silent}")
    if live:
        print(table(("WORKER", "QUEUES", "CONCURRENCY", "TASKS", "SEEN"),
                    [(w.id, ",".join(w.queues), w.concurrency, len(w.tasks), f"{max(0.0, now - w.last_seen):.0f}s ago")
                     for w in live], (48, 40, 11, 5, 10)))
    for task, queue, due, later in store.waiting_by_task():
        if any(task in w.tasks and queue in w.queues for w in live): continue
        when = f"{due} queued" + (f", {later} scheduled" if later else "")
        print(f"no live worker runs task {_clean(task)} (queue {_clean(queue)}): {when}")


def cmd_cron(args: argparse.Namespace) -> int:
    "List the app's periodic tasks (@tasks.cron): schedule, time zone, queue, the next runs and the last slot fired."
    args.app = args.target or args.app
    if not args.app: raise CliError("name the app's hub: fh-tasks cron module:attr (or set FH_TASKS_APP)")
    from .cron import schedules
    hub = _hub(args)
    specs = schedules(hub)
    if not specs:
        print("no periodic tasks (@tasks.cron) in this app")
        return 0
    stored: dict[str, dict[str, Any]] = {}
    if (store := _sqlite(hub)) is not None:
        try: stored = {r["name"]: r for r in store.cron_rows()}
        except StoreError as e: print(f"fh-tasks: no run shown: {_clean(e)}", file=sys.stderr)
    now, fmt = time.time(), "%Y-%m-%d %H:%M:%S %Z"
    rows = []
    for s in specs:
        last = stored.get(s.task, {}).get("last_slot")
        rows.append((s.task, s.expr, s.tz, s.queue, s.missed,
                     ", ".join(s.local(t).strftime(fmt) for t in s.upcoming(now, args.next)),
                     s.local(last).strftime(fmt) if isinstance(last, (int, float)) else "-"))
    print(table(("TASK", "SCHEDULE", "TZ", "QUEUE", "MISSED", "NEXT RUNS", "LAST FIRED"), rows, (60, 40, 32)))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    "Wait until no job is queued, running, retrying or waiting; a progress bar goes to stderr."
    hub = _hub(args)
    since = store.finished_since if (store := _sqlite(hub)) is not None else None
    start, shown, tty = time.time(), 0.0, sys.stderr.isatty()
    while True:
        counts = hub.counts()
        pending = sum(counts.get(s, 0) for s in _PENDING)
        done = since(start) if since is not None else 0
        now = time.time()
        over = args.timeout is not None and now - start >= args.timeout
        if pending == 0 or over or now - shown >= (0.2 if tty else 1.0):
            _bar(done, pending, counts.get("running", 0), now - start, tty)
            shown = now
        if pending == 0 or over:
            if tty: sys.stderr.write("\n")
            if over: sys.stderr.write(f"fh-tasks: {pending} job(s) still pending after {args.timeout:g}s\n")
            return 1 if over else 0
        time.sleep(args.interval)


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the job store to DEST with SQLite's online backup: a consistent copy, taken while the app and its
    workers keep running. DEST is one self-contained file (no -wal or -shm beside it), checked before it is kept."""
    hub = _hub(args)
    store = _sqlite(hub)
    if store is None or store.memory: raise CliError("backup copies a SQLite job store file; this hub has none")
    hub.counts()  # opens the store read-only: a file that is not an fh-tasks store is refused here
    src_path, dest = os.path.abspath(store.path), os.path.abspath(args.dest)
    if os.path.isdir(dest): dest = os.path.join(dest, os.path.basename(src_path))
    if dest == src_path: raise CliError(f"{dest} is the job store itself; name another file")
    if os.path.exists(dest) and not args.force: raise CliError(f"{dest} exists; pass --force to replace it")
    if not os.path.isdir(os.path.dirname(dest)): raise CliError(f"directory {os.path.dirname(dest)} does not exist")
    part = f"{dest}.part{os.getpid()}"
    try:
        _copy_store(src_path, part)
        with open(part, "rb") as f: os.fsync(f.fileno())
        os.replace(part, dest)
    finally:
        if os.path.exists(part): os.unlink(part)
    n = sqlite3.connect(f"file:{urllib.parse.quote(dest)}?mode=ro", uri=True)
    try: jobs = n.execute("SELECT count(*) FROM fh_jobs").fetchone()[0]
    finally: n.close()
    print(f"backed up {src_path} to {dest}: {jobs} job(s), {os.path.getsize(dest):,} bytes")
    return 0


def _copy_store(src_path: str, dest: str) -> None:
    "SQLite's online backup, a few pages at a time so writers are never held up for long; then a quick check."
    src = sqlite3.connect(f"file:{urllib.parse.quote(src_path)}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(dest, isolation_level=None)
        try:
            src.backup(dst, pages=1024, sleep=0.005)
            dst.execute("PRAGMA journal_mode=DELETE")  # one file: the copy needs no -wal beside it
            if (check := dst.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise CliError(f"the copy failed SQLite's quick_check ({check}); {dest} is not kept")
        finally: dst.close()
    except sqlite3.Error as e: raise CliError(f"backup of {src_path} failed: {e}") from None
    finally: src.close()


def _bar(done: int, pending: int, running: int, elapsed: float, tty: bool) -> None:
    total = done + pending
    frac = done / total if total else 1.0
    fill = int(frac * 30)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"  eta {pending / rate:.0f}s" if rate > 0 and pending else ""
    line = f"[{'#' * fill}{'.' * (30 - fill)}] {done}/{total} done  {running} running  {rate:.1f} jobs/s{eta}"
    sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
    sys.stderr.flush()


# -- argument parsing ------------------------------------------------------------------------------
_CONVERT: dict[str, Callable[[str], Any]] = {
    "processes": _whole(1, 256), "concurrency": _whole(1, 100_000), "queues": _queues, "grace": parse_duration,
    "lease": _seconds, "log_level": _level, "log_format": _log_format, "strict_queues": _flag}
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
        w.add_argument(f"--{dest.replace('_', '-')}", type=_arg(_CONVERT[dest]), metavar=metavar,
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
    ls = sub.add_parser("ls", help="list jobs", description=cmd_ls.__doc__)
    ls.add_argument("--state", choices=[s.value for s in JobState])
    ls.add_argument("--task", help="only jobs of this task (its stored name)")
    ls.add_argument("--limit", type=_arg(_positive_int), default=50, help="at most this many (default 50)")
    show = sub.add_parser("show", help="show one job", description=cmd_show.__doc__)
    show.add_argument("id")
    retry = sub.add_parser("retry", help="requeue a failed job, or all of them", description=cmd_retry.__doc__)
    retry.add_argument("id", nargs="?")
    retry.add_argument("--failed", action="store_true", help="requeue every failed job")
    cancel = sub.add_parser("cancel", help="cancel a job that has not started", description=cmd_cancel.__doc__)
    cancel.add_argument("id")
    purge = sub.add_parser("purge", help="delete old finished jobs", description=cmd_purge.__doc__)
    purge.add_argument("--older-than", required=True, type=_arg(_age), metavar="AGE",
                       help="with its unit: 12h, 7d, 2w (a bare number is refused)")
    stats = sub.add_parser("stats", help="jobs per state and throughput", description=cmd_stats.__doc__)
    wait = sub.add_parser("wait", help="wait for the queue to drain", description=cmd_wait.__doc__)
    wait.add_argument("--timeout", type=_arg(_seconds), help="give up (exit 1) after this long: seconds, or like 5m")
    wait.add_argument("--interval", type=_arg(_seconds), default=0.2, help=argparse.SUPPRESS)
    backup = sub.add_parser("backup", help="copy the job store, safely, while it is in use",
                            description=cmd_backup.__doc__)
    backup.add_argument("dest", metavar="DEST", help="the file to write (or a directory to write it in)")
    backup.add_argument("--force", action="store_true", help="replace DEST if it exists")
    cron = sub.add_parser("cron", help="list periodic tasks and their next runs", description=cmd_cron.__doc__)
    cron.add_argument("target", nargs="?", metavar="MODULE:ATTR",
                      help=_env_help("app", "the Tasks hub (or the app it is bound to)"))
    cron.add_argument("--next", type=_arg(_whole(1, 100)), default=3, metavar="N",
                      help="show the next N runs of each (default 3)")
    for name, sp in (("ls", ls), ("show", show), ("retry", retry), ("cancel", cancel), ("purge", purge),
                     ("stats", stats), ("wait", wait), ("backup", backup), ("cron", cron)):
        _store_options(sp)
        sp.set_defaults(func=globals()[f"cmd_{name}"])




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
        print(f"fh-tasks: error: {_clean(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`fh-tasks ls | head`): stop quietly, as Unix tools do on SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 130
