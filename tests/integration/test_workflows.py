"""Workflows on the SQLite engine (fh_tasks/flow.py): chains that pass results, groups with a callback, failures that
cancel what follows, request semantics, bad inputs, and a worker process killed in the middle of a workflow."""
from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fasthtml.common import Titled
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "acceptance"))  # worker processes, as users start them
from worker_support import env_for, make_db, rows, running, start_worker, wait_for  # noqa: E402

from fh_tasks import BackgroundTasks, JobCancelled, JobState, JobStatus, Tasks, Unsupported, chain, group
from fh_tasks.engine import EngineSettings
from fh_tasks.engines.sqlite import SQLiteEngine
from fh_tasks.testing import drain

pytestmark = pytest.mark.timeout(60)


def _state(tasks: Tasks, id: str) -> str:
    rec = tasks.get(id)
    assert rec is not None
    return rec.state.value


def test_a_chain_passes_each_result_to_the_next_step(make_tasks):
    # Given three tasks, sync and async, where each takes the previous result first
    tasks = make_tasks()

    @tasks.task
    def fetch(url: str) -> dict:
        return {"url": url, "size": len(url)}

    @tasks.task
    async def parse(page: dict, *, strict: bool = False) -> list:
        await asyncio.sleep(0)
        return [page["url"], page["size"], strict]

    @tasks.task
    def store(parsed: list, user: int) -> str:
        return f"user {user}: {parsed}"

    # When the chain is deferred and run
    flow = chain(fetch.s("https://a.example"), parse.s(strict=True), store.s(user=1)).defer()
    assert [_state(tasks, i) for i in flow.ids] == ["queued", "waiting", "waiting"]
    drain(tasks)
    # Then each step got the result before it as its first argument, before its own arguments
    assert flow.result() == "user 1: ['https://a.example', 17, True]"
    assert flow.job.id == flow.ids[-1] and len(flow.jobs) == 3
    # and the stored arguments are the step's own (the input is read when the job runs)
    rec = tasks.get(flow.ids[1])
    assert rec is not None and rec.args == [] and rec.kwargs == {"strict": True} and rec.parent == flow.ids[0]


def test_a_group_of_five_gives_its_callback_the_results_in_member_order(make_tasks):
    # Given members that finish in the reverse of their order
    tasks = make_tasks()

    @tasks.task
    async def resize(n: int) -> int:
        await asyncio.sleep((5 - n) * 0.03)
        return n * n

    finished: list[int] = []

    @tasks.task
    def report(sizes: list, title: str) -> dict:
        finished.append(len(sizes))
        return {"title": title, "sizes": sizes}

    # When the group runs with a callback
    flow = group(resize.s(n) for n in range(5)).then(report.s(title="Sizes")).defer()
    assert _state(tasks, flow.id) == "waiting"
    drain(tasks, concurrency=5)
    # Then the callback ran once, with the results in the order of the members
    assert flow.result() == {"title": "Sizes", "sizes": [0, 1, 4, 9, 16]} and finished == [5]
    members = [tasks.get(i) for i in flow.ids[:5]]
    ends = [m.finished_at for m in members if m is not None]
    assert ends == sorted(ends, reverse=True)  # they did finish out of order


def test_a_failing_member_cancels_the_callback_and_what_follows_it(make_tasks):
    # Given a group with a failing member, a callback, and a step after the callback
    tasks = make_tasks()

    @tasks.task
    def ok(n: int) -> int: return n

    @tasks.task
    def broken(n: int) -> int: raise ValueError(f"member {n} broke")

    @tasks.task
    def total(ns: list) -> int: return sum(ns)

    flow = chain(group(ok.s(1), broken.s(2), ok.s(3)), total.s(), ok.s()).defer()
    drain(tasks)
    # Then the other members ran, the callback and the step after it were cancelled, saying why
    states = [_state(tasks, i) for i in flow.ids]
    assert states == ["succeeded", "failed", "succeeded", "cancelled", "cancelled"]
    callback, last = tasks.get(flow.ids[3]), tasks.get(flow.ids[4])
    assert callback is not None and last is not None and callback.error is not None and last.error is not None
    assert callback.error["type"] == "Cancelled" and flow.ids[1] in callback.error["message"]
    assert "group" in callback.error["message"] and flow.ids[3] in last.error["message"]
    with pytest.raises(JobCancelled): flow.result()


def test_a_chain_after_a_group_and_a_group_after_a_step(make_tasks):
    # Given a step, a group that takes its result (one member being a chain), a callback and a last step
    tasks = make_tasks()

    @tasks.task
    def start(n: int) -> int: return n

    @tasks.task
    def mul(x: int, by: int) -> int: return x * by

    @tasks.task
    def add(x: int, more: int = 1) -> int: return x + more

    @tasks.task
    def listed(xs: list) -> list: return xs

    flow = chain(start.s(2), group(mul.s(by=10), chain(mul.s(by=3), add.s()), add.s(more=5)), listed.s()).defer()
    drain(tasks)
    # Then every member got the step's result, and the callback the members' results in order
    assert flow.result() == [20, 7, 7]
    # And a chain after a group: the step after the callback gets the callback's result
    flow2 = group(add.s(1), add.s(2)).then(listed.s()).then(mul.s(by=2)).defer()
    drain(tasks)
    assert flow2.result() == [2, 3, 2, 3]


def test_steps_are_checked_when_deferred_and_nothing_is_stored_on_a_mistake(make_tasks):
    tasks = make_tasks()

    @tasks.task
    def one(x: int) -> int: return x

    @tasks.task
    def two(prev: int, y: int) -> int: return prev + y

    # A step missing an argument is named, with the result it would get in mind
    with pytest.raises(TypeError, match=r"workflow step 2: .*two.*'y'.*after the result of the step before"):
        chain(one.s(1), two.s()).defer()
    # A step that is a task, not a call of it
    with pytest.raises(TypeError, match=r"not the task .*two itself"): chain(one.s(1), two)  # type: ignore[arg-type]
    # Two groups in a row, and an empty chain or group
    with pytest.raises(TypeError, match="cannot follow a group"):
        chain(group(one.s(1)), group(one.s(2))).defer()
    with pytest.raises(ValueError, match="at least one"): chain()
    with pytest.raises(ValueError, match="at least one"): group([])
    # A non-JSON argument names the step and the argument
    with pytest.raises(TypeError, match=r"workflow step 1: .*argument 'x'"): chain(one.s({1, 2}), two.s(y=1)).defer()
    # A step with a uniqueness key (a duplicate would leave the next step waiting for a job never stored)
    with pytest.raises(ValueError, match=r"workflow step 1: a step cannot have a uniqueness key .*key='k'"):
        chain(one.with_options(key="k").s(1), two.s(y=1)).defer()
    assert tasks.counts() == {}
    # `fh_tasks.chain` stays the function once `BackgroundTasks` is loaded (no module of that name shadows it)
    import fh_tasks
    assert fh_tasks.BackgroundTasks.__module__ == "fh_tasks.flow" and fh_tasks.chain is chain
    # And a workflow ending with a group has no single last job
    flow = group(one.s(1), one.s(2)).defer()
    with pytest.raises(ValueError, match="ends with a group"): _ = flow.job
    drain(tasks)
    assert flow.result() == [1, 2]


def test_a_result_that_cannot_be_decoded_fails_that_job_alone(make_tasks, db: str):
    # Given a chain whose first step's stored result was replaced by text that is not JSON, and a job beside it
    tasks = make_tasks()

    @tasks.task
    def first() -> int: return 1

    @tasks.task
    def then(x: Any) -> Any: return x

    flow = chain(first.s(), then.s(), then.s()).defer()
    other = then.defer(5)
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("UPDATE fh_jobs SET state = 'succeeded', result = '{not json', finished_at = 1 WHERE id = ?",
              (flow.ids[0],))
    c.execute("UPDATE fh_jobs SET state = 'queued', run_at = 0 WHERE id = ?", (flow.ids[1],))
    c.close()
    # When the worker claims it
    drain(tasks)
    # Then that job failed with a clear error, the rest of its chain was cancelled, and the other job ran
    rec = tasks.get(flow.ids[1])
    assert rec is not None and rec.state is JobState.failed and rec.error is not None
    assert rec.error["type"] == "InputError" and "cannot be decoded" in rec.error["message"]
    assert flow.ids[0] in rec.error["message"]
    assert _state(tasks, flow.ids[2]) == "cancelled" and other.result() == 5


def test_request_semantics_all_stored_before_the_response_or_none(site):
    # Given handlers that defer a workflow, one of which then fails
    app, rt, tasks = site(workers=0)

    @tasks.task
    def one(x: int) -> int: return x + 1

    @tasks.task
    def total(xs: list) -> int: return sum(xs)

    flows: list[Any] = []

    @rt("/ok")
    def ok():
        flow = group(one.s(1), one.s(2)).then(total.s()).defer()
        flows.append(flow)
        assert tasks.counts() == {}  # held until the response starts
        return Titled("Started"), JobStatus(flow.job), flow

    @rt("/broken")
    def broken():
        flows.append(chain(one.s(1), one.s()).defer())
        raise RuntimeError("the handler failed after deferring")

    with TestClient(app, raise_server_exceptions=False) as cli:
        # When the failing handler runs, nothing is stored
        assert cli.get("/broken").status_code == 500
        assert tasks.counts() == {}
        # When the other one returns its flow, every job is stored, and the page shows the last step
        r = cli.get("/ok")
        assert r.status_code == 200 and "Started" in r.text and f"job-{flows[-1].id}" in r.text
        assert tasks.counts() == {"queued": 2, "waiting": 1}
    assert all(tasks.get(i) is None for i in flows[0].ids)
    drain(tasks)
    assert flows[-1].result() == 5


def test_an_engine_without_workflows_refuses_them_when_deferred(db: str):
    # Given an engine that lacks the capability
    class NoFlows(SQLiteEngine):
        capabilities = replace(SQLiteEngine.capabilities, workflows=False)

    tasks = Tasks(engine=NoFlows(EngineSettings(db=db)))

    @tasks.task
    def one(x: int) -> int: return x

    # Then a workflow that passes results is refused at defer(), naming the engine and the capability
    with pytest.raises(Unsupported, match=r"sqlite engine cannot pass results .*'workflows'"):
        chain(one.s(1), one.s()).defer()
    with pytest.raises(Unsupported, match="workflows"): group(one.s(1)).then(one.s()).defer()
    assert tasks.counts() == {}
    # while a group without a callback (plain parallel jobs) is not a workflow that passes results
    assert len(group(one.s(1), one.s(2)).defer().jobs) == 2
    tasks.store.close()


def test_an_engine_without_delays_or_chains_refuses_them_at_defer_and_stores_nothing(db: str):
    # Given an engine that can neither delay a job nor run jobs in order
    class Plain(SQLiteEngine):
        capabilities = replace(SQLiteEngine.capabilities, delay=False, chains=False)

    tasks = Tasks(engine=Plain(EngineSettings(db=db)), workers=0)

    @tasks.task
    def one(x: int) -> int: return x

    # Then a delayed job is refused at defer(), naming the engine and the capability, in every way of deferring
    with pytest.raises(Unsupported, match=r"the sqlite engine cannot delay a job \(capability 'delay' is missing\)"):
        one.with_options(delay=60).defer(1)
    with pytest.raises(Unsupported, match="'delay'"): one.with_options(delay=60).defer_many([(1,), (2,)])
    assert tasks.counts() == {}
    # and so is a job chained after another (the first job of BackgroundTasks waits for nothing: it is stored)
    bg = BackgroundTasks()
    bg.add_task(one, 1)
    with pytest.raises(Unsupported, match=r"the sqlite engine cannot chain jobs \(capability 'chains' is missing\)"):
        bg.add_task(one, 2)
    assert tasks.counts() == {"queued": 1} and len(bg.jobs) == 1
    tasks.store.close()


# -- a worker process killed in the middle of a workflow ---------------------------------------------------------------
APP = '''
import os, time
from fh_tasks import Tasks, current_job
from fh_tasks.store.sqlite import SQLiteStore

tasks = Tasks(store=SQLiteStore(os.environ["JOBS_DB"]), lease=1.0, grace=0.5)


@tasks.task(name="wf:step")
def step(x: int, add: int = 1) -> int:
    return x + add


@tasks.task(name="wf:slow")
def slow(x: int) -> int:
    if current_job().attempt == 1:
        current_job().progress({"pid": os.getpid()})
        time.sleep(60)
    return x * 100


@tasks.task(name="wf:total")
def total(xs: list) -> int:
    return sum(xs)
'''


def test_a_worker_killed_mid_workflow_loses_nothing(tmp_path: Path, make_tasks):
    # Given a workflow whose group holds a step that hangs on its first attempt, and a worker process running it
    (tmp_path / "wfapp.py").write_text(APP)
    db = make_db(tmp_path / "wf.db")
    tasks = make_tasks(db=db)

    @tasks.task(name="wf:step")
    def step(x: int, add: int = 1) -> int: raise AssertionError("runs in the worker")

    @tasks.task(name="wf:slow")
    def slow(x: int) -> int: raise AssertionError("runs in the worker")

    @tasks.task(name="wf:total")
    def total(xs: list) -> int: raise AssertionError("runs in the worker")

    flow = chain(step.s(1), group(slow.s(), step.s(add=5)), total.s(), step.s(add=1000)).defer()
    env = env_for(tmp_path, db)
    with running(start_worker("wfapp:tasks", tmp_path, env, "--concurrency", "4")) as w1:
        # (the group's two members start together; the fast one may still be committing its success)
        wait_for(lambda: rows(db, "SELECT progress FROM fh_jobs WHERE id = ? AND state = 'running'", (flow.ids[1],))
                 and _state(tasks, flow.ids[2]) == "succeeded", what="the slow member running, the fast one done")
        assert _state(tasks, flow.ids[3]) == "waiting"
        # When the worker is killed mid-workflow
        w1.send_signal(signal.SIGKILL)
        w1.wait(10)
    # Then a new worker takes the lost job back and finishes the workflow, every step getting its input
    with running(start_worker("wfapp:tasks", tmp_path, env)) as w2:
        rec = flow.wait(timeout=30)
        w2.send_signal(signal.SIGTERM)
        w2.wait(15)
    assert rec.state is JobState.succeeded, rec.error
    assert rec.result == (2 * 100 + 2 + 5) + 1000
    slow_rec = tasks.get(flow.ids[1])
    assert slow_rec is not None and slow_rec.attempts == 2
    assert [_state(tasks, i) for i in flow.ids] == ["succeeded"] * 5
    assert time.time() - rec.created_at < 40
