"""Properties of what can be stored: any value `defer()` accepts comes back from a worker unchanged, and any value a
task returns is either stored or fails that job alone, with a clear error, while the worker goes on."""
from __future__ import annotations

import datetime as dt
import math
import re
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fh_tasks import ArgumentError
from fh_tasks.encoding import MAX_DEPTH
from fh_tasks.testing import drain

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
_SURROGATE = re.compile("[\ud800-\udfff]")


# -- values ---------------------------------------------------------------------------------------------
def nest(depth: int, shape: str, leaf: Any) -> Any:
    for i in range(depth): leaf = [leaf] if shape == "list" else {f"k{i}": leaf}
    return leaf


surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]), min_size=1,
                     max_size=2)  # lone surrogates, as `os.fsdecode` gives for names that are not UTF-8
texts = st.one_of(st.text(max_size=6), st.builds(lambda a, s, b: a + s + b, st.text(max_size=3), surrogates,
                                                 st.text(max_size=3)))
digits = sys.get_int_max_str_digits()
ints = st.one_of(st.integers(), st.integers(digits - 3, digits + 3).map(lambda d: 10 ** (d - 1)),
                 st.integers(digits - 3, digits + 3).map(lambda d: -(10 ** (d - 1))))
floats = st.one_of(st.floats(), st.sampled_from([-0.0, 0.0, 1e308, -1e308, 5e-324, math.inf, math.nan]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
trees = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4), st.tuples(kids, kids),
                                                     st.dictionaries(texts, kids, max_size=4)), max_leaves=12)
deep = st.builds(nest, st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3), st.sampled_from(["list", "dict"]), trees)
values = st.one_of(trees, deep)
not_json = st.one_of(st.sets(st.integers(), max_size=3), st.binary(max_size=4), st.just(dt.date(2024, 1, 2)),
                     st.builds(object), st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
                     st.lists(st.sets(st.integers(), min_size=1), min_size=1, max_size=2))


def storable(v: Any) -> bool:
    "The oracle, written apart from the code under test: can `v` be stored and read back whole?"
    def ok(v: Any, depth: int) -> bool:
        if v is None or isinstance(v, bool): return True
        if isinstance(v, str): return _SURROGATE.search(v) is None
        if isinstance(v, int): return abs(v) < 10 ** digits  # at most `digits` digits
        if isinstance(v, float): return math.isfinite(v)
        if isinstance(v, (list, tuple)): return depth < MAX_DEPTH and all(ok(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return depth < MAX_DEPTH and all(isinstance(k, str) and ok(k, depth) and ok(x, depth + 1)
                                             for k, x in v.items())
        return False
    return ok(v, 0)


def as_json(v: Any) -> Any:
    "What JSON gives back: tuples become lists."
    if isinstance(v, (list, tuple)): return [as_json(x) for x in v]
    if isinstance(v, dict): return {k: as_json(x) for k, x in v.items()}
    return v


def same(a: Any, b: Any) -> bool:
    "Equal, telling -0.0 from 0.0."
    if isinstance(a, float) and isinstance(b, float): return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list) and isinstance(b, list): return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict) and isinstance(b, dict): return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# -- the hub --------------------------------------------------------------------------------------------
@pytest.fixture
def hub(make_tasks):
    "One store for all the examples of a test; `echo` returns its argument, or the value left in `box`."
    tasks = make_tasks(workers=0)
    box: dict[str, Any] = {}

    @tasks.task(name="echo")
    def echo(x: Any = None, boxed: bool = False) -> Any:
        return box["value"] if boxed else x

    return tasks, echo, box


@SETTINGS
@given(value=values)
def test_any_value_defer_accepts_round_trips_through_a_worker(hub, value):
    tasks, echo, _ = hub
    # When a value is deferred as an argument
    if not storable(value):
        # Then a value that could not be stored whole is refused at once, naming the task and the argument
        with pytest.raises(ArgumentError, match=r"^echo: argument 'x'"):
            echo.defer(value)
        return
    job = echo.defer(value)
    # Then the task gets it back as JSON gives it (tuples as lists), and returns it as its stored result
    drain(tasks)
    rec = job.get()
    assert rec.state == "succeeded", rec.error
    assert same(rec.args[0], as_json(value)) and same(rec.result, as_json(value))


@SETTINGS
@given(value=st.one_of(values, not_json))
def test_any_returned_value_is_stored_or_fails_that_job_alone(hub, value):
    tasks, echo, box = hub
    box["value"] = value
    # Given a job returning the value, between two good jobs of the same drain
    before, job, after = echo.defer("before"), echo.defer(boxed=True), echo.defer("after")
    drain(tasks)
    # Then it is stored whole, or the job failed with a ResultError that says what is wrong where
    rec = job.get()
    if storable(value):
        assert rec.state == "succeeded" and same(rec.result, as_json(value)), rec.error
    else:
        assert (rec.state, rec.error["type"]) == ("failed", "ResultError")
        assert rec.error["message"].startswith("echo returned a value that cannot be stored: the result"), rec.error
    # And the worker went on: its neighbours succeeded, and nothing is left running or waiting
    assert (before.get().result, after.get().result) == ("before", "after")
    assert set(tasks.counts()) <= {"succeeded", "failed"}
