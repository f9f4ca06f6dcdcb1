"""fh-tasks on the Celery engine (Redis broker and status store): the same no-op job as the plain `celery` peer, through
fh-tasks' `defer()`, outbox-free (outside a request), status store and Celery's own prefork worker."""
from __future__ import annotations

import os
import tempfile
from typing import Any

from fh_tasks import Tasks
from fh_tasks.engine import EngineSettings
from fh_tasks.engines.celery import CeleryEngine

from ..common import PY, flush_redis
from ..io_job import roundtrip
from ..probe import record
from . import Peer, job_arg
from .celery_peer import CeleryPeer, plain_app

DB = 8
URL = f"{os.environ.get('BENCH_REDIS', 'redis://127.0.0.1:6379')}/{DB}"


def make_hub(prefetch: int = 1) -> Tasks:
    """A hub on the Celery engine with the benchmark tasks (`bench.noop`; `bench.io`, one Redis round trip); its outbox
    file is a temporary one. `prefetch`: the engine's (1, its default; 4 is Celery's)."""
    db = os.path.join(tempfile.gettempdir(), f"fh-celery-bench-{os.getpid()}-{prefetch}.db")
    tasks = Tasks(engine=CeleryEngine(EngineSettings(broker=URL, db=db, workers=0), namespace="bench",
                                      prefetch=prefetch), workers=0)

    @tasks.task(name="bench.noop")
    def noop(arg: dict[str, Any]) -> None:
        record(arg)

    @tasks.task(name="bench.io")
    def io(arg: dict[str, Any]) -> None:
        roundtrip(arg)

    return tasks


#: The hub `fh-tasks worker bench.peers.fh_celery_peer:tasks` serves; `tasks_p4`: the same with prefetch ×4.
tasks = make_hub()
tasks_p4 = make_hub(prefetch=4)


class FhCelery(Peer):
    key, label = "fh-celery", "fh-tasks on Celery (Redis)"
    concurrency = ("`fh-tasks worker --concurrency 1`: Celery's prefork worker, one pool child (2 processes: `-c 2`), "
                   "prefetch ×1 with late acks (fh-tasks' setting)")
    batch_api = "`engine.submit(list)`: one status-store script and one producer per batch"
    measures = frozenset({"enqueue", "drain", "pickup"})
    prefetch, served = 1, "tasks"  # the engine's prefetch; the module's hub the worker serves

    def reset(self) -> None:
        self.close()
        self.rep += 1
        flush_redis(URL)
        self.hub = make_hub(prefetch=self.prefetch)
        self.t = self.hub.registry["bench.io" if self.io else "bench.noop"]

    def put(self, arg: dict[str, Any]) -> None:
        self.t.defer(arg)

    def put_batches(self, n: int, size: int) -> bool:
        t, engine = self.t, self.hub.engine
        for start in range(0, n, size):
            engine.submit([t.new_job((job_arg(),), {}, t.options) for _ in range(min(size, n - start))])
        return True

    def worker_commands(self, procs: int) -> list[list[str]]:
        return [[PY, "-m", "fh_tasks", "worker", f"bench.peers.fh_celery_peer:{self.served}", "--concurrency",
                 str(procs), "--log-level", "warning"]]

    def close(self) -> None:
        if getattr(self, "hub", None) is not None: self.hub.close()
        self.hub = None


class FhCeleryPrefetch(FhCelery):
    "fh-tasks on Celery with `CeleryEngine(prefetch=4)`: Celery's own prefetch, late acks."
    key, label = "fh-celery-p4", "fh-tasks on Celery (Redis), prefetch ×4"
    concurrency = ("`fh-tasks worker --concurrency 1` with `CeleryEngine(prefetch=4)`: one pool child, prefetch ×4 "
                   "(Celery's default) with late acks")
    prefetch, served = 4, "tasks_p4"


#: Celery set up as fh-tasks sets it up: late acks, prefetch ×1.
LATE_ACKS = {"task_acks_late": True, "worker_prefetch_multiplier": 1}

_REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
#: `celery-late`: how much of the difference between `celery` and `fh-celery` is that configuration, and how much is
#: fh-tasks' status store. Redis database 6 (7: fh-dramatiq).
LATE = f"{_REDIS}/6"
late, late_noop, late_io = plain_app("bench-late", LATE, task_ignore_result=True, **LATE_ACKS)
#: `celery-status`: the same, giving what a Celery user sets up for status that every host reads: a Redis result
#: backend with `task_track_started` (a STARTED record written before the task runs, the result or error after).
#: fh-tasks' status store does that and more (progress, events, listing, attempt counts); this pair shows what its
#: layer costs over Celery's own way of recording status. Redis database 5.
STATUS = f"{_REDIS}/5"
status, status_noop, status_io = plain_app("bench-status", STATUS, backend=STATUS, task_ignore_result=False,
                                           task_track_started=True, task_serializer="json", result_serializer="json",
                                           accept_content=["json"], **LATE_ACKS)


class CeleryLate(CeleryPeer):
    key, label = "celery-late", "Celery (Redis), late acks, prefetch ×1"
    concurrency = "`celery worker -P prefork -c 1` (2 processes: `-c 2`), `acks_late=True`, prefetch ×1"
    measures = frozenset({"enqueue", "drain", "pickup"})
    url, app, tasks = LATE, "bench.peers.fh_celery_peer:late", (late_noop, late_io)


class CeleryStatus(CeleryLate):
    key, label = "celery-status", "Celery (Redis), late acks, prefetch ×1, Redis result backend, track started"
    concurrency = ("`celery worker -P prefork -c 1` (2 processes: `-c 2`), `acks_late=True`, prefetch ×1, "
                   "`task_track_started=True`, results in Redis")
    url, app, tasks = STATUS, "bench.peers.fh_celery_peer:status", (status_noop, status_io)


PEERS = {"fh-celery": FhCelery, "fh-celery-p4": FhCeleryPrefetch, "celery-late": CeleryLate,
         "celery-status": CeleryStatus}
