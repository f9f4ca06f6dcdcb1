"""`JobStatus` renders a record: the labelled state, `data-state` and classes, the bar, message, times and ETA, the
result or error (escaped), the cancel button, and how it stays live (polling, SSE, websocket)."""
from __future__ import annotations

from typing import Any

import pytest
from fastcore.xml import to_xml

from fh_tasks.records import JobRecord
from fh_tasks.ui.status import JobStatus, fraction, human_duration

ID = "a" * 32


def rec(state: str, **kw: Any) -> JobRecord:
    row = {"id": ID, "task": "app:send_emails", "queue": "default", "state": state, "attempts": 1, "max_attempts": 1,
           "created_at": 100.0, "run_at": 100.0, **kw}
    return JobRecord.from_row(row)


class Hub:
    "Just what JobStatus asks of a hub for a record: its prefix and its engine's capabilities."
    prefix = "/_tasks"

    class engine:
        class capabilities:
            cancel_queued = cancel_running = events = True


def html(r: JobRecord, **kw: Any) -> str:
    return to_xml(JobStatus(r, Hub(), now=130.0, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (42.4, "42 s"), (60, "1 min"), (185, "3 min 5 s"),
                                               (3600, "1 h"), (7800, "2 h 10 min")])
def test_human_durations(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_fractions_from_every_progress_shape() -> None:
    assert fraction(0.25) == 0.25 and fraction({"done": 3, "total": 12}) == 0.25 and fraction({"fraction": 1}) == 1.0
    assert fraction({"done": 30, "total": 12}) == 1.0
    for bad in (None, 2, -0.1, "half", {"done": 1, "total": 0}, {"done": "1", "total": 2}, True, float("nan")):
        assert fraction(bad) is None, bad


def test_a_running_job_shows_its_label_bar_message_and_eta() -> None:
    out = html(rec("running", started_at=100.0,
                   progress='{"done": 25, "total": 100, "message": "25 <sent>", "partial": ["<i>ada</i>"]}'))
    assert '<span class="fh-job-partial">["&lt;i&gt;ada&lt;/i&gt;"]</span>' in out
    assert 'data-state="running"' in out and 'class="fh-job fh-job-running"' in out and f'id="job-{ID}"' in out
    assert '<span class="fh-job-state">Running</span>' in out
    assert '<small class="fh-job-task">send_emails</small>' in out
    assert '<progress value="0.2500" max="1"></progress>' in out and "25 &lt;sent&gt;" in out
    # 30 s for a quarter: about 90 s (1 min 30 s) left
    assert "elapsed 30 s · about 1 min 30 s left" in out
    assert f'hx-get="/_tasks/jobs/{ID}/status"' in out and 'hx-trigger="every 1s"' in out


def test_final_states_stop_and_show_their_outcome_escaped() -> None:
    ok = html(rec("succeeded", started_at=100.0, finished_at=112.0), result={"sent": "<b>200</b>"})
    assert "Succeeded" in ok and "took 12 s" in ok and "hx-get" not in ok and "sse-swap" not in ok
    assert '{"sent": "&lt;b&gt;200&lt;/b&gt;"}' in ok and '<progress value="1" max="1">' in ok
    bad = html(rec("failed", error='{"type": "SMTPError", "message": "<script>x</script>"}'), cancel=True)
    assert "SMTPError: &lt;script&gt;x&lt;/script&gt;" in bad and "<script>" not in bad and "<button" not in bad
    assert 'data-state="cancelled"' in html(rec("cancelled"), live="sse")


def test_the_cancel_button_and_the_live_transports() -> None:
    out = html(rec("queued"), cancel=True)
    assert f'hx-post="/_tasks/jobs/{ID}/cancel?o=c"' in out and 'class="fh-job-cancel secondary outline"' in out
    assert f'hx-get="/_tasks/jobs/{ID}/status?o=c"' in out
    sse = html(rec("running", started_at=100.0), live="sse")
    assert f'sse-swap="fh-job-{ID}"' in sse and 'hx-swap="outerHTML settle:0ms"' in sse and "every" not in sse
    # (and when the page's stream or socket opens again, it fetches its state once)
    assert f'hx-get="/_tasks/jobs/{ID}/status?l=sse"' in sse
    assert 'hx-trigger="htmx:sseOpen from:closest .fh-job-events"' in sse
    ws = html(rec("running", started_at=100.0), live="ws")
    assert "sse-swap" not in ws and 'hx-trigger="htmx:wsOpen from:closest .fh-job-socket"' in ws
    assert f'hx-get="/_tasks/jobs/{ID}/status?l=ws"' in ws and f'id="job-{ID}"' in ws
    assert "hx-" not in html(rec("running"), live=None).replace('aria-live', '')
