"""Enqueue throughput: one producer, one call per job and with each library's bulk API (no worker running)."""
from __future__ import annotations

import time
from typing import Any

from .common import Settings, log, stat
from .peers import Peer


def measure(peer: Peer, s: Settings) -> dict[str, Any]:
    "Jobs/s for `s.enqueue_single` single enqueues and `s.enqueue_batch` jobs in batches of `s.batch_size`."
    single, batch = [], []
    for _ in range(s.reps):
        peer.reset()
        t0 = time.perf_counter()
        peer.put_many(s.enqueue_single)
        single.append(s.enqueue_single / (time.perf_counter() - t0))
        peer.reset()
        t0 = time.perf_counter()
        if peer.put_batches(s.enqueue_batch, s.batch_size):
            batch.append(s.enqueue_batch / (time.perf_counter() - t0))
    peer.close()
    out = {"single": stat(single), "batch": stat(batch), "batch_api": peer.batch_api or None}
    log(f"  enqueue {peer.label:16} single {out['single']['median']:>9,.0f}/s   batch "
        + (f"{out['batch']['median']:>9,.0f}/s" if batch else "      n/a"))
    return out
