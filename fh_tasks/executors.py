"""Where a task body runs: on the event loop (async), in a bounded thread pool, or in a process pool."""
from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from .context import JobContext, _current

__all__ = ["call_in_thread", "call_in_process", "thread_pool", "process_pool"]


def thread_pool(size: int) -> ThreadPoolExecutor:
    "The worker's own pool for sync tasks (never Starlette's, which serves sync handlers)."
    return ThreadPoolExecutor(max_workers=size, thread_name_prefix="fh-tasks")


def call_in_thread(ctx: JobContext, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    token = _current.set(ctx)
    try: return fn(*args, **kwargs)
    finally: _current.reset(token)


def _init_child() -> None:
    # Pool children must not inherit a server's signal handlers: the parent stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def process_pool(size: int | None = None) -> Executor:
    "A process pool for CPU-bound tasks; children import the task's module and look the task up by name."
    ctx = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
    return ProcessPoolExecutor(max_workers=size or os.cpu_count() or 1, mp_context=ctx, initializer=_init_child)


def call_in_process(module: str, name: str, ctx: dict[str, Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    "Run the registered task `name` from `module` in a pool child (the module comes from code, never from storage)."
    from .task import registered
    task = registered(name)
    if task is None:
        importlib.import_module(module)
        task = registered(name)
    if task is None: raise LookupError(f"task {name!r} is not registered in module {module!r} in the pool process")
    store = None
    if ctx.get("db") and ctx["db"] != ":memory:":
        from .store.sqlite import SQLiteStore
        store = _child_stores.setdefault(ctx["db"], SQLiteStore(ctx["db"]))
    jc = JobContext(ctx["id"], name, ctx["attempt"], ctx["max_attempts"], store)
    return call_in_thread(jc, task.fn, args, kwargs)


_child_stores: dict[str, Any] = {}
