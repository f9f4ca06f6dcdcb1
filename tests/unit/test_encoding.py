"""Arguments must be JSON: a bad one fails at `defer()` with an error naming the task and the argument."""
from __future__ import annotations

import datetime as dt
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fh_tasks import ArgumentError, PayloadTooLarge
from fh_tasks.encoding import _bad, _plain, decode_args, encode_args, encode_value

BAD = [
    pytest.param(object(), "object", id="object"),
    pytest.param({1, 2}, "set", id="set"),
    pytest.param(b"raw", "bytes", id="bytes"),
    pytest.param(dt.datetime(2024, 1, 2, 3, 4, 5), "datetime", id="datetime"),
    pytest.param(math.nan, "nan", id="nan"),
    pytest.param(math.inf, "inf", id="inf"),
    pytest.param({1: "one"}, "non-string key 1", id="int-key"),
    pytest.param({"a": [1, {"b": {3}}]}, "['a'][1]['b'] is a set", id="nested"),
]


@pytest.fixture
def hub(make_tasks):
    tasks = make_tasks(workers=0)

    @tasks.task(name="mail:send")
    def send(to: str, body: object = None, *extra: object, **more: object) -> None: ...

    return tasks, send


@pytest.mark.parametrize("value, detail", BAD)
def test_bad_keyword_argument_names_task_and_argument(hub, value, detail):
    # Given a registered task
    tasks, send = hub
    # When it is deferred with a non-JSON keyword argument
    with pytest.raises(ArgumentError) as e:
        send.defer(to="a@b.c", body=value)
    # Then the error is a TypeError naming the task, the argument and what is wrong, and nothing is stored
    assert isinstance(e.value, TypeError)
    msg = str(e.value)
    assert "mail:send" in msg and "'body'" in msg and detail in msg and "JSON" in msg
    assert tasks.counts() == {}


@pytest.mark.parametrize("value, detail", BAD)
def test_bad_positional_argument_is_named_after_its_parameter(hub, value, detail):
    # Given a registered task
    tasks, send = hub
    # When a positional argument is not JSON
    with pytest.raises(ArgumentError) as e:
        send.defer("a@b.c", value)
    # Then the message names the parameter it binds to
    assert "mail:send" in str(e.value) and "'body'" in str(e.value) and detail in str(e.value)
    assert tasks.counts() == {}


def test_bad_extra_positional_and_extra_keyword_arguments(hub):
    # Given a task taking *extra and **more
    tasks, send = hub
    # When values caught by *extra or **more are not JSON
    with pytest.raises(ArgumentError, match=r"mail:send: argument '#3' is a set"):
        send.defer("a@b.c", None, 1, {2})
    with pytest.raises(ArgumentError, match=r"mail:send: argument 'colour' is a bytes"):
        send.defer("a@b.c", colour=b"x")
    # Then nothing is stored
    assert tasks.counts() == {}


def test_self_referencing_argument_is_an_argument_error(hub):
    # Given a list that contains itself
    tasks, send = hub
    loop: list[object] = [1]
    loop.append(loop)
    # When it is deferred, Then the error says so (not a RecursionError)
    with pytest.raises(ArgumentError, match=r"mail:send: argument 'body'\[1\].*refers to itself"):
        send.defer("a@b.c", body=loop)
    assert tasks.counts() == {}


def test_one_bad_job_in_a_batch_stores_none(hub):
    # Given a good call and a bad call of the same task
    tasks, send = hub
    send.defer("ok@b.c")
    # When the second is bad
    with pytest.raises(ArgumentError):
        send.defer("bad@b.c", body={"when": dt.date(2024, 1, 1)})
    # Then only the good one is stored
    assert tasks.counts() == {"queued": 1}


def test_payload_limit(make_tasks):
    # Given a hub whose payload limit is 100 bytes
    tasks = make_tasks(workers=0, max_payload=100)

    @tasks.task(name="big")
    def big(blob: str) -> None: ...

    # When a call's arguments encode to more than that
    with pytest.raises(PayloadTooLarge) as e:
        big.defer("x" * 200)
    # Then PayloadTooLarge (a ValueError) names the task and the sizes, and nothing is stored
    assert isinstance(e.value, ValueError)
    assert "big:" in str(e.value) and "100-byte limit" in str(e.value)
    assert tasks.counts() == {}
    # And a call under the limit is stored
    big.defer("x" * 10)
    assert tasks.counts() == {"queued": 1}


@pytest.mark.parametrize("call, needle", [
    (lambda t: t.defer(), "missing a required argument: 'to'"),
    (lambda t: t.defer("a", nope=1), "unexpected keyword argument 'nope'"),
    (lambda t: t.defer("a", 1, 2, 3, to="b"), "multiple values for argument 'to'"),
], ids=["missing", "unknown", "twice"])
def test_wrong_call_signature_raises_type_error_at_defer(make_tasks, call, needle):
    # Given a task with a fixed signature
    tasks = make_tasks(workers=0)

    @tasks.task(name="strict")
    def strict(to: str, cc: str = "") -> None: ...

    # When it is deferred with arguments that do not bind
    with pytest.raises(TypeError) as e:
        call(strict)
    # Then the TypeError names the task and the problem, and nothing is stored
    assert str(e.value).startswith("strict: ") and needle in str(e.value)
    assert tasks.counts() == {}


def test_encode_round_trip_keeps_json_values():
    # Given JSON values of every kind
    args = ("s", 1, 2.5, True, None, [1, [2]], {"k": {"n": [None]}})
    kwargs = {"ünï": "cödé", "t": (1, 2)}
    # When they are encoded and decoded
    text = encode_args("t", args, kwargs)
    got_args, got_kwargs = decode_args(text)
    # Then they come back (tuples as lists)
    assert got_args == list(args)
    assert got_kwargs == {"ünï": "cödé", "t": [1, 2]}
    assert "ünï" in text  # stored readable, not \\u-escaped


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"args": "x"}', '{"kwargs": []}'])
def test_decode_args_rejects_other_shapes(text):
    with pytest.raises(ValueError):
        decode_args(text)


def test_encode_value_names_what_is_bad():
    with pytest.raises(ArgumentError, match=r"the result\['when'\] is a datetime"):
        encode_value({"when": dt.datetime(2024, 1, 1)}, "the result")
    assert encode_value({"a": [1, 2.5]}) == '{"a":[1,2.5]}'


def test_payload_limit_counts_bytes_not_characters(make_tasks):
    # Given a 100-byte limit and an argument of 60 two-byte characters (about 75 characters, 135 bytes encoded)
    tasks = make_tasks(workers=0, max_payload=100)

    @tasks.task(name="accented")
    def accented(text: str) -> None: ...

    # When it is deferred, Then the limit applies to the stored bytes
    with pytest.raises(PayloadTooLarge, match=r"accented: arguments are 1\d\d bytes encoded"):
        accented.defer("é" * 60)
    assert tasks.counts() == {}


def test_a_wrong_call_still_fails_after_right_calls_of_the_same_task(make_tasks):
    # Given a task already deferred with a call that binds (defer() checks each call shape once)
    tasks = make_tasks(workers=0)

    @tasks.task(name="shapes")
    def shapes(to: str, cc: str = "", /, *, bcc: str = "") -> None: ...

    shapes.defer("a")
    shapes.defer("a", "b", bcc="c")
    # When calls of other shapes come: too many positional arguments, a positional-only one by keyword, a typo
    for call, needle in [(lambda: shapes.defer("a", "b", "c"), "too many positional arguments"),
                         (lambda: shapes.defer(to="a"), "positional only"),
                         (lambda: shapes.defer("a", bc="c"), "unexpected keyword argument 'bc'")]:
        # Then each still raises, every time, and stores nothing
        for _ in range(2):
            with pytest.raises(TypeError) as e: call()
            assert str(e.value).startswith("shapes: ") and needle in str(e.value)
    assert tasks.counts() == {"queued": 2}


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                     st.integers(min_value=10 ** 590, max_value=10 ** 4400), st.just(math.inf), st.just("\ud800"))


@settings(max_examples=400, deadline=None)
@given(st.one_of(_scalars, st.dictionaries(st.one_of(st.text(), st.integers(), st.none(), st.booleans()), _scalars,
                                           max_size=40),
                 st.lists(_scalars, max_size=3)))
def test_the_fast_check_passes_only_what_the_full_check_passes(value):
    # Given any scalar or flat dict (keys of any kind), including values that cannot be stored
    # When the fast check of common arguments passes it
    # Then the full check finds nothing wrong with it either, and it encodes
    if _plain(value):
        assert _bad(value, "v") is None
        encode_args("t", (value,), {})
