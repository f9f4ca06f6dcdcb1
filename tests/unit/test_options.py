"""Task options are checked when the task is declared, and the error names the option."""
from __future__ import annotations

import math

import pytest

from fh_tasks.task import task_name


def _noop() -> None: ...


@pytest.mark.parametrize("options, option", [
    (dict(retries=-1), "retries"),
    (dict(retries=1.5), "retries"),
    (dict(retries="3"), "retries"),
    (dict(retries=True), "retries"),
    (dict(timeout=0), "timeout"),
    (dict(timeout=-5), "timeout"),
    (dict(timeout=math.nan), "timeout"),
    (dict(timeout="30"), "timeout"),
    (dict(queue=""), "queue"),
    (dict(queue=None), "queue"),
    (dict(queue=3), "queue"),
    (dict(retry_delay=-0.1), "retry_delay"),
    (dict(retry_delay=math.nan), "retry_delay"),
    (dict(retry_delay="1"), "retry_delay"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_option_raises_value_error_naming_it(make_tasks, options, option):
    # Given a hub
    tasks = make_tasks(workers=0)
    # When a task is declared with a bad option
    with pytest.raises(ValueError) as e:
        tasks.task(**options)(_noop)
    # Then the ValueError names the option, and no task is registered
    assert str(e.value).startswith(f"{option} must be"), str(e.value)
    assert tasks.registry == {}


@pytest.mark.parametrize("options, option", [
    (dict(delay=-1), "delay"),
    (dict(delay=math.nan), "delay"),
    (dict(retries=-2), "retries"),
    (dict(timeout=0), "timeout"),
])
def test_bad_per_call_option_raises_value_error(make_tasks, options, option):
    # Given a registered task
    tasks = make_tasks(workers=0)
    t = tasks.task(_noop)
    # When a call overrides an option with a bad value
    with pytest.raises(ValueError, match=f"^{option} must be"):
        t.with_options(**options)
    # Then nothing is stored
    assert tasks.counts() == {}


def test_unknown_per_call_option_is_a_type_error(make_tasks):
    tasks = make_tasks(workers=0)
    t = tasks.task(_noop)
    with pytest.raises(TypeError, match="colour"):
        t.with_options(colour="red")


def test_process_task_must_be_sync(make_tasks):
    tasks = make_tasks(workers=0)

    async def job() -> None: ...

    with pytest.raises(ValueError, match="process=True needs a plain"):
        tasks.task(process=True)(job)


def test_good_options_are_kept(make_tasks):
    # Given options within range
    tasks = make_tasks(workers=0)
    t = tasks.task(queue="mail", retries=3, retry_delay=0.5, timeout=2.5)(_noop)
    # Then the task carries them and its retry policy matches
    assert (t.options.queue, t.options.retries, t.options.retry_delay, t.options.timeout) == ("mail", 3, 0.5, 2.5)
    assert t.policy.max_attempts == 4 and t.policy.delay == 0.5


def test_default_name_is_module_and_qualname(make_tasks):
    tasks = make_tasks(workers=0)
    t = tasks.task(_noop)
    assert t.name == task_name(_noop) == f"{__name__}:_noop"
    assert tasks.registry[t.name] is t


def test_two_functions_under_one_name_are_refused(make_tasks):
    # Given a task registered under a name
    tasks = make_tasks(workers=0)

    @tasks.task(name="dup")
    def first() -> None: ...

    # When a different function is registered under the same name
    def second() -> None: ...

    with pytest.raises(ValueError, match="'dup'"):
        tasks.task(name="dup")(second)
    # Then the first registration stands
    assert tasks.registry["dup"] is first


def test_registering_the_same_function_again_is_allowed(make_tasks):
    # Given a function registered once (a module re-imported registers it again)
    tasks = make_tasks(workers=0)
    a = tasks.task(name="same")(_noop)
    # When it is registered again under the same name
    b = tasks.task(name="same")(_noop)
    # Then the newer registration replaces the older one
    assert tasks.registry["same"] is b and a is not b


def test_registering_a_task_twice_is_a_type_error(make_tasks):
    tasks = make_tasks(workers=0)
    t = tasks.task(_noop)
    with pytest.raises(TypeError, match="already a registered task"):
        tasks.task(t)


def test_hub_rejects_negative_workers(db):
    from fh_tasks import Tasks
    with pytest.raises(ValueError, match="workers"):
        Tasks(db=db, workers=-1)


def test_job_ids_are_time_ordered_unique_hex():
    # Given ids made across a few milliseconds
    import time

    from fh_tasks.task import new_id

    ids = []
    for _ in range(3):
        ids += [new_id() for _ in range(1000)]
        time.sleep(0.002)
    # Then they are 32 hex digits, all different, and later milliseconds sort after earlier ones
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert ids[0][:12] < ids[1000][:12] < ids[2000][:12]
