"""Job events: every change of a job's state, attempt or progress, delivered to subscribers in any process.

An engine announces changes through an `EventFeed` (the SQLite engine reads its store's change sequence,
see `store/feed.py`; the broker engines read the status store's stream, see `engines/status_feed.py`), both run by
one thread (`ThreadFeed`). The `EventBus` runs the feed only while somebody listens, and hands each event to
callbacks (`subscribe`) and to async iterators (`stream`). Subscribers get the changes made after they
subscribed; the current state of a job is always `tasks.get(id)`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["JobEvent", "EventFeed", "ThreadFeed", "EventBus", "KINDS", "FINAL_KINDS"]

log = logging.getLogger("fh_tasks.events")

#: What happened to the job: stored (deferred), started (an attempt began), progress, queued (back in the
#: queue: released at shutdown, its worker lost, retried by hand, or its chain moved on), retrying (an attempt
#: failed and another follows after a backoff), succeeded, failed, cancelled.
KINDS = ("stored", "started", "progress", "queued", "retrying", "succeeded", "failed", "cancelled")
FINAL_KINDS = frozenset({"succeeded", "failed", "cancelled"})
#: Events an async stream holds for a slow consumer before it drops the oldest.
STREAM_BUFFER = 10_000


@dataclass(frozen=True, slots=True)
class JobEvent:
    "One change of one job. `seq` orders the events of one store; `at` is the time of the change (Unix seconds)."
    seq: int
    id: str
    task: str
    kind: str
    state: str
    attempt: int
    progress: Any
    at: float

    @property
    def final(self) -> bool:
        "True when the job ended with this event (succeeded, failed or cancelled)."
        return self.kind in FINAL_KINDS


class EventFeed(Protocol):
    "What an engine provides to announce changes: started when the first subscriber comes, stopped after the last."

    def start(self, publish: Callable[[list[JobEvent]], None]) -> None:
        "Begin calling `publish` (from any thread) with the events that happen from now on, in order."

    def stop(self) -> None:
        "Stop publishing and release what `start` took."


class ThreadFeed(ABC):
    """An `EventFeed` run by one daemon thread: `start` starts it (again: nothing, until `stop`), `stop` sets `_stop`
    (the thread's loop watches it) and joins the thread, unless the thread itself stops the feed (a subscriber's
    callback); a stopped feed may be started again. A subclass gives `_prepare`, and `_stopped` to release more."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, publish: Callable[[list[JobEvent]], None]) -> None:
        if self._thread is not None: return
        run = self._prepare(publish)
        self._stop.clear()
        self._thread = threading.Thread(target=run, name="fh-tasks-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        th, self._thread = self._thread, None
        if th is None: return
        self._stop.set()
        if th is not threading.current_thread(): th.join(5)
        self._stopped()

    @abstractmethod
    def _prepare(self, publish: Callable[[list[JobEvent]], None]) -> Callable[[], None]:
        "In the caller of `start`: take what the feed needs (where to read from), and return what its thread runs."

    def _stopped(self) -> None:  # noqa: B027 (an optional hook: nothing to release by default)
        "After `stop` ended the thread (not when none ran)."


Callback = Callable[[JobEvent], Any]


class EventBus:
    "Fans the events of one feed out to callbacks and async streams; thread-safe."

    def __init__(self, feed: EventFeed | None) -> None:
        self.feed = feed
        self._lock = threading.Lock()
        self._subs: dict[int, tuple[Callback, frozenset[str] | None]] = {}
        self._next = 0
        self._running = False

    @property
    def available(self) -> bool:
        "False when the engine announces no events."
        return self.feed is not None

    def subscribe(self, callback: Callback, *, jobs: Collection[str] | None = None) -> Callable[[], None]:
        """Call `callback(event)` for every event from now on (of `jobs` only, if given); returns `unsubscribe`.

        Callbacks run in the feed's thread, in order: keep them short. An exception is logged and skipped.
        """
        if self.feed is None: raise RuntimeError("this engine announces no job events")
        with self._lock:
            key, self._next = self._next, self._next + 1
            self._subs[key] = (callback, frozenset(jobs) if jobs is not None else None)
            if not self._running:
                self.feed.start(self.publish)
                self._running = True

        def unsubscribe() -> None:
            with self._lock:
                if self._subs.pop(key, None) is not None and not self._subs and self._running and self.feed:
                    self.feed.stop()
                    self._running = False

        return unsubscribe

    def publish(self, events: Iterable[JobEvent]) -> None:
        "Deliver `events` to every subscriber (the feed calls this)."
        with self._lock: subs = list(self._subs.values())
        for ev in events:
            for cb, jobs in subs:
                if jobs is not None and ev.id not in jobs: continue
                try: cb(ev)
                except Exception: log.exception("job event subscriber %r failed on %s %s", cb, ev.kind, ev.id)

    async def stream(self, jobs: Collection[str] | None = None, *, until_final: bool = False,
                     final_now: Callable[[Collection[str]], Iterable[str]] | None = None) -> AsyncIterator[JobEvent]:
        """Yield events as they happen, on the running loop. With `until_final`, stop once every job in `jobs`
        has ended (needs `jobs`); `final_now(jobs)`, called once subscribed, names the jobs that already had.
        Closing the iterator unsubscribes."""
        if until_final and not jobs: raise ValueError("until_final=True needs the jobs to wait for")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        dropped = [0]

        def put(ev: JobEvent) -> None:
            if queue.qsize() >= STREAM_BUFFER:
                queue.get_nowait()
                dropped[0] += 1
                if dropped[0] == 1: log.warning("a job event stream is not keeping up; dropping its oldest events")
            queue.put_nowait(ev)

        def from_feed(ev: JobEvent) -> None:
            try: loop.call_soon_threadsafe(put, ev)
            except RuntimeError: pass  # the stream's loop is closed

        open_jobs = set(jobs) if until_final and jobs else set()
        unsubscribe = self.subscribe(from_feed, jobs=jobs)
        try:
            if until_final and final_now is not None: open_jobs.difference_update(final_now(open_jobs))
            while open_jobs or not until_final:
                ev = await queue.get()
                yield ev
                if until_final and ev.final:
                    open_jobs.discard(ev.id)
                    if not open_jobs: return
        finally:
            unsubscribe()

    def close(self) -> None:
        "Stop the feed and forget every subscriber."
        with self._lock:
            self._subs.clear()
            if self._running and self.feed: self.feed.stop()
            self._running = False
