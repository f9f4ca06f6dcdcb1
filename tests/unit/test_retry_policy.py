"""RetryPolicy: exponential backoff with bounded jitter, a pure function of the attempt and a random draw."""
from __future__ import annotations

import pytest

from fh_tasks.retry import RetryPolicy


def test_backoff_doubles_per_attempt_without_jitter():
    # Given a policy starting at 0.5 s
    p = RetryPolicy(retries=5, delay=0.5)
    # When the random draw is 0
    waits = [p.backoff(n, rnd=0.0) for n in range(1, 6)]
    # Then each wait doubles the last
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_jitter_stretches_by_at_most_its_fraction():
    p = RetryPolicy(retries=3, delay=1.0, jitter=0.25)
    assert p.backoff(1, rnd=0.0) == 1.0
    assert p.backoff(1, rnd=1.0) == 1.25
    assert p.backoff(3, rnd=0.5) == pytest.approx(4.0 * 1.125)


def test_backoff_grows_whatever_the_jitter():
    # Given the worst draws (late attempt gets 0, early attempt gets 1)
    p = RetryPolicy(retries=6, delay=0.05)
    # Then a later attempt still waits longer than an earlier one
    for n in range(1, 6):
        assert p.backoff(n + 1, rnd=0.0) > p.backoff(n, rnd=0.999)


def test_backoff_is_capped():
    p = RetryPolicy(retries=50, delay=1.0, max_delay=10.0)
    assert p.backoff(30, rnd=0.0) == 10.0
    assert p.backoff(30, rnd=1.0) == 10.0
    assert p.backoff(2000, rnd=0.5) == 10.0  # no float overflow for absurd attempt numbers


def test_zero_delay_means_no_wait():
    assert RetryPolicy(retries=2, delay=0.0).backoff(2, rnd=0.9) == 0.0


def test_default_draw_stays_within_bounds():
    p = RetryPolicy(retries=1, delay=2.0)
    for _ in range(50):
        assert 2.0 <= p.backoff(1) <= 2.5


def test_max_attempts_counts_the_first_try():
    assert RetryPolicy().max_attempts == 1
    assert RetryPolicy(retries=3).max_attempts == 4


@pytest.mark.parametrize("kw, needle", [
    (dict(retries=-1), "retries"), (dict(delay=-1.0), "retry_delay"),
    (dict(factor=0.5), "factor"), (dict(jitter=1.0), "jitter"), (dict(jitter=-0.1), "jitter"),
])
def test_bad_policy_values(kw, needle):
    with pytest.raises(ValueError, match=needle):
        RetryPolicy(**kw)
