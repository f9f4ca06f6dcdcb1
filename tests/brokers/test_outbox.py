"""The outbox relay on a real SQLite file: commits before anything is sent, sends in order, stops at the first job
it cannot send and goes on from there, gives up a job that keeps failing for another reason than a broker down,
and two relays sharing the file never send a job together. `send` is a function of the test (the engine's is
exercised with real brokers in test_celery_engine.py)."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from fh_tasks.engines.outbox import MAX_TRIES, Outbox
from fh_tasks.errors import QueueUnavailable
from fh_tasks.records import NewJob
from fh_tasks.task import new_id


def jobs(n: int) -> list[NewJob]:
    now = time.time()
    return [NewJob(id=new_id(), task="t.echo", args=json.dumps([[i], {}]), created_at=now, run_at=now)
            for i in range(n)]


class Broker:
    "What the relay hands jobs to: keeps them in order; `down` refuses all, `poison` refuses one id for good."

    def __init__(self) -> None:
        self.got: list[str] = []
        self.down = False
        self.poison: set[str] = set()
        self.lock = threading.Lock()

    def send(self, batch: list[NewJob]) -> tuple[int, BaseException | None]:
        with self.lock:
            for i, j in enumerate(batch):
                if self.down: return i, QueueUnavailable("the broker cannot be reached")
                if j.id in self.poison: return i, ValueError(f"cannot encode {j.id}")
                self.got.append(j.id)
            return len(batch), None


def test_jobs_wait_while_the_broker_is_down_and_go_out_in_order_once_it_is_back(tmp_path: Path) -> None:
    # Given an outbox whose broker is down
    broker = Broker()
    broker.down = True
    box = Outbox(str(tmp_path / "o.db"), "celery:t", broker.send, relay=False)
    first, second = jobs(3), jobs(2)
    # When jobs are added, and the relay tries
    first[0].owner = "session-token"
    box.add(first)
    assert box.relay_once() == 0
    box.add(second)
    # Then they are committed and pending, in order, with the error kept and a backoff set
    assert [j.id for j in box.pending_jobs()] == [j.id for j in first + second]
    assert box.pending(first[0].id) == first[0] and box.pending("0" * 32) is None
    assert box.backoff > 0 and "cannot be reached" in (box.last_error or "")
    # When the broker is back, Then one pass sends them all, in the order they were added, and none is pending
    broker.down = False
    assert box.relay_once() == 5
    assert broker.got == [j.id for j in first + second] and box.pending_jobs() == []
    assert box.backoff == 0 and box.last_error is None
    box.close()


def test_the_relay_stops_at_the_first_failure_so_no_job_overtakes_another(tmp_path: Path) -> None:
    # Given five jobs, the third of which the broker refuses (once it is down)
    broker = Broker()
    box = Outbox(str(tmp_path / "o.db"), "celery:t", broker.send, relay=False)
    js = jobs(5)
    box.add(js)
    sent_before = broker.send

    def flaky(batch: list[NewJob]) -> tuple[int, BaseException | None]:
        n, err = sent_before(batch[:2])
        return n, err or QueueUnavailable("connection reset")

    box.send = flaky
    # When the relay runs, Then the first two went out and the rest wait, the third first
    assert box.relay_once() == 2
    assert [j.id for j in box.pending_jobs()] == [j.id for j in js[2:]]
    # And the next pass goes on from the third
    box.send = broker.send
    assert box.relay_once() == 3 and broker.got == [j.id for j in js]
    box.close()


def test_a_job_that_keeps_failing_is_given_up_and_the_rest_go_on(tmp_path: Path) -> None:
    # Given a job the broker refuses for a reason of its own (not being down), between two good ones
    broker = Broker()
    box = Outbox(str(tmp_path / "o.db"), "celery:t", broker.send, relay=False)
    a, bad, c = jobs(3)
    broker.poison.add(bad.id)
    box.add([a, bad, c])
    # When the relay has tried it MAX_TRIES times, and passes once more
    for _ in range(MAX_TRIES + 1): box.relay_once()
    # Then it is given up (kept in the table, marked dead, with its error), and the job after it was sent
    assert broker.got == [a.id, c.id] and box.pending_jobs() == []
    with sqlite3.connect(tmp_path / "o.db") as db:
        row = db.execute("SELECT dead, tries, error FROM fh_outbox WHERE id = ?", (bad.id,)).fetchone()
    assert row[0] == 1 and row[1] == MAX_TRIES and "cannot encode" in row[2]
    box.close()


def test_two_relays_on_one_file_never_send_a_job_twice(tmp_path: Path) -> None:
    # Given two processes' outboxes on one file (two web workers), each relaying at once, and many jobs
    broker = Broker()
    boxes = [Outbox(str(tmp_path / "o.db"), "celery:t", broker.send, relay=False) for _ in range(2)]
    js = jobs(400)
    for i in range(0, 400, 20): boxes[i // 20 % 2].add(js[i:i + 20])
    # When both relays drain it concurrently
    threads = [threading.Thread(target=b.drain) for b in boxes]
    for t in threads: t.start()
    for t in threads: t.join(30)
    # Then every job was sent exactly once
    assert sorted(broker.got) == sorted(j.id for j in js) and len(broker.got) == 400
    for b in boxes: b.close()


def test_an_outbox_of_another_engine_or_namespace_is_left_alone(tmp_path: Path) -> None:
    # Given two engines' outboxes in one file
    broker_a, broker_b = Broker(), Broker()
    a = Outbox(str(tmp_path / "o.db"), "celery:shop", broker_a.send, relay=False)
    b = Outbox(str(tmp_path / "o.db"), "dramatiq:shop", broker_b.send, relay=False)
    ja, jb = jobs(2), jobs(3)
    a.add(ja)
    b.add(jb)
    # When each relays, Then each sends its own jobs only
    assert (a.relay_once(), b.relay_once()) == (2, 3)
    assert broker_a.got == [j.id for j in ja] and broker_b.got == [j.id for j in jb]
    a.close()
    b.close()


def test_the_relay_thread_sends_what_a_crashed_process_left(tmp_path: Path) -> None:
    # Given jobs a process committed to the outbox and never sent (it crashed before its relay ran)
    dead = Outbox(str(tmp_path / "o.db"), "celery:t", Broker().send, relay=False)
    js = jobs(3)
    dead._write("INSERT INTO fh_outbox (id, engine, job, created_at) VALUES (?, ?, ?, ?)",
                [(j.id, "celery:t", json.dumps({"id": j.id, "task": j.task, "args": j.args, "queue": j.queue,
                                                "max_attempts": 1, "timeout": None, "run_at": j.run_at,
                                                "created_at": j.created_at, "parent": None}), j.created_at)
                 for j in js], many=True)
    # When the next process starts its relay, Then it sends them within a second or so
    broker = Broker()
    box = Outbox(str(tmp_path / "o.db"), "celery:t", broker.send)
    box.start()
    deadline = time.monotonic() + 5
    while len(broker.got) < 3 and time.monotonic() < deadline: time.sleep(0.02)
    assert broker.got == [j.id for j in js]
    box.close()
    dead.close()
