"""The broker engines' write path on a real Redis: a worker's success goes out with its next job's `start` (one
write), or with its keeper's flush when no job follows; a new Dramatiq job's record and message go in one round trip,
the message exactly as Dramatiq's own enqueue writes it."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fh_tasks import Tasks
from fh_tasks.engine import EngineSettings
from fh_tasks.engines.status import StatusStore


def test_a_held_command_is_written_with_the_next_one_or_a_flush(status: StatusStore, namespace: str) -> None:
    # Given this thread's script connection and a command held back
    w, k1, k2 = status._wire(), status.key("w1"), status.key("w2")
    held = w.send("SET", k1, "1", defer=True)
    # Then nothing reached Redis yet
    assert status.redis.get(k1) is None and w.held == 1
    # When the next command is sent, both go, and the answers come back in order
    after = w.send("GET", k1)
    assert w.read(after) == "1" and w.read(held) in ("OK", b"OK", True) and w.held == 0
    # When a command is held and no other follows, a flush (the keeper's) writes it
    w.send("SET", k2, "2", defer=True)
    status.flush_held()
    assert status.redis.get(k2) == "2"
    # And reading a held command's answer writes it first
    t = w.send("INCR", k2, defer=True)
    assert w.read(t) == 3


PACKED = [("EVALSHA", "a" * 40, 1, "{fh}", "1764000000.123456", 100000, "w@host:12", 30.0, 3, 0.0, "", -5),
          ("SET", "k", 0.1 + 0.2), ("SET", "k", 1e-7), ("SET", "k", 2**70), ("SET", "k", "é☃ \r\n$3"),
          ("HSET", "k", "f", b"\x00\xff raw"), ("SET", "k", memoryview(b"view")), ("SET", "k", bytearray(b"ba"))]


@pytest.mark.parametrize("args", PACKED, ids=lambda a: type(a[-1]).__name__)
def test_a_command_is_packed_as_redis_py_packs_it(status: StatusStore, args: tuple[Any, ...]) -> None:
    from fh_tasks.engines import status as module
    conn = status._wire().conn
    # hiredis' packer where it takes the arguments, redis-py's otherwise: the same bytes either way
    assert b"".join(module._pack(conn, args)) == b"".join(conn.pack_command(*args))


def test_without_hiredis_commands_are_packed_by_redis_py(status: StatusStore, namespace: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from fh_tasks.engines import status as module
    assert module._hiredis_pack is not None  # the extras install it: the fast path is the one the tests run
    monkeypatch.setattr(module, "_hiredis_pack", None)
    w, k = status._wire(), status.key("nohiredis")
    assert w.read(w.send("SET", k, 1.5)) in ("OK", True) and status.redis.get(k) == "1.5"
    # a value neither packer takes is refused where it is sent, and the connection goes on
    import redis
    with pytest.raises(redis.exceptions.DataError): w.send("SET", k, None)
    monkeypatch.undo()
    with pytest.raises(redis.exceptions.DataError): w.send("SET", k, True)
    assert w.read(w.send("GET", k)) == "1.5"


@pytest.fixture
def hub(test_redis: str, namespace: str, tmp_path: Path) -> Iterator[Tasks]:
    from fh_tasks.engines.dramatiq import DramatiqEngine
    engine = DramatiqEngine(EngineSettings(broker=test_redis, db=str(tmp_path / "outbox.db"), workers=0, lease=30.0),
                            namespace=namespace)
    tasks = Tasks(engine=engine, workers=0)

    @tasks.task(name="wp.add")
    def add(a: int, b: int = 0) -> int:
        return a + b

    try: yield tasks
    finally:
        r = engine.status.redis
        for key in r.scan_iter(match=f"dramatiq:*{namespace}*", count=1000): r.delete(key)
        engine.status.clear()
        tasks.close()


def _state(hub: Tasks, id: str) -> str:
    rec = hub.engine.status.get(id)
    return "missing" if rec is None else rec.state.value


def test_a_success_goes_with_the_next_start_or_within_a_moment(hub: Tasks) -> None:
    # Given two stored jobs, run one after the other as a worker runs them (overlap: no wait for the outcome)
    e: Any = hub.engine
    add = hub.registry["wp.add"]
    a, b = (add.new_job((i,), {"b": 1}, add.options) for i in (1, 2))
    e.status.insert([a, b])
    assert e.run_job(a.id, "wp.add", [1], {"b": 1}, overlap=True) == "succeeded"
    # When the next job starts
    assert e.run_job(b.id, "wp.add", [2], {"b": 1}, overlap=True) == "succeeded"
    # Then the first one's success was written with it (and answered before it)
    rec = e.status.get(a.id)
    assert rec.state.value == "succeeded" and rec.result == 2
    # And the last one's, with no job after it, is written by the process's keeper within a moment
    deadline = time.monotonic() + 2.0
    while _state(hub, b.id) != "succeeded" and time.monotonic() < deadline: time.sleep(0.01)
    assert _state(hub, b.id) == "succeeded"


def test_a_new_dramatiq_job_is_one_message_as_dramatiq_writes_it(hub: Tasks, namespace: str) -> None:
    import dramatiq
    e: Any = hub.engine
    assert e._plain_enqueue  # the status store is the broker's Redis: record and message in one round trip
    # When a job is deferred outside a request
    job = hub.registry["wp.add"].defer(20, b=22)
    # Then its record is queued and exactly one message waits in its Dramatiq queue
    r, key = e.status.redis, f"dramatiq:{namespace}.default"
    ids = r.lrange(key, 0, -1)
    assert _state(hub, job.id) == "queued" and len(ids) == 1
    # And the message is what Dramatiq's own enqueue would have written
    m = dramatiq.Message.decode(r.hget(key + ".msgs", ids[0]).encode())
    assert (m.actor_name, m.queue_name, list(m.args), m.kwargs, m.message_id) == \
        ("wp.add", f"{namespace}.default", [20], {"b": 22}, job.id)
    assert m.options == {"redis_message_id": ids[0]}


def test_a_middleware_watching_enqueues_sees_each_message(hub: Tasks, namespace: str) -> None:
    import dramatiq
    seen: list[tuple[str, str]] = []

    class Watch(dramatiq.Middleware):
        def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
            seen.append((message.message_id, message.actor_name))

    e: Any = hub.engine
    e.broker.add_middleware(Watch())
    job = hub.registry["wp.add"].defer(1)
    assert seen == [(job.id, "wp.add")]
    assert e.status.redis.llen(f"dramatiq:{namespace}.default") == 1


def _unacked(hub: Tasks, namespace: str) -> set[str]:
    "The Redis message ids Dramatiq holds as fetched and not acked, in this test's queue (its `.msgs` hash)."
    return set(hub.engine.status.redis.hkeys(f"dramatiq:{namespace}.default.msgs"))


def test_a_jobs_ack_goes_with_the_next_start_or_within_a_moment(hub: Tasks, namespace: str) -> None:
    # Given two jobs' messages, taken by a Dramatiq consumer of the engine's broker, as a worker thread takes them
    e: Any = hub.engine
    add = hub.registry["wp.add"]
    a, b = add.defer(1), add.defer(2)
    consumer = e.broker.consume(f"{namespace}.default", prefetch=2)
    ma, mb = next(consumer), next(consumer)
    assert (ma.message_id, mb.message_id) == (a.id, b.id)
    # When the first one runs and Dramatiq acks it (the first job of this process starts its keeper thread)
    assert e.run_job(a.id, "wp.add", [1], {}, overlap=True) == "succeeded"
    consumer.ack(ma)
    # Then the ack is held for the thread's next script: the message still waits for it
    assert ma.options["redis_message_id"] in _unacked(hub, namespace)
    # When the next job starts, it goes with that `start` (and the success with it)
    assert e.run_job(b.id, "wp.add", [2], {}, overlap=True) == "succeeded"
    assert _unacked(hub, namespace) == {mb.options["redis_message_id"]}
    assert _state(hub, a.id) == "succeeded"
    # And the last ack, with no job after it, is written by the keeper within a moment
    consumer.ack(mb)
    deadline = time.monotonic() + 2.0
    while _unacked(hub, namespace) and time.monotonic() < deadline: time.sleep(0.01)
    assert _unacked(hub, namespace) == set() and _state(hub, b.id) == "succeeded"
    consumer.close()


def test_another_actors_message_is_acked_at_once_and_a_failed_held_ack_is_sent_again(hub: Tasks,
                                                                                    namespace: str) -> None:
    import dramatiq
    e: Any = hub.engine
    # Given a plain Dramatiq actor on the same broker (not an fh-tasks task) and a job, both sent
    other = dramatiq.actor(actor_name=f"plain_{namespace}", queue_name=f"{namespace}.default", broker=e.broker)(
        lambda: None)
    other.send()
    job = hub.registry["wp.add"].defer(3)
    consumer = e.broker.consume(f"{namespace}.default", prefetch=2)
    mo, mj = next(consumer), next(consumer)
    assert (mo.actor_name, mj.message_id) == (f"plain_{namespace}", job.id)
    # When the plain actor's message is acked, Dramatiq acks it at once
    consumer.ack(mo)
    assert mo.options["redis_message_id"] not in _unacked(hub, namespace)
    # When the job's held ack fails (Redis does not know the script it names: as after a restart)
    assert e.run_job(job.id, "wp.add", [3], {}, overlap=True) == "succeeded"
    script = e.broker.scripts["dispatch"]
    real, script.sha = script.sha, "0" * 40
    try:
        consumer.ack(mj)
        e.settle()
    finally: script.sha = real if script.sha == "0" * 40 else script.sha
    # Then it was acked again the plain way (Dramatiq's `do_ack` loads its script), and the job succeeded
    assert _unacked(hub, namespace) == set() and _state(hub, job.id) == "succeeded"
    consumer.close()


def test_a_new_job_whose_script_redis_forgot_is_stored_by_the_slower_path(hub: Tasks, namespace: str) -> None:
    # Given a producer that loaded its scripts, then a Redis that no longer knows the record's (as after a restart)
    e: Any = hub.engine
    add = hub.registry["wp.add"]
    add.defer(0)
    assert e.status._shas.get("insert") and e._dispatch_sha
    e.status._shas["insert"] = "0" * 40
    # When a job is deferred
    job = add.defer(5)
    # Then its record was written by the path that loads the scripts again, and a worker runs it once
    assert _state(hub, job.id) == "queued" and e.status._shas["insert"] != "0" * 40
    # (messages: the first job's, this one's sent with the refused script, and this one's sent again after it)
    assert e.status.redis.llen(f"dramatiq:{namespace}.default") == 3
    assert e.run_job(job.id, "wp.add", [5], {}) == "succeeded"
    assert e.run_job(job.id, "wp.add", [5], {}) == "dropped"  # the second copy of its message
    # And the thread's connection is fine for what comes next
    assert _state(hub, add.defer(6).id) == "queued"


def test_a_stopping_worker_writes_what_its_threads_held(hub: Tasks, namespace: str) -> None:
    # Given a job run as a worker thread runs it, whose success and ack wait for the thread's next script
    e: Any = hub.engine
    job = hub.registry["wp.add"].defer(2)
    consumer = e.broker.consume(f"{namespace}.default", prefetch=1)
    m = next(consumer)
    assert e.run_job(job.id, "wp.add", [2], {}, overlap=True) == "succeeded"
    e._keeper.stop()  # (its rounds would write and read them within a moment: here only the stop may)
    consumer.ack(m)
    assert len(e._answers) == 2  # the success and the ack, not read yet
    # When the worker stops (Dramatiq's `after_worker_shutdown`, for its own command's workers too)
    e.shutdown()
    # Then both were written and their answers read at once, not left to the keeper's next round
    assert not e._answers
    assert _state(hub, job.id) == "succeeded" and _unacked(hub, namespace) == set()
    consumer.close()
