"""fh-tasks: the embedded SQLite store (WAL, durability "normal"), a worker with its default 8 threads per process."""
from __future__ import annotations

from typing import Any

from fh_tasks import Tasks

from ..common import PY
from ..io_job import aroundtrip, roundtrip
from ..probe import record
from . import Peer, job_arg

CONCURRENCY = 8


def make_hub(db: str, **kw: Any) -> Tasks:
    "A hub on `db` with the benchmark tasks registered (`hub.registry['bench.noop']`, `...['bench.anoop']`)."
    tasks = Tasks(db=db, **{"workers": 0, **kw})

    @tasks.task(name="bench.noop")
    def noop(arg: dict[str, Any]) -> None:
        record(arg)

    @tasks.task(name="bench.anoop")
    async def anoop(arg: dict[str, Any]) -> None:
        record(arg)

    @tasks.task(name="bench.io")
    def io(arg: dict[str, Any]) -> None:
        roundtrip(arg)

    @tasks.task(name="bench.aio")
    async def aio(arg: dict[str, Any]) -> None:
        await aroundtrip(arg)

    return tasks


#: The hub `fh-tasks worker bench.peers.fh_peer:tasks --db FILE` serves (its store is never opened: --db replaces it).
tasks = make_hub("fh-bench-unused.db")


class FhTasks(Peer):
    key = label = "fh-tasks"
    concurrency = (f"`fh-tasks worker --concurrency {CONCURRENCY}` (its default: {CONCURRENCY} threads for a sync "
                   "`def` task); 2 processes: `--processes 2`")
    batch_api = "`task.defer_many([...])`: one transaction per batch, every call checked as `defer()` checks it"
    task = "bench.noop"
    io_task = "bench.io"
    hub_kw: dict[str, Any] = {}

    def reset(self) -> None:
        self.close()
        self.rep += 1
        self.db = str(self.dir / f"jobs-{self.rep}.db")
        self.hub = make_hub(self.db, **self.hub_kw)
        self.t = self.hub.registry[self.io_task if self.io else self.task]

    def put(self, arg: dict[str, Any]) -> None:
        self.t.defer(arg)

    def put_batches(self, n: int, size: int) -> bool:
        t = self.t
        for start in range(0, n, size): t.defer_many([(job_arg(),) for _ in range(min(size, n - start))])
        return True

    def worker_commands(self, procs: int) -> list[list[str]]:
        return [[PY, "-m", "fh_tasks", "worker", "bench.peers.fh_peer:tasks", "--db", self.db,
                 "--processes", str(procs), "--concurrency", str(CONCURRENCY), "--log-level", "warning"]]

    def close(self) -> None:
        if getattr(self, "hub", None) is not None: self.hub.store.close()
        self.hub = None


class FhTasksAsync(FhTasks):
    key = label = "fh-tasks-async"
    concurrency = f"as fh-tasks, with an `async def` task (runs on the worker's event loop, {CONCURRENCY} at once)"
    task = "bench.anoop"
    io_task = "bench.aio"
    measures = frozenset({"drain", "load"})


class FhTasksFull(FhTasks):
    key = label = "fh-tasks-full"
    concurrency = "as fh-tasks, with `durability=\"full\"` (fsync per commit, group commit)"
    measures = frozenset({"enqueue"})
    hub_kw = {"durability": "full"}


PEERS = {"fh-tasks": FhTasks, "fh-tasks-async": FhTasksAsync, "fh-tasks-full": FhTasksFull}
