"""fh-tasks on the Dramatiq engine (Redis broker and status store): the same no-op job as the plain `dramatiq` peer,
through fh-tasks' `defer()` (outside a request: no outbox), the status store and a `dramatiq.Worker` of 8 threads."""
from __future__ import annotations

import os
import tempfile
from typing import Any

from fh_tasks import Tasks
from fh_tasks.engine import EngineSettings
from fh_tasks.engines.dramatiq import DramatiqEngine

from ..common import PY, flush_redis
from ..io_job import roundtrip
from ..probe import record
from . import Peer, job_arg

DB = 7
URL = f"{os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}/{DB}"
THREADS = 8


def make_hub() -> Tasks:
    """A hub on the Dramatiq engine with the benchmark tasks (`bench.noop`; `bench.io`, one Redis round trip); its
    outbox file is a temporary one."""
    db = os.path.join(tempfile.gettempdir(), f"fh-dramatiq-bench-{os.getpid()}.db")
    tasks = Tasks(engine=DramatiqEngine(EngineSettings(broker=URL, db=db, workers=0), namespace="bench"), workers=0)

    @tasks.task(name="bench.noop")
    def noop(arg: dict[str, Any]) -> None:
        record(arg)

    @tasks.task(name="bench.io")
    def io(arg: dict[str, Any]) -> None:
        roundtrip(arg)

    return tasks


#: The hub `fh-tasks worker bench.peers.fh_dramatiq_peer:tasks` serves.
tasks = make_hub()


class FhDramatiq(Peer):
    key, label = "fh-dramatiq", "fh-tasks on Dramatiq (Redis)"
    concurrency = (f"`fh-tasks worker --concurrency {THREADS}`: a `dramatiq.Worker` of {THREADS} threads (as `dramatiq "
                   f"-t {THREADS}`); 2 processes: `--processes 2`")
    batch_api = "`engine.submit(list)`: one status-store script per batch, one message per job"
    measures = frozenset({"enqueue", "drain", "pickup"})

    def reset(self) -> None:
        self.close()
        self.rep += 1
        flush_redis(URL)
        self.hub = make_hub()
        self.t = self.hub.registry["bench.io" if self.io else "bench.noop"]

    def put(self, arg: dict[str, Any]) -> None:
        self.t.defer(arg)

    def put_batches(self, n: int, size: int) -> bool:
        t, engine = self.t, self.hub.engine
        for start in range(0, n, size):
            engine.submit([t.new_job((job_arg(),), {}, t.options) for _ in range(min(size, n - start))])
        return True

    def worker_commands(self, procs: int) -> list[list[str]]:
        return [[PY, "-m", "fh_tasks", "worker", "bench.peers.fh_dramatiq_peer:tasks", "--processes", str(procs),
                 "--concurrency", str(THREADS), "--log-level", "warning"]]

    def close(self) -> None:
        if getattr(self, "hub", None) is not None: self.hub.close()
        self.hub = None


PEERS = {"fh-dramatiq": FhDramatiq}
