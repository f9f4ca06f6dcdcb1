"""The commands that look after the jobs in a store: `ls`, `show`, `retry`, `cancel`, `purge`, `stats`, `cron`,
`wait`, `backup`. What they print of stored data is escaped for the terminal; `show` redacts secrets."""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from ..hub import Tasks
from ..records import JobRecord, JobState
from ..redact import REDACTED, is_secret_key, redact, redact_text
from .target import hub_of, sqlite_of
from .values import CliError, ago, as_json, clean, cut, table, when

if TYPE_CHECKING:
    from ..store.sqlite import SQLiteStore

PENDING = ("queued", "running", "retrying", "waiting")
#: `show` cuts each field at this many characters, and a traceback at this many lines.
SHOW_CHARS, SHOW_LINES = 4000, 200


def cmd_ls(args: argparse.Namespace) -> int:
    "List jobs, newest first."
    hub = hub_of(args)
    rows = [(r.id, r.task, r.state.value, f"{r.attempts}/{r.max_attempts}", when(r.created_at), when(r.finished_at),
             _error_line(r)) for r in hub.jobs(state=args.state, task=args.task, limit=args.limit)]
    print(table(("ID", "TASK", "STATE", "TRIES", "CREATED", "FINISHED", "ERROR"), rows, (32, 40, 9, 7, 19, 19, 60)))
    return 0


def _error_line(r: JobRecord) -> str:
    if not isinstance(r.error, dict): return "" if r.error is None else str(r.error)
    return f"{r.error.get('type', 'Error')}: {r.error.get('message', '')}".splitlines()[0] if r.error else ""


def _record(hub: Tasks, id: str) -> JobRecord:
    rec = hub.get(id)
    if rec is None: raise CliError(f"no job {id!r} in {(store := sqlite_of(hub)) and store.path or 'the store'}")
    return rec


def cmd_show(args: argparse.Namespace) -> int:
    "Show one job; secret-looking arguments and the secrets inside stored text are redacted."
    hub = hub_of(args)
    r = _record(hub, args.id)
    task = hub.registry.get(r.task)
    names = [p for p in task.signature.parameters] if task else []
    positional = [REDACTED if i < len(names) and is_secret_key(names[i]) else redact(a) for i, a in enumerate(r.args)]
    fields: list[tuple[str, Any]] = [
        ("id", r.id), ("task", r.task), ("queue", r.queue), ("state", r.state_text),
        ("attempts", f"{r.attempts} of {r.max_attempts}"), ("created", when(r.created_at)),
        ("run at", when(r.run_at)), ("started", when(r.started_at)), ("finished", when(r.finished_at)),
        ("worker", r.worker or "-"), ("parent", r.parent or "-"), ("args", as_json(positional)),
        ("kwargs", as_json(redact(r.kwargs))), ("progress", as_json(redact(r.progress))),
        ("result", as_json(redact(r.result)))]
    if isinstance(r.error, dict):
        fields.append(("error", redact_text(f"{r.error.get('type', 'Error')}: {r.error.get('message', '')}")))
    width = max(len(k) for k, _ in fields)
    for k, v in fields: print(f"{k.ljust(width)}  {cut(clean(v), SHOW_CHARS)}")
    tb = r.error.get("traceback") if isinstance(r.error, dict) else None
    if tb:
        print("traceback:")
        lines = redact_text(str(tb)).rstrip().splitlines()
        if len(lines) > SHOW_LINES:
            print(f"    ... ({len(lines) - SHOW_LINES:,} earlier lines)")
            lines = lines[-SHOW_LINES:]
        for line in lines: print("    " + cut(clean(line), 1000))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    "Queue a failed or cancelled job again (or every failed job) with fresh attempts."
    hub = hub_of(args)
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
    hub = hub_of(args)
    if not hub.cancel(args.id):
        r = _record(hub, args.id)
        raise CliError(f"job {r.id} is {r.state.value}; only jobs that have not started can be cancelled")
    print(f"cancelled {args.id}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    "Delete finished (succeeded, failed, cancelled) jobs older than --older-than."
    n = hub_of(args).prune(args.older_than)
    print(f"deleted {n} finished job(s) older than {ago(args.older_than)}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    "Jobs per state, throughput over the last minute, live workers, and tasks no live worker runs."
    hub = hub_of(args)
    counts = hub.counts()
    known = [s.value for s in JobState]
    rows = [(s, counts.get(s, 0)) for s in known]
    rows += [(f"unknown:{clean(s)}", n) for s, n in counts.items() if s not in known]  # written behind fh-tasks' back
    print(table(("STATE", "JOBS"), rows + [("total", sum(counts.values()))]))
    if (store := sqlite_of(hub)) is not None:
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
        due_text = f"{due} queued" + (f", {later} scheduled" if later else "")
        print(f"no live worker runs task {clean(task)} (queue {clean(queue)}): {due_text}")


def cmd_cron(args: argparse.Namespace) -> int:
    "List the app's periodic tasks (@tasks.cron): schedule, time zone, queue, the next runs and the last slot fired."
    args.app = args.target or args.app
    if not args.app: raise CliError("name the app's hub: fh-tasks cron module:attr (or set FH_TASKS_APP)")
    from ..cron import schedules
    hub = hub_of(args)
    specs = schedules(hub)
    if not specs:
        print("no periodic tasks (@tasks.cron) in this app")
        return 0
    stored: dict[str, dict[str, Any]] = {}
    if (store := sqlite_of(hub)) is not None:
        try: stored = {r["name"]: r for r in store.cron_rows()}
        except StoreError as e: print(f"fh-tasks: no run shown: {clean(e)}", file=sys.stderr)
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
    hub = hub_of(args)
    since = store.finished_since if (store := sqlite_of(hub)) is not None else None
    start, shown, tty = time.time(), 0.0, sys.stderr.isatty()
    while True:
        counts = hub.counts()
        pending = sum(counts.get(s, 0) for s in PENDING)
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


def _bar(done: int, pending: int, running: int, elapsed: float, tty: bool) -> None:
    total = done + pending
    frac = done / total if total else 1.0
    fill = int(frac * 30)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f"  eta {pending / rate:.0f}s" if rate > 0 and pending else ""
    line = f"[{'#' * fill}{'.' * (30 - fill)}] {done}/{total} done  {running} running  {rate:.1f} jobs/s{eta}"
    sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
    sys.stderr.flush()


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the job store to DEST with SQLite's online backup: a consistent copy, taken while the app and its
    workers keep running. DEST is one self-contained file (no -wal or -shm beside it), checked before it is kept."""
    hub = hub_of(args)
    store = sqlite_of(hub)
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
