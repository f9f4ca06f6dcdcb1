"""Values and rows that cannot be stored or run: each fails its own job with a clear error, and everything else
goes on (the neighbouring jobs, later commits, the requests of the app)."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from contextlib import closing
from typing import Any

import pytest
from fasthtml.common import P
from integration_support import wait_until
from starlette.testclient import TestClient

from fh_tasks import ArgumentError, PayloadTooLarge, Retry
from fh_tasks.encoding import MAX_DEPTH, MAX_PROGRESS, encode_progress
from fh_tasks.store import Outcome
from fh_tasks.testing import drain

#: What `os.fsdecode` gives for a file name that is not UTF-8: a lone surrogate at position 3.
NOT_UTF8 = os.fsdecode(b"caf\xff")


def nested(depth: int, leaf: Any = 1) -> Any:
    "A list `depth` levels deep."
    v = leaf
    for _ in range(depth): v = [v]
    return v


class Unlistable(dict):
    "A dict whose items cannot be read: encoding it raises something else than the encoder's own errors."
    def items(self): raise RuntimeError("no items today")  # type: ignore[override]


def put_row(db: str, **cols: Any) -> str:
    "Write a job row with SQL, as another program could: `cols` as given (any SQLite type), the rest as usual."
    now = time.time() - 1  # due before the jobs deferred next: claimed in the same batch, first
    row = {"id": uuid.uuid4().hex, "task": "echo", "queue": "default", "args": '{"args": [1]}', "state": "queued",
           "max_attempts": 1, "run_at": now, "created_at": now, **cols}
    with closing(sqlite3.connect(db)) as c, c:
        c.execute(f"INSERT INTO fh_jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    return str(row["id"])


def stored(db: str, id: str) -> dict[str, Any]:
    "A row as stored, read with plain sqlite3."
    with closing(sqlite3.connect(db)) as c:
        c.row_factory, c.text_factory = sqlite3.Row, lambda b: b.decode("utf-8", "replace")
        return dict(c.execute("SELECT * FROM fh_jobs WHERE id = ?", (id,)).fetchone())


def refuse_results(db: str, result: str, how: str) -> None:
    "A trigger that makes SQLite refuse to record `result` as a job's result (RAISE(ABORT) or RAISE(ROLLBACK))."
    with closing(sqlite3.connect(db)) as c, c:
        c.execute(f"CREATE TRIGGER refuse BEFORE UPDATE OF state ON fh_jobs WHEN NEW.state = 'succeeded' AND "
                  f"NEW.result = '{json.dumps(result)}' BEGIN SELECT RAISE({how}, 'this result is refused'); END")


@pytest.fixture
def hub(make_tasks):
    "A hub with no in-process worker and an `echo` task returning what `VALUES[key]` holds (or its argument)."
    tasks = make_tasks(workers=0)
    values: dict[str, Any] = {}

    @tasks.task(name="echo")
    def echo(x: Any = None, key: str | None = None) -> Any:
        return values[key] if key is not None else x

    tasks.counts()  # creates the store's tables
    return tasks, echo, values


# -- results that cannot be stored --------------------------------------------------------------------
def test_a_result_that_is_not_utf8_fails_that_job_alone(hub):
    # Given a task returning a file name that is not UTF-8 (JSON-serializable, but SQLite cannot store it),
    # between two good jobs
    tasks, echo, values = hub
    values["name"] = {"name": NOT_UTF8}
    before, bad, after = echo.defer(1), echo.defer(key="name"), echo.defer(2)
    # When a worker runs them
    drain(tasks)
    # Then that job failed with a ResultError saying where and what, and the others succeeded
    rec = bad.get()
    assert (rec.state, rec.error["type"]) == ("failed", "ResultError")
    assert ("echo returned a value that cannot be stored: the result['name'] is a string that is not valid UTF-8 "
            "(lone surrogate \\udcff at position 3)") == rec.error["message"]
    assert (before.get().result, after.get().result) == (1, 2)
    # And later commits go through
    later = echo.defer(3)
    drain(tasks)
    assert later.get().result == 3


def test_an_error_message_that_is_not_utf8_is_stored_escaped(hub, db):
    # Given a task failing with an error that names a file that is not UTF-8
    tasks, _, _ = hub

    @tasks.task(name="opens")
    def opens() -> None: raise FileNotFoundError(f"no such file: /data/{NOT_UTF8}")

    job = opens.defer()
    drain(tasks)
    # Then the job failed, its message and traceback stored with the bad character written as \udcff
    rec = job.get()
    assert (rec.state, rec.error["type"]) == ("failed", "FileNotFoundError")
    assert rec.error["message"] == "no such file: /data/caf\\udcff"
    assert "FileNotFoundError: no such file: /data/caf\\udcff" in rec.error["traceback"]


@pytest.mark.parametrize("value, detail", [
    (10 ** 5000, "the result is an int of more than 4,300 digits"),
    (-(10 ** 4300), "the result is an int of more than 4,300 digits"),
    (nested(5000), f"is nested more than {MAX_DEPTH} levels deep"),
    ({"deep": nested(MAX_DEPTH)}, "the result['deep'][0][0][0]...[0][0][0] is nested more than"),
    ({"k": {NOT_UTF8: 1}}, "the result['k'] has a key 'caf\\udcff' that is not valid UTF-8"),
    ([1.5, float("inf")], "the result[1] is inf (not finite)"),
    (Unlistable(a=1), "echo returned a value that cannot be stored: RuntimeError: no items today"),
], ids=["huge-int", "huge-negative-int", "deep-5000", "deep-101", "surrogate-key", "inf", "raising-dict"])
def test_results_that_break_the_encoder_end_the_job(hub, value, detail):
    # Given a task returning a value the encoder cannot take, next to good jobs
    tasks, echo, values = hub
    values["bad"] = value
    good = [echo.defer(i) for i in range(3)]
    bad = echo.defer(key="bad")
    # When a worker drains the queue
    drain(tasks)
    # Then the job failed with a clear ResultError (it is not left running, to go back to the queue at shutdown)
    rec = bad.get()
    assert (rec.state, rec.attempts, rec.error["type"]) == ("failed", 1, "ResultError")
    assert detail in rec.error["message"], rec.error["message"]
    assert [g.get().result for g in good] == [0, 1, 2]
    assert tasks.counts() == {"succeeded": 3, "failed": 1}


def test_the_deepest_result_allowed_is_stored(hub):
    tasks, echo, values = hub
    values["deep"] = nested(MAX_DEPTH - 2, {"leaf": [0]})  # MAX_DEPTH levels of lists and dicts
    job = echo.defer(key="deep")
    drain(tasks)
    assert job.get().result == nested(MAX_DEPTH - 2, {"leaf": [0]})


def test_a_result_over_max_result_fails_with_its_size(make_tasks):
    # Given a hub whose results may take 100 bytes
    tasks = make_tasks(workers=0, max_result=100)

    @tasks.task(name="big")
    def big(n: int) -> str: return "é" * n

    # When one task returns 60 two-byte characters (122 bytes encoded) and another 40 (82 bytes)
    over, under = big.defer(60), big.defer(40)
    drain(tasks)
    # Then the first failed, saying how large it was and what the limit is, and the second was stored
    rec = over.get()
    assert (rec.state, rec.error["type"]) == ("failed", "ResultError")
    assert "the result is 122 bytes encoded, over the 100-byte limit (Tasks(max_result=...))" in rec.error["message"]
    assert under.get().result == "é" * 40


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1MB"])
def test_max_result_must_be_a_whole_number_of_bytes(make_tasks, bad):
    with pytest.raises(ValueError, match="max_result must be a whole number of bytes >= 1"):
        make_tasks(workers=0, max_result=bad)


def test_progress_values_have_a_smaller_cap():
    assert encode_progress({"done": 3, "total": 10}) == '{"done":3,"total":10}'
    with pytest.raises(PayloadTooLarge, match=rf"progress is 70,0\d\d bytes encoded, over the {MAX_PROGRESS:,}-byte"):
        encode_progress({"log": "x" * 70_000})
    with pytest.raises(ArgumentError, match=r"progress\['file'\] is a string that is not valid UTF-8"):
        encode_progress({"file": NOT_UTF8})


def test_a_retry_delay_that_is_not_seconds_falls_back_to_the_backoff(hub):
    # Given a task asking for a retry with a delay that is not a number of seconds
    tasks, _, _ = hub
    calls: list[int] = []

    @tasks.task(name="later", retries=1, retry_delay=0.01)
    def later() -> int:
        calls.append(1)
        if len(calls) == 1: raise Retry("not yet", delay="soon")  # type: ignore[arg-type]
        return len(calls)

    job = later.defer()
    drain(tasks)
    # Then it is retried after its backoff, and not left running
    assert (job.get().state, job.get().result) == ("succeeded", 2)


# -- arguments defer() refuses ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, detail", [
    ({"x": NOT_UTF8}, "argument 'x' is a string that is not valid UTF-8 (lone surrogate \\udcff at position 3)"),
    ({"x": {"files": [NOT_UTF8]}}, "argument 'x'['files'][0] is a string that is not valid UTF-8"),
    ({"x": {NOT_UTF8: 1}}, "argument 'x' has a key 'caf\\udcff' that is not valid UTF-8"),
    ({"x": 10 ** 5000}, "argument 'x' is an int of more than 4,300 digits"),
    ({"x": nested(1000)}, f"argument 'x'[0][0][0][0]...[0][0][0] is nested more than {MAX_DEPTH} levels deep"),
    ({"x": {"a": nested(MAX_DEPTH)}}, f"is nested more than {MAX_DEPTH} levels deep"),
    ({"x": nested(200_000)}, f"is nested more than {MAX_DEPTH} levels deep"),  # never a RecursionError
], ids=["surrogate", "nested-surrogate", "surrogate-key", "huge-int", "deep-1000", "deep-101", "deep-200000"])
def test_defer_refuses_arguments_a_worker_could_not_run(hub, kwargs, detail):
    tasks, echo, _ = hub
    with pytest.raises(ArgumentError) as e:
        echo.defer(**kwargs)
    assert isinstance(e.value, TypeError)
    assert str(e.value).startswith("echo: ") and detail in str(e.value), str(e.value)
    assert tasks.counts() == {}


def test_any_depth_defer_accepts_runs(hub):
    tasks, echo, _ = hub
    job = echo.defer(nested(MAX_DEPTH))
    drain(tasks)
    assert job.get().result == nested(MAX_DEPTH)


# -- rows that cannot run -----------------------------------------------------------------------------
BAD_ROWS = [
    pytest.param({"timeout": "abc"}, "BadRow", "column timeout is 'abc' (text), not NULL or a number", id="timeout"),
    pytest.param({"timeout": -1.5}, "BadRow", "column timeout is -1.5 (a real)", id="negative-timeout"),
    pytest.param({"max_attempts": "x"}, "BadRow", "column max_attempts is 'x' (text), not a whole number >= 1",
                 id="max_attempts"),
    pytest.param({"max_attempts": 0}, "BadRow", "column max_attempts is 0 (an integer)", id="no-attempts"),
    pytest.param({"attempts": 1.5}, "BadRow", "column attempts is 1.5 (a real), not a whole number", id="attempts"),
    pytest.param({"created_at": "yesterday"}, "BadRow", "column created_at is 'yesterday' (text)", id="created_at"),
    pytest.param({"id": b"\x00\x01"}, "BadRow", "column id is b'\\x00\\x01' (a blob)", id="id-blob"),
    pytest.param({"args": 7}, "DecodeError", "arguments are not a JSON object", id="args-int"),  # stored as '7'
    pytest.param({"args": 7.5}, "DecodeError", "arguments are not a JSON object", id="args-real"),
    pytest.param({"args": b'{"args": [1]}'}, "DecodeError", "(a blob), not JSON text", id="args-blob"),
    pytest.param({"args": '{"args": ' + "[" * 5000 + "]" * 5000 + "}"}, "DecodeError", "nested too deeply",
                 id="args-deep"),
    pytest.param({"args": '{"args": [' + "9" * 5000 + "]}"}, "DecodeError", "Exceeds the limit", id="args-huge-int"),
]


@pytest.mark.parametrize("cols, error, detail", BAD_ROWS)
def test_a_row_that_cannot_run_fails_alone(hub, db, cols, error, detail):
    # Given a row written behind the store's back with a column of the wrong type, claimed in one batch with good jobs
    tasks, echo, _ = hub
    bad = put_row(db, **cols)
    good = [echo.defer(i) for i in range(3)]
    # When a worker drains the queue
    drain(tasks)
    # Then the bad row failed with a clear error, recorded by its (id, attempt), and the good jobs ran
    key = cols.get("id", bad)
    with closing(sqlite3.connect(db)) as c:
        state, attempts, err = c.execute("SELECT state, attempts, error FROM fh_jobs WHERE id = ?", (key,)).fetchone()
    assert state == "failed", (state, err)
    err = json.loads(err)
    assert err["type"] == error and detail in err["message"], err
    assert [g.get().result for g in good] == [0, 1, 2]


def test_a_row_whose_text_is_not_utf8_fails_alone(hub, db):
    # Given a row whose arguments are text with bytes that are not UTF-8, claimed with good jobs
    tasks, echo, _ = hub
    bad = put_row(db)
    with closing(sqlite3.connect(db)) as c, c:
        c.execute("UPDATE fh_jobs SET args = CAST(X'7B2261726773223A205B22FF225D7D' AS TEXT) WHERE id = ?", (bad,))
    good = [echo.defer(i) for i in range(3)]
    # When a worker drains the queue (the claim cannot read that row as text)
    drain(tasks)
    # Then that row failed as a bad row, and the others ran
    err = json.loads(stored(db, bad)["error"])
    assert (stored(db, bad)["state"], err["type"]) == ("failed", "BadRow")
    assert "column args holds text that is not valid UTF-8" in err["message"]
    assert [g.get().result for g in good] == [0, 1, 2]


# -- outcomes the store refuses -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["ABORT", "ROLLBACK"])
def test_an_outcome_the_store_refuses_does_not_hold_back_the_others(hub, db, how):
    # Given a store that refuses one result (a trigger: ABORT undoes the statement, ROLLBACK the whole commit)
    tasks, echo, _ = hub
    refuse_results(db, "poison", how)
    jobs = [echo.defer(i) for i in range(3)] + [echo.defer("poison")] + [echo.defer(i) for i in range(3, 6)]
    # When a worker records the outcomes of a batch holding it
    drain(tasks)
    # Then that job failed with an OutcomeError naming the store's refusal, and the others were recorded
    rec = jobs[3].get()
    assert (rec.state, rec.error["type"]) == ("failed", "OutcomeError")
    assert "echo: the job's outcome (succeed) could not be stored" in rec.error["message"]
    assert "this result is refused" in rec.error["message"]
    assert [j.get().result for j in jobs if j is not jobs[3]] == [0, 1, 2, 3, 4, 5]


def test_store_records_outcomes_one_by_one_when_one_cannot_be_written(hub, db):
    # Given three claimed jobs, and outcomes for them of which the second holds text SQLite cannot take
    tasks, echo, _ = hub
    ids = [echo.defer(i).id for i in range(3)]
    claims = tasks.store.claim("w", ("default",), 3, 30.0)
    assert sorted(c.id for c in claims) == sorted(ids)
    outs = [Outcome("succeed", ids[0], 1, "1"), Outcome("succeed", ids[1], 1, json.dumps(NOT_UTF8, ensure_ascii=False),
                                                         extra={"task": "echo"}),
            Outcome("fail", ids[2], 1, None, '{"type": "E", "message": "m"}')]
    # When they are recorded in one call
    assert tasks.store.finish(outs) == 3
    # Then the good ones are stored, and the bad one failed its job with a minimal error
    assert stored(db, ids[0])["state"] == "succeeded" and stored(db, ids[2])["state"] == "failed"
    err = json.loads(stored(db, ids[1])["error"])
    assert (stored(db, ids[1])["state"], err["type"]) == ("failed", "OutcomeError")
    assert "UnicodeEncodeError" in err["message"]


def test_requests_succeed_while_an_outcome_cannot_be_stored(site, db, caplog):
    # Given an app with its in-process worker, whose store refuses one result and undoes the whole commit then
    app, rt, tasks = site()

    @tasks.task(name="echo")
    def echo(x: Any) -> Any: return x

    ids: list[str] = []

    @rt("/go")
    def go(x: str):
        job = echo.defer(x)
        ids.append(job.id)
        return P("accepted"), job

    with TestClient(app) as client:
        tasks.counts()
        refuse_results(db, "poison", "ROLLBACK")
        worker = tasks.engine._own[0][0]
        worker.linger = 1.0  # outcomes wait for the next commit: the next request's carries the refused one
        # When a request defers the job whose result is refused, and more requests follow while its outcome waits
        first = client.get("/go", params={"x": "poison"})
        wait_until(lambda: worker._outcomes, what="the refused outcome waiting")
        later = [client.get("/go", params={"x": f"ok{i}"}) for i in range(3)]
        # Then every request succeeded, the later jobs ran, and the refused job failed alone
        assert [r.status_code for r in [first, *later]] == [200] * 4
        assert any("storing them alone" in r.getMessage() for r in caplog.records)  # the request did carry it
        recs = [wait_until(lambda i=i: (r := tasks.get(i)) and r.done and r, what=i) for i in ids]
        assert (recs[0].state, recs[0].error["type"]) == ("failed", "OutcomeError")
        assert [r.result for r in recs[1:]] == ["ok0", "ok1", "ok2"]


# -- logging ------------------------------------------------------------------------------------------
def test_every_job_failure_is_a_warning_with_the_job_id_and_task(hub, db, caplog):
    # Given a job that fails and retries, one whose result cannot be stored, and rows that cannot run
    tasks, echo, values = hub
    calls: list[int] = []

    @tasks.task(name="flaky", retries=1, retry_delay=0.01)
    def flaky() -> None:
        calls.append(1)
        raise ConnectionError(f"try {len(calls)}")

    values["set"] = {1, 2}
    jobs = {"flaky": flaky.defer().id, "result": echo.defer(key="set").id,
            "bad": put_row(db, timeout="abc"), "decode": put_row(db, args="not json")}
    # When a worker runs them
    with caplog.at_level(logging.WARNING, logger="fh_tasks"):
        drain(tasks)
    # Then each failed attempt was logged at WARNING with the job's id, task and error type, in the text and as extra
    got = [(r.levelno, r.job_id, r.task, r.error_type, r.action) for r in caplog.records if hasattr(r, "job_id")]
    assert sorted(got) == sorted([
        (logging.WARNING, jobs["flaky"], "flaky", "ConnectionError", "retry"),
        (logging.WARNING, jobs["flaky"], "flaky", "ConnectionError", "fail"),
        (logging.WARNING, jobs["result"], "echo", "ResultError", "fail"),
        (logging.WARNING, jobs["bad"], "echo", "BadRow", "fail"),
        (logging.WARNING, jobs["decode"], "echo", "DecodeError", "fail")])
    for r in caplog.records:
        if hasattr(r, "job_id"): assert r.job_id in r.getMessage() and r.task in r.getMessage()


def test_a_worker_thread_survives_many_bad_jobs_at_once(hub, db):
    # Given a full batch of bad rows and bad results mixed with good jobs
    tasks, echo, values = hub
    values["huge"] = 10 ** 5000
    bad = [put_row(db, timeout="abc") for _ in range(20)] + [echo.defer(key="huge").id for _ in range(20)]
    good = [echo.defer(i) for i in range(30)]
    # When one drain runs them all
    drain(tasks)
    # Then every bad one failed and every good one succeeded
    assert all(stored(db, i)["state"] == "failed" for i in bad)
    assert [g.get().result for g in good] == list(range(30))
