"""Reading rows other versions may have written: `JobRecord.from_row` never raises, keeps what it could not read in
`raw`, and `JobStatus` renders any record, escaped."""
from __future__ import annotations

from typing import Any

from fastcore.xml import to_xml
from hypothesis import given, settings
from hypothesis import strategies as st

from fh_tasks import JobRecord, JobState, JobStatus

COLUMNS = ("id", "task", "queue", "state", "args", "attempts", "max_attempts", "timeout", "run_at", "created_at",
           "started_at", "finished_at", "lease_until", "worker", "parent", "result", "error", "progress")
#: What SQLite can hand back for a column, whatever its declared type.
VALUES = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(), st.binary(max_size=20),
                   st.sampled_from(['{"type": 1}', "[1, 2]", '"x"', "{not json", "[" * 5000, '{"message": null}',
                                    "running", "failed", '{"args": 1}', "<script>alert(1)</script>"]))


def row(**kw: Any) -> dict[str, Any]:
    base = dict(id="j1", task="m:t", queue="default", state="queued", args='{"kwargs":{}}', attempts=0,
                max_attempts=1, timeout=None, run_at=1.0, created_at=1.0, started_at=None, finished_at=None,
                lease_until=None, worker=None, parent=None, result=None, error=None, progress=None)
    return {**base, **kw}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(COLUMNS), VALUES))
def test_any_row_reads_and_renders(cols: dict[str, Any]):
    rec = JobRecord.from_row(row(**cols))
    assert isinstance(rec.state, JobState) and isinstance(rec.attempts, int) and isinstance(rec.created_at, float)
    assert rec.error is None or (isinstance(rec.error["type"], str) and isinstance(rec.error["message"], str))
    html = to_xml(JobStatus(rec))
    assert "<script>" not in html and 'class="fh-job' in html


def test_an_unknown_state_keeps_its_text_and_is_not_final():
    rec = JobRecord.from_row(row(state="paused"))
    assert rec.state is JobState.unknown and rec.state_text == "paused" and rec.raw == {"state": "paused"}
    assert not rec.done and not JobState.unknown.final
    html = to_xml(JobStatus(rec))
    assert 'data-state="unknown"' in html and ">paused<" in html and "hx-trigger" in html


def test_a_malformed_error_becomes_a_dict_with_type_and_message():
    def err(stored: Any) -> Any: return JobRecord.from_row(row(state="failed", error=stored)).error
    assert err("{not json") == {"type": "Error", "message": "{not json"}
    assert err('"boom"') == {"type": "Error", "message": "boom"}
    assert err("[1, 2]") == {"type": "Error", "message": "[1, 2]"}
    assert err('{"type": 5, "message": {"a": 1}, "traceback": "tb"}') == {
        "type": "Error", "message": "{'a': 1}", "traceback": "tb"}
    assert err(b"\xffbad") == {"type": "Error", "message": "\ufffdbad"}
    assert err("null") is None and err(None) is None


def test_numbers_of_the_wrong_type_read_as_defaults_and_are_kept_in_raw():
    rec = JobRecord.from_row(row(attempts="many", max_attempts=2.5, created_at="yesterday", run_at=b"\x00",
                                 started_at="soon", finished_at=float("inf"), id=7))
    assert (rec.attempts, rec.max_attempts, rec.created_at, rec.run_at, rec.started_at, rec.finished_at, rec.id) == (
        0, 0, 0.0, 0.0, None, None, "7")
    assert rec.raw == {"attempts": "many", "max_attempts": 2.5, "created_at": "yesterday", "run_at": b"\x00",
                       "started_at": "soon", "finished_at": float("inf"), "id": 7}
    # A whole number stored as a real is read as an int, and an int time as a float
    assert JobRecord.from_row(row(attempts=3.0, run_at=5)).attempts == 3


def test_values_that_are_not_json_are_the_stored_text():
    deep = "[" * 100_000 + "]" * 100_000  # valid JSON, too deep for the decoder
    rec = JobRecord.from_row(row(result="not json", progress=deep, args="nope"))
    assert (rec.result, rec.progress, rec.args, rec.kwargs) == ("not json", deep, ["nope"], {})
    assert JobRecord.from_row(row(result=b'{"a": 1}')).result == {"a": 1}
