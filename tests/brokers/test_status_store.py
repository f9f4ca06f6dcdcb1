"""The status store of the broker engines, on a real Redis: each transition script moves a job forward only, fenced
by attempt; the indexes list, page and count; retention; the event stream a subscriber resumes after a reconnect."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

from fh_tasks.engines.status import CRASH_ATTEMPTS, StatusStore
from fh_tasks.events import JobEvent
from fh_tasks.records import JobState, NewJob
from fh_tasks.task import new_id


def job(task: str = "t.echo", *, delay: float = 0.0, parent: str | None = None, max_attempts: int = 1,
        queue: str = "default") -> NewJob:
    now = time.time()
    return NewJob(id=new_id(), task=task, args=json.dumps([[1], {}]), queue=queue, max_attempts=max_attempts,
                  timeout=None, run_at=now + delay, created_at=now, parent=parent)


def state(s: StatusStore, id: str) -> str:
    rec = s.get(id)
    return "missing" if rec is None else rec.state.value


def err(msg: str) -> str:
    return json.dumps({"type": "ValueError", "message": msg})


def test_insert_is_idempotent_and_a_job_runs_once_per_attempt(status: StatusStore) -> None:
    # Given a stored job (deferred by a session), stored again (a relay sending it twice)
    j = job()
    j.owner = "session-token"
    assert status.insert([j]) == [(j.id, "queued", True)]
    assert status.insert([j]) == [(j.id, "queued", False)]
    # When two copies of its message arrive
    first, copy = status.start(j.id, "w1", 30), status.start(j.id, "w2", 30)
    # Then the first runs as attempt 1; the copy is refused while that attempt's lease is live
    assert (first.run, first.attempt, first.max_attempts) == (True, 1, 1)
    assert (copy.run, copy.why) == (False, "running")
    # And the outcome of the attempt is recorded once; a late copy, a second outcome are refused
    assert status.succeed(j.id, 1, "42") == (True, [])
    assert status.succeed(j.id, 1, "43") == (False, [])
    assert status.fail(j.id, 1, err("late")) is False
    late = status.start(j.id, "w3", 30)
    assert (late.run, late.why) == (False, "succeeded")
    rec = status.get(j.id)
    assert rec is not None and (rec.state, rec.attempts, rec.result, rec.worker) == (JobState.succeeded, 1, 42, "w1")
    assert status.counts() == {"succeeded": 1}
    # And the record keeps who deferred it (the status routes show a job to its owner)
    assert rec.owner == "session-token" and status.summary(j.id).owner == "session-token"  # type: ignore[union-attr]


def test_an_attempt_that_lost_its_lease_is_fenced_out(status: StatusStore) -> None:
    # Given a job whose first attempt's lease ran out (its worker died), and a second attempt that took it
    j = job(max_attempts=1)
    status.insert([j])
    assert status.start(j.id, "dead", 0.01).attempt == 1
    time.sleep(0.05)
    second = status.start(j.id, "alive", 30)
    assert (second.run, second.attempt) == (True, 2)
    # When the first attempt comes back with an outcome, progress or a lease renewal, Then each is refused
    assert status.fail(j.id, 1, err("first")) is False
    assert status.retry(j.id, 1, err("first"), time.time(), publish_now=True) == (False, None)
    assert status.renew([(j.id, 1), (j.id, 2)], 30) == [(j.id, 1)]
    status.record_progress(j.id, 1, '"stale"')
    status.record_progress(j.id, 2, '"fresh"')
    assert status.flush_progress() == 1
    assert status.record_progress(j.id, 1, '"again"') is False  # known stale now: not even buffered
    # And the second attempt's outcome stands
    assert status.succeed(j.id, 2, "null")[0]
    rec = status.get(j.id)
    assert rec is not None and (rec.state, rec.attempts, rec.progress) == (JobState.succeeded, 2, "fresh")


def test_a_job_whose_workers_keep_dying_fails_after_the_crash_attempts(status: StatusStore) -> None:
    # Given a job whose every attempt loses its worker
    j = job()
    status.insert([j])
    for attempt in range(1, CRASH_ATTEMPTS + 1):
        st = status.start(j.id, f"w{attempt}", 0.01)
        assert (st.run, st.attempt) == (True, attempt)
        time.sleep(0.03)
    # When it is delivered once more, Then it fails for good (WorkerLost) instead of running again
    last = status.start(j.id, "w-last", 30)
    assert (last.run, last.lost) == (False, True)
    rec = status.get(j.id)
    assert rec is not None and rec.state == JobState.failed and rec.attempts == CRASH_ATTEMPTS
    assert rec.error is not None and rec.error["type"] == "WorkerLost"
    assert status.start(j.id, "w", 30).why == "failed"


def test_retries_and_delays_wait_in_the_due_set_not_in_the_broker(status: StatusStore) -> None:
    # Given a job deferred 0.3 s ahead, and one whose first attempt failed with a 0.3 s backoff
    later, flaky = job(delay=0.3), job(max_attempts=2)
    status.insert([later, flaky])
    status.start(flaky.id, "w", 30)
    ok, due = status.retry(flaky.id, 1, err("boom"), time.time() + 0.3, publish_now=False)
    assert ok and due is not None and due.id == flaky.id
    assert (state(status, later.id), state(status, flaky.id)) == ("scheduled", "retrying")
    # When a stray copy of either arrives early, Then it is refused (not due), and neither is due for publishing yet
    assert status.start(later.id, "w", 30).why == "not due" and status.start(flaky.id, "w", 30).why == "not due"
    assert status.take_due() == []
    # When their time comes, Then the pump takes both, once
    time.sleep(0.35)
    assert {d.id for d in status.take_due()} == {later.id, flaky.id}
    assert status.take_due() == []
    # And each then runs as its next attempt, keeping the last error until it succeeds
    assert status.start(later.id, "w", 30).attempt == 1
    assert status.start(flaky.id, "w", 30).attempt == 2
    rec = status.get(flaky.id)
    assert rec is not None and rec.error is not None and rec.error["message"] == "boom"
    status.succeed(flaky.id, 2, "1")
    rec = status.get(flaky.id)
    assert rec is not None and rec.error is None and rec.result == 1


def test_a_running_job_whose_lease_ran_out_is_due_again(status: StatusStore) -> None:
    # Given a running job whose worker stopped renewing its lease, and one whose worker keeps renewing it
    dead, alive = job(), job()
    status.insert([dead, alive])
    status.start(dead.id, "w1", 0.1)
    status.start(alive.id, "w2", 0.1)
    # When its lease runs out, Then the pump publishes it again; the renewed one is not taken
    for _ in range(4):
        time.sleep(0.05)
        assert status.renew([(alive.id, 1)], 0.1) == []
    assert [d.id for d in status.take_due()] == [dead.id]
    # And a process that knows its worker died ends the lease at once
    assert status.lost(alive.id) is True
    assert [d.id for d in status.take_due()] == [alive.id]


def test_chained_jobs_run_in_order_and_a_failure_cancels_the_rest(status: StatusStore) -> None:
    # Given a chain a -> b -> c, and a second chain x -> y
    a = job()
    b, c = job(parent=a.id), None
    c = job(parent=b.id)
    x = job()
    y = job(parent=x.id)
    status.insert([a, b, c, x, y])
    assert [state(status, j.id) for j in (a, b, c, x, y)] == ["queued", "waiting", "waiting", "queued", "waiting"]
    # When a succeeds, Then b is released (and handed back to publish), c still waits
    status.start(a.id, "w", 30)
    ok, released = status.succeed(a.id, 1, "null")
    assert ok and [d.id for d in released] == [b.id] and released[0].task == "t.echo"
    assert [state(status, j.id) for j in (b, c)] == ["queued", "waiting"]
    # When x fails, Then y is cancelled, with the reason
    status.start(x.id, "w", 30)
    assert status.fail(x.id, 1, err("no"))
    rec = status.get(y.id)
    assert rec is not None and rec.state == JobState.cancelled and rec.error is not None
    assert x.id in rec.error["message"]
    # And a job chained after one that already failed is cancelled as it is stored
    z = job(parent=x.id)
    assert status.insert([z]) == [(z.id, "cancelled", True)]


def test_cancel_and_requeue(status: StatusStore) -> None:
    # Given a queued job and a running one
    q, r = job(), job()
    status.insert([q, r])
    status.start(r.id, "w", 30)
    # When both are cancelled, Then only the queued one is (a running job is not cancelled)
    assert status.cancel(q.id) is True and status.cancel(r.id) is False and status.cancel(q.id) is False
    assert status.start(q.id, "w", 30).why == "cancelled"
    # When it is requeued, Then it is queued with fresh attempts and handed back to publish; a running job is not
    due = status.requeue(q.id)
    assert due is not None and due.id == q.id and status.requeue(r.id) is None
    rec = status.get(q.id)
    assert rec is not None and (rec.state, rec.attempts, rec.error, rec.finished_at) == (JobState.queued, 0, None, None)
    assert status.start(q.id, "w", 30).attempt == 1
    # And cancel_running cancels a running job only: its attempt finds out, and its outcome is refused
    waiting = job()
    status.insert([waiting])
    assert status.cancel_running(waiting.id) is False
    assert status.cancel_running(r.id) is True and status.cancel_running(r.id) is False
    assert status.cancelled_among([(r.id, 1), (q.id, 1)]) == [(r.id, 1)] and status.is_cancelled(r.id, 1)
    assert status.succeed(r.id, 1, "null") == (False, [])
    rec = status.get(r.id)
    assert rec is not None and rec.state == JobState.cancelled and rec.error is not None


def test_listing_paging_and_counts(status: StatusStore) -> None:
    # Given jobs of two tasks in several states, created in order
    jobs = [job("t.a"), job("t.b"), job("t.a"), job("t.b", delay=60), job("t.a")]
    for j in jobs:
        status.insert([j])
        time.sleep(0.002)
    status.start(jobs[0].id, "w", 30)
    status.succeed(jobs[0].id, 1, "null")
    ids = [j.id for j in jobs]
    # Then lists are newest first, filtered by state, by task, by both, and paged
    assert [r.id for r in status.jobs()] == ids[::-1]
    assert [r.id for r in status.jobs(task="t.a")] == [ids[4], ids[2], ids[0]]
    assert [r.id for r in status.jobs(state="queued", task="t.a")] == [ids[4], ids[2]]
    assert [r.id for r in status.jobs(state="queued", limit=1, offset=1)] == [ids[2]]
    assert [r.id for r in status.jobs(state="scheduled")] == [ids[3]]
    assert status.jobs(state="unknown") == [] and status.jobs(task="t.none") == []
    assert status.counts() == {"queued": 3, "scheduled": 1, "succeeded": 1}
    # And a summary leaves the arguments and result out
    s = status.summary(ids[0])
    assert s is not None and (s.state, s.args, s.result) == (JobState.succeeded, [], None)
    assert status.summary("0" * 32) is None and status.get("0" * 32) is None


def test_retention_expires_final_records_and_prune_deletes_them_with_their_entries(status: StatusStore) -> None:
    # Given a finished job and a queued one
    done, waiting = job(), job()
    status.insert([done, waiting])
    status.start(done.id, "w", 30)
    status.succeed(done.id, 1, "null")
    # Then the finished record expires after the retention period (and a margin); the queued one never does
    ttl = status.redis.ttl(status.key("job", done.id))
    assert 3600 < ttl <= 3600 + 86_400 and status.redis.ttl(status.key("job", waiting.id)) == -1
    # When jobs finished before now are pruned, Then the finished one is gone from every index
    assert status.prune(time.time() + 1) == 1
    assert status.get(done.id) is None and [r.id for r in status.jobs()] == [waiting.id]
    assert status.counts() == {"queued": 1} and status.jobs(task="t.echo") == [status.get(waiting.id)]


def test_events_in_order_and_a_subscriber_that_reconnects_misses_nothing(status: StatusStore) -> None:
    # Given a subscriber of the store's event stream
    got: list[JobEvent] = []
    lock = threading.Lock()

    def publish(evs: list[JobEvent]) -> None:
        with lock: got.extend(evs)

    feed = status.feed()
    feed.start(publish)
    try:
        # When a job runs, reporting progress
        a = job()
        status.insert([a])
        status.start(a.id, "w", 30)
        status.record_progress(a.id, 1, json.dumps({"done": 1}))
        status.flush_progress()
        status.succeed(a.id, 1, "null")
        _wait(lambda: len(got) >= 4)
        # And the subscriber's connection is killed while another job is stored
        killed = [status.redis.client_kill_filter(_id=c["id"]) for c in status.redis.client_list()
                  if c.get("name") == f"fh-tasks-events-{status.namespace}"]
        assert killed, "the subscriber's connection was not found"
        b = job()
        status.insert([b])
        _wait(lambda: any(e.id == b.id for e in got))
    finally:
        feed.stop()
    # Then every event arrived, in order, with the job's state, attempt and progress at that moment
    kinds = [(e.kind, e.state, e.attempt, e.progress) for e in got if e.id == a.id]
    assert kinds == [("stored", "queued", 0, None), ("started", "running", 1, None),
                     ("progress", "running", 1, {"done": 1}), ("succeeded", "succeeded", 1, {"done": 1})]
    assert [e.kind for e in got if e.id == b.id] == ["stored"]
    seqs, ats = [e.seq for e in got], [e.at for e in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and ats == sorted(ats)


def test_progress_is_coalesced_and_the_last_value_is_written_with_the_outcome(status: StatusStore) -> None:
    # Given a running job that reports progress many times, never flushed
    j = job()
    status.insert([j])
    status.start(j.id, "w", 30)
    for i in range(1000): assert status.record_progress(j.id, 1, json.dumps({"done": i}))
    assert status.progress_pending() == 1
    # When it succeeds, Then its last progress is stored with the outcome, as one progress event
    status.succeed(j.id, 1, "null")
    rec = status.get(j.id)
    assert rec is not None and rec.progress == {"done": 999}
    events = [f for _, f in status.redis.xrange(status.key("events"))]
    assert [f["kind"] for f in events] == ["stored", "started", "progress", "succeeded"]


def test_threads_that_start_together_each_get_their_script_connection(status: StatusStore) -> None:
    errors: list[BaseException] = []

    def calls(gate: threading.Barrier | None) -> None:
        if gate is not None: gate.wait()
        try: status.take_due()
        except BaseException as e: errors.append(e)

    def run(threads: list[threading.Thread]) -> None:
        for t in threads: t.start()
        for t in threads: t.join()

    for _ in range(5):
        # Given the script connections of threads that have ended (a worker's threads come and go)
        ended = [threading.Thread(target=calls, args=(None,)) for _ in range(40)]
        run(ended)
        # When many new threads make their first status call at the same moment (each one, making its connection,
        # forgets those of the threads that ended; the system may give one of them the id of an ended thread)
        gate = threading.Barrier(16)
        run([threading.Thread(target=calls, args=(gate,)) for _ in range(16)])
        # Then every call succeeds, and the connections of the threads that ended are gone
        assert errors == []
        assert not any(w.thread in ended for w in status._wires.values())


def test_a_success_held_by_a_thread_that_ended_is_written_when_its_connection_is_forgotten(
        status: StatusStore) -> None:
    # Given a running job whose success a thread held back for its next script (a worker thread's overlap), and
    # the thread ended before writing it
    j = job()
    status.insert([j])
    assert status.start(j.id, "w", 30).run
    reads: list[Any] = []
    t = threading.Thread(target=lambda: reads.append(status.succeed_soon(j.id, 1, "null", defer=True)))
    t.start()
    t.join()
    assert state(status, j.id) == "running"
    # When another thread makes its script connection (forgetting those of the threads that ended)
    other = threading.Thread(target=status.take_due)
    other.start()
    other.join()
    # Then the held success is written, and its answer can still be read
    _wait(lambda: state(status, j.id) == "succeeded")
    assert reads[0]() == (True, [])


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
