"""Where a task body runs: on the event loop (async), in a bounded thread pool, or in a pool of child processes.

The process pool runs `process=True` tasks one job per child at a time. A child finds the task by importing
the module named by the in-memory `Task` (never a name read from storage) and looking the task up in its
process-global registry. A child that dies, or whose job is cancelled (timeout, shutdown), is killed and
replaced, so one bad job never breaks the jobs running next to it; children die with their worker.
"""
from __future__ import annotations

import asyncio
import atexit
import importlib
import multiprocessing
import os
import pickle
import queue
import runpy
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any

from .context import JobContext, _current

if TYPE_CHECKING:
    from .task import Task

__all__ = ["call_in_thread", "thread_pool", "process_pool", "ProcessPool", "PoolProcessDied", "RemoteError"]

_MAIN = ("__main__", "__mp_main__")


# -- threads ---------------------------------------------------------------------------------------
class DaemonThreadPool(Executor):
    """A bounded pool of daemon threads. A job still running when the worker has given it back to the queue
    (grace period over) never keeps the process from exiting, unlike `ThreadPoolExecutor`'s threads."""

    def __init__(self, size: int, name: str = "fh-tasks") -> None:
        if size < 1: raise ValueError(f"thread pool size must be >= 1, not {size}")
        self.size, self.name = size, name
        self._work: queue.SimpleQueue[tuple[Future[Any] | None, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
                                      | None]
        self._work = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        "Run `fn(*args, **kwargs)` in a pool thread."
        fut: Future[Any] = Future()
        self._put((fut, fn, args, kwargs))
        return fut

    def run(self, fn: Callable[[], None]) -> None:
        "Run `fn()` in a pool thread, with no `Future` to make and settle: `fn` reports its own end (and errors)."
        self._put((None, fn, (), {}))

    def _put(self, item: tuple[Future[Any] | None, Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> None:
        with self._lock:
            if self._closed: raise RuntimeError("cannot run a job: the thread pool is shut down")
            self._work.put(item)
            if self._idle == 0 and len(self._threads) < self.size:
                t = threading.Thread(target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            elif self._idle > 0: self._idle -= 1

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            fut, fn, args, kwargs = item
            if fut is None:
                try: fn()
                except BaseException: pass  # `run` callers report their own errors
            elif fut.set_running_or_notify_cancel():
                try: fut.set_result(fn(*args, **kwargs))
                except BaseException as e: fut.set_exception(e)  # SystemExit in a task fails the job, not the thread
            del item, fut  # drop references to the job while idle
            with self._lock: self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        "Stop the threads once they are idle; `cancel_futures` drops work not started yet."
        with self._lock:
            if self._closed: return
            self._closed = True
            if cancel_futures:
                while True:
                    try: item = self._work.get_nowait()
                    except queue.Empty: break
                    if item is not None and item[0] is not None: item[0].cancel()
            for _ in self._threads: self._work.put(None)
        if wait:
            for t in self._threads: t.join()


def thread_pool(size: int) -> DaemonThreadPool:
    "The worker's own pool for sync tasks (never Starlette's, which serves sync handlers)."
    return DaemonThreadPool(size)


def call_in_thread(ctx: JobContext, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    "Call `fn` with `current_job()` returning `ctx`."
    token = _current.set(ctx)
    try: return fn(*args, **kwargs)
    finally: _current.reset(token)


# -- processes -------------------------------------------------------------------------------------
class PoolProcessDied(RuntimeError):
    """The pool process running the job died (os._exit, a signal, out of memory)."""


class RemoteError(Exception):
    """A task in a pool process raised an exception that cannot be sent back as it is."""


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def _default_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _main_info() -> tuple[str | None, str | None]:
    "How a child can load this process's `__main__` script: its module name (`python -m`) or its path."
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name != "__main__" and not name.endswith(".__main__"): return name, None
    path = getattr(main, "__file__", None)
    return None, (os.path.abspath(path) if path and path.endswith(".py") else None)


class _Child:
    "One pool process and the parent's end of its pipe."

    def __init__(self, proc: Any, conn: Any) -> None:
        self.proc, self.conn = proc, conn

    async def call(self, request: dict[str, Any]) -> tuple[Any, ...]:
        "Send one job and wait for its reply without blocking the event loop."
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        fd = self.conn.fileno()

        def readable() -> None:
            loop.remove_reader(fd)
            if reply.done(): return
            try: reply.set_result(self.conn.recv_bytes())
            except (EOFError, OSError) as e: reply.set_exception(e)

        try:
            self.conn.send_bytes(pickle.dumps(request))
            loop.add_reader(fd, readable)
            data = await reply
        except (EOFError, OSError):
            raise PoolProcessDied(f"the pool process running {request['name']} {self.death()}") from None
        finally:
            loop.remove_reader(fd)
        result: tuple[Any, ...] = pickle.loads(data)
        return result

    def death(self) -> str:
        self.proc.join(1.0)
        code = self.proc.exitcode
        if code is None: return "stopped answering"
        if code < 0:
            try: return f"was killed by {signal.Signals(-code).name}"
            except ValueError: return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def kill(self) -> None:
        if self.proc.is_alive(): self.proc.kill()
        self.proc.join(2.0)
        self.conn.close()

    def stop(self) -> None:
        "Ask an idle child to exit."
        try: self.conn.send_bytes(pickle.dumps(None))
        except OSError: pass


class ProcessPool:
    """Up to `size` child processes (forkserver, or spawn where fork is unavailable) running sync tasks.

    `run()` is awaited on the worker's loop. Cancelling it (job timeout, job cancelled by `tasks.cancel(id,
    running=True)`, shutdown past the grace period) kills that job's child only, and a replacement starts at once
    in the background; a child that dies fails only its own job.
    """

    def __init__(self, size: int | None = None, method: str | None = None) -> None:
        self.size = max(1, size or os.cpu_count() or 1)
        self.method = method or _default_method()
        if self.method not in ("forkserver", "spawn"):
            raise ValueError(f"process pool start method must be 'forkserver' or 'spawn', not {self.method!r}")
        self._mp: Any = multiprocessing.get_context(self.method)  # forkserver or spawn: both have Process
        if self.method == "forkserver": self._mp.set_forkserver_preload(["fh_tasks"])  # children fork with it loaded
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self._refill: asyncio.Task[None] | None = None  # starting children to replace killed ones
        _pools.add(self)

    def _spawn(self) -> _Child:
        parent, child = self._mp.Pipe()
        main_name, main_path = _main_info()
        proc = self._mp.Process(target=_child_main, args=(child, os.getpid(), list(sys.path), main_name, main_path),
                                name="fh-tasks-pool", daemon=False)
        proc.start()
        child.close()  # so the parent sees EOF when the child dies
        return _Child(proc, parent)

    async def _take(self) -> _Child:
        while self._idle:
            c = self._idle.pop()
            if c.proc.is_alive(): return c
            c.kill()
        fut = asyncio.get_running_loop().run_in_executor(None, self._spawn)  # forkserver start-up blocks ~0.3 s
        try: return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._adopt)
            raise

    async def warm(self) -> None:
        "Start the children now, so the first jobs do not wait for the pool's start-up."
        loop = asyncio.get_running_loop()
        while not self._closed and len(self._idle) + len(self._busy) < self.size:
            fut = loop.run_in_executor(None, self._spawn)
            try: await asyncio.shield(fut)
            except asyncio.CancelledError:
                fut.add_done_callback(self._adopt)  # adopted when ready, stopped if the pool closed meanwhile
                raise
            self._adopt(fut)

    def _replace(self) -> None:
        """A child was killed (its job cancelled or timed out) or died: start its replacement now, in the background,
        so that the next job does not wait for a start-up. The other children and their jobs are not touched."""
        if self._closed or (self._refill is not None and not self._refill.done()): return
        try: self._refill = asyncio.ensure_future(self.warm())
        except RuntimeError: pass  # no running loop: the next job starts a child itself

    def _adopt(self, fut: asyncio.Future[_Child]) -> None:
        if fut.cancelled() or fut.exception() is not None: return
        c = fut.result()
        if self._closed: c.stop()
        else: self._idle.append(c)

    async def run(self, task: Task[Any, Any], ctx: JobContext, args: list[Any], kwargs: dict[str, Any]) -> Any:
        "Run one job of `task` in a child process; returns its result or raises what it raised."
        if self._closed: raise RuntimeError("the process pool is shut down")
        if self._slots is None: self._slots = asyncio.Semaphore(self.size)
        request = {"module": task.fn.__module__, "name": task.name, "id": ctx.id, "attempt": ctx.attempt,
                   "max_attempts": ctx.max_attempts, "db": getattr(ctx.store, "path", None), "args": args,
                   "kwargs": kwargs}
        async with self._slots:
            child = await self._take()
            self._busy.add(child)
            try:
                reply = await child.call(request)
            except BaseException:
                child.kill()  # cancelled or dead: a child in an unknown state is never reused
                self._replace()
                raise
            finally:
                self._busy.discard(child)
            if self._closed: child.stop()
            else: self._idle.append(child)
        return _unpack(reply)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        "Stop every child: idle ones exit, busy ones are killed (their jobs were already given back)."
        self._closed = True
        if self._refill is not None: self._refill.cancel()  # a child it is starting is stopped once up (`_adopt`)
        busy, idle = list(self._busy), self._idle
        self._idle = []
        for c in busy: c.proc.kill()
        for c in idle: c.stop()
        for c in busy + idle:
            c.proc.join(2.0 if wait else 0.1)
            c.kill()


_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


@atexit.register
def _stop_pools() -> None:
    # Runs before multiprocessing's own atexit hook, which would otherwise wait for children forever.
    for p in list(_pools): p.shutdown(wait=False)


def process_pool(size: int | None = None) -> ProcessPool:
    "A process pool for CPU-bound tasks (`@tasks.task(process=True)`); `size` defaults to the CPU count."
    return ProcessPool(size)


def _unpack(reply: tuple[Any, ...]) -> Any:
    if reply[0] == "ok": return reply[1]
    _, blob, type_name, message, tb = reply
    exc: BaseException
    try: exc = pickle.loads(blob) if blob is not None else RemoteError(f"{type_name}: {message}")
    except Exception: exc = RemoteError(f"{type_name}: {message}")
    exc.__cause__ = _RemoteTraceback(tb)
    raise exc


# -- inside a pool process -------------------------------------------------------------------------
def _exit_with(owner: int) -> None:
    "Exit as soon as the worker process that owns this child is gone, even by SIGKILL (no orphans)."
    # The fork server is this child's parent, and it stays up while any child holds its "alive" pipe,
    # so a parent-death signal would never fire: watch the owner itself.
    def watch() -> None:
        try: fd = os.pidfd_open(owner)  # type: ignore[attr-defined, unused-ignore]
        except (AttributeError, OSError): fd = None
        if fd is not None: select.select([fd], [], [])  # readable once the process has ended
        else:
            while True:
                try: os.kill(owner, 0)
                except ProcessLookupError: break
                except PermissionError: pass
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="fh-tasks-owner-watch", daemon=True).start()


def _child_main(conn: Any, owner: int, sys_path: list[str], main_name: str | None, main_path: str | None) -> None:
    _exit_with(owner)
    # The parent stops its children; a terminal's Ctrl-C must reach only the parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.path[:] = sys_path
    stores: dict[str, Any] = {}
    while True:
        try: data = conn.recv_bytes()
        except (EOFError, OSError): return
        request = pickle.loads(data)
        if request is None: return
        conn.send_bytes(_run_request(request, main_name, main_path, stores))


def _run_request(req: dict[str, Any], main_name: str | None, main_path: str | None, stores: dict[str, Any]) -> bytes:
    try:
        task = _find_task(req["name"], req["module"], main_name, main_path)
        store = _child_store(req["db"], stores) if req["db"] and req["db"] != ":memory:" else None
        ctx = JobContext(req["id"], req["name"], req["attempt"], req["max_attempts"], store)
        try: return pickle.dumps(("ok", call_in_thread(ctx, task.fn, req["args"], req["kwargs"])))
        finally: _flush_progress(store)  # before the parent records the outcome
    except BaseException as e:
        return _error_reply(e)


def _child_store(db: str, stores: dict[str, Any]) -> Any:
    "The pool process's store for `db`, with a thread that writes the progress its tasks record."
    if (store := stores.get(db)) is None:
        from .progress import start_flusher
        from .store.sqlite import SQLiteStore
        store = stores[db] = SQLiteStore(db)
        start_flusher(store.progress_pending, store.flush_progress)
    return store


def _flush_progress(store: Any) -> None:
    if store is None or not store.progress_pending(): return
    try: store.flush_progress()
    except Exception: pass  # busy or gone: the flusher thread tries again; the job's outcome does not depend on it


def _error_reply(e: BaseException) -> bytes:
    tb = traceback.format_exc()
    blob = None
    if isinstance(e, Exception):  # SystemExit & co. must not be re-raised inside the parent's event loop
        try:
            blob = pickle.dumps(e)
            pickle.loads(blob)
        except Exception: blob = None
    try: return pickle.dumps(("error", blob, type(e).__name__, str(e), tb))
    except Exception: return pickle.dumps(("error", None, type(e).__name__, repr(e), tb))


def _find_task(name: str, module: str, main_name: str | None, main_path: str | None) -> Any:
    "The registered task `name`, importing `module` (from the parent's in-memory Task) if needed."
    from .task import registered
    if (task := registered(name)) is not None: return task
    if module in _MAIN: _load_main(main_name, main_path)
    else: importlib.import_module(module)
    if (task := registered(name)) is None:
        where = f"the script {main_path or main_name}" if module in _MAIN else f"module {module}"
        raise LookupError(f"task {name!r} is not registered after importing {where} in the pool process; "
                          "define process=True tasks at module level")
    return task


def _load_main(main_name: str | None, main_path: str | None) -> None:
    "Run the parent's script as `__mp_main__`, as multiprocessing's spawn does (its `__main__` block stays inert)."
    if "__mp_main__" in sys.modules and getattr(sys.modules["__mp_main__"], "__file__", None) == main_path: return
    import types
    mod = types.ModuleType("__mp_main__")
    if main_name: code = runpy.run_module(main_name, run_name="__mp_main__", alter_sys=True)
    elif main_path: code = runpy.run_path(main_path, run_name="__mp_main__")
    else: raise LookupError("the task is defined in the parent's __main__, which a pool process cannot import")
    mod.__dict__.update(code)
    sys.modules["__mp_main__"] = mod
