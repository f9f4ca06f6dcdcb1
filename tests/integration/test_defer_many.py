"""`task.defer_many`: many calls stored in one transaction, through the hub's hooks; bad items named by index."""
from __future__ import annotations

from typing import Any

import pytest
from fasthtml.common import P
from starlette.testclient import TestClient

from fh_tasks import ArgumentError, Call, Hook, Tasks
from fh_tasks.testing import drain


class Seen(Hook):
    "Records every `before_enqueue` job and every `after_enqueue` batch."

    def __init__(self, refuse: Any = None) -> None:
        self.before: list[str] = []
        self.batches: list[list[str]] = []
        self.refuse = refuse

    def before_enqueue(self, job, task) -> None:
        if self.refuse is not None and self.refuse in job.args: raise PermissionError(job.args)
        self.before.append(job.id)

    def after_enqueue(self, jobs) -> None: self.batches.append([j.id for j in jobs])


def test_defer_many_stores_every_shape_in_one_transaction_outside_a_request(make_tasks):
    # Given a hub with no workers, a hook watching enqueues, and a task with a positional and a keyword parameter
    seen = Seen()
    tasks: Tasks = make_tasks(workers=0, hooks=[seen])

    @tasks.task
    def resize(path: str, size: int = 1) -> str: return f"{path}@{size}"

    # When code outside a request defers three calls of the three documented shapes
    jobs = resize.defer_many([("a.png",), {"path": "b.png", "size": 2}, Call("c.png", size=3)])
    # Then three Jobs come back, in order, all stored before defer_many returns, in one batch (one commit)
    assert [j.stored for j in jobs] == [True] * 3
    assert seen.before == [j.id for j in jobs] and seen.batches == [[j.id for j in jobs]]
    recs = [tasks.get(j.id) for j in jobs]
    assert [(r.state, r.args, r.kwargs) for r in recs] == [
        ("queued", ["a.png"], {}), ("queued", [], {"path": "b.png", "size": 2}), ("queued", ["c.png"], {"size": 3})]
    # And they run like any job
    drain(tasks)
    assert [tasks.get(j.id).result for j in jobs] == ["a.png@1", "b.png@2", "c.png@3"]


def test_defer_many_with_options_and_an_empty_list(make_tasks):
    tasks: Tasks = make_tasks(workers=0)

    @tasks.task
    def later(x: int) -> int: return x

    assert later.defer_many([]) == [] and tasks.counts() == {}
    jobs = later.with_options(delay=60, queue="slow").defer_many([(1,), (2,)])
    assert {(tasks.get(j.id).state, tasks.get(j.id).queue) for j in jobs} == {("scheduled", "slow")}


@pytest.mark.parametrize(("items", "index", "error", "says"), [
    ([(1,), "x"], 1, TypeError, "item 1 is a str; give a tuple"),
    ([(1,), [2]], 1, TypeError, "item 1 is a list"),
    ([{1: 2}], 0, TypeError, "item 0 is a dict whose keys are not all strings"),
    ([(1,), (2,), (1, 2, 3)], 2, TypeError, "item 2: "),
    ([(1,), {"y": 1}], 1, TypeError, "item 1: "),
    ([(1,), (object(),)], 1, ArgumentError, "item 1: "),
])
def test_a_bad_item_is_named_by_its_index_and_nothing_is_stored(make_tasks, items, index, error, says):
    tasks: Tasks = make_tasks(workers=0)

    @tasks.task
    def later(x: int) -> int: return x

    with pytest.raises(error) as e:
        later.defer_many(items)
    assert says in str(e.value) and "defer_many" in str(e.value)
    assert tasks.counts() == {}


def test_a_hook_refusing_one_job_refuses_the_batch(make_tasks):
    tasks: Tasks = make_tasks(workers=0, hooks=[Seen(refuse="13")])

    @tasks.task
    def later(x: int) -> int: return x

    with pytest.raises(PermissionError):
        later.defer_many([(1,), (13,), (2,)])
    assert tasks.counts() == {}


def test_inside_a_request_defer_many_joins_the_requests_batch(site):
    # Given an app whose handlers defer many jobs, one handler then failing
    seen = Seen()
    app, rt, tasks = site(workers=0, hooks=[seen])

    @tasks.task
    def later(x: int) -> int: return x

    @rt("/ok")
    def ok():
        job = later.defer(0)
        jobs = later.defer_many([(1,), (2,)])
        assert not any(j.stored for j in jobs)  # held until the response starts
        return P(" ".join(j.id for j in [job, *jobs]), id="ids")

    @rt("/boom")
    def boom():
        later.defer_many([(3,), (4,)])
        raise RuntimeError("handler failed")

    with TestClient(app, raise_server_exceptions=False) as cli:
        # When the handlers run
        ids = cli.get("/ok").text.split('id="ids">')[1].split("<")[0].split()
        assert cli.get("/boom").status_code == 500
    # Then the good request's jobs were stored together, in one commit with its defer(); the failed one's never
    assert seen.batches == [ids]
    assert tasks.counts() == {"queued": 3}
