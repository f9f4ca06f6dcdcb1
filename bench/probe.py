"""What every benchmark job does: record (enqueued, started, ended) times, 24 bytes appended to a per-process file.

One `os.write` per job costs a few microseconds, the same for every peer, and works in forked work-horses too.
The harness counts records by file size and reads them back for throughput and pickup latency.
"""
from __future__ import annotations

import glob
import os
import struct
import tempfile
import threading
import time
from typing import Any

__all__ = ["record", "reset", "count", "writers", "records", "ENV"]

#: Environment variable naming the directory the records go to.
ENV = "BENCH_PROBE_DIR"
_REC = struct.Struct("<ddd")
_fd: int | None = None
_pid = 0
_lock = threading.Lock()


def _open() -> int:
    global _fd, _pid
    with _lock:
        if _fd is None or _pid != os.getpid():
            d = os.environ.get(ENV) or tempfile.gettempdir()
            _fd = os.open(os.path.join(d, f"probe-{os.getpid()}.bin"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            _pid = os.getpid()
        return _fd


def record(arg: Any, started: float | None = None) -> None:
    "The body of every no-op job: note when it was enqueued (arg['t']), started and ended."
    started = time.time() if started is None else started
    fd = _fd if _fd is not None and _pid == os.getpid() else _open()
    os.write(fd, _REC.pack(float(arg["t"]), started, time.time()))


def reset() -> None:
    "Close this process's record file so the next record opens one in the directory now named by the env."
    global _fd
    with _lock:
        if _fd is not None and _pid == os.getpid(): os.close(_fd)
        _fd = None


def _files(d: str) -> list[str]:
    return glob.glob(os.path.join(d, "probe-*.bin"))


def count(d: str) -> int:
    "How many jobs have recorded so far in directory `d`."
    total = 0
    for f in _files(d):
        try: total += os.path.getsize(f) // _REC.size
        except OSError: pass
    return total


def writers(d: str) -> int:
    "How many processes have recorded a job in directory `d` so far (one file each)."
    return len(_files(d))


def records(d: str, since: float = 0.0) -> list[tuple[float, float, float]]:
    "Every (enqueued, started, ended) record in `d` whose job was enqueued at or after `since`."
    out: list[tuple[float, float, float]] = []
    for f in _files(d):
        with open(f, "rb") as fh: data = fh.read()
        data = data[: len(data) - len(data) % _REC.size]
        out.extend(r for r in _REC.iter_unpack(data) if r[0] >= since)
    return out
