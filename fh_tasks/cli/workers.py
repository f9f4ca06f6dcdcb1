"""`fh-tasks worker`: one worker process until a signal (or, with `--burst`, until nothing is due), or a
supervisor of `--processes N` that restarts a process that dies, with a growing delay while it keeps dying."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..errors import StoreError, Unsupported
from ..hub import Tasks
from ..logs import EscapingFormatter, JsonFormatter
from ..records import QueueOrder
from .target import load_target, sqlite_of, use_db
from .values import CliError

log = logging.getLogger("fh_tasks.cli")

#: Supervisor: a worker process that dies is restarted after a delay that doubles from the first to the second
#: figure while it keeps dying, and starts over once a worker has stayed up for `STABLE` seconds.
BACKOFF, STABLE = (0.5, 30.0), 60.0
#: `worker --burst` waits for a job due within this many seconds (a short retry backoff) before it exits.
BURST_WINDOW = 5.0


def cmd_worker(args: argparse.Namespace) -> int:
    "Run workers until SIGTERM/SIGINT (a second signal gives running jobs back at once)."
    if not args.app: raise CliError("name the app's hub: fh-tasks worker module:attr (or set FH_TASKS_APP)")
    setup_logging(args.log_level, args.log_format)
    hub = load_target(args.app)
    if args.db: use_db(hub, args.db)
    try:  # opens the store now: a missing directory or read-only file fails here, clearly
        if (store := sqlite_of(hub)) is not None: store.expire()
    except StoreError as e: raise CliError(str(e)) from None
    queues = args.queues
    if args.strict_queues:
        try: queues = QueueOrder.of(queues or hub.queue_order, strict=True)
        except ValueError as e: raise CliError(f"--strict-queues: {e}") from None
    if isinstance(queues, QueueOrder) and queues.mode != "merged":
        try: hub.engine.capabilities.require("queue_order", hub.engine.name, f"take queues by {queues.mode} order")
        except Unsupported as e: raise CliError(str(e)) from None
    elif isinstance(queues, QueueOrder): queues = queues.names  # plain names: what every engine's worker takes
    if args.processes > 1: return supervise(args)
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
            store = sqlite_of(hub)
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


# -- the supervisor of --processes N -------------------------------------------------------------------
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


def supervise(args: argparse.Namespace) -> int:
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
                delays[i] = backoff(delays.get(i), now - started)
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


def backoff(last: float | None, uptime: float) -> float:
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


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr, every line escaped: stored text (a job's error, its task name) cannot forge log lines.
    `fmt="json"`: one JSON object per line, with the record's extra fields (`job_id`, `task`...)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         EscapingFormatter("%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
