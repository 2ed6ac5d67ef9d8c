"""Backoff and the retry decision, as pure functions (no database)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from durable.retry import DEFAULT_POLICY, RetryPolicy, after_failure


def test_delays_grow_exponentially_without_jitter() -> None:
    policy = RetryPolicy(base=0.05, factor=2, jitter=0)
    assert [policy.delay(a) for a in range(1, 6)] == [0.05, 0.1, 0.2, 0.4, 0.8]


def test_delays_are_capped() -> None:
    policy = RetryPolicy(base=1, factor=10, max_delay=50, jitter=0)
    assert [policy.delay(a) for a in (1, 2, 3, 10, 1000)] == [1, 10, 50, 50, 50]


def test_factor_one_is_a_constant_delay() -> None:
    policy = RetryPolicy(base=0.5, factor=1, jitter=0)
    assert {policy.delay(a) for a in range(1, 20)} == {0.5}


def test_attempt_zero_or_less_counts_as_the_first() -> None:
    policy = RetryPolicy(base=2, factor=3, jitter=0)
    assert policy.delay(0) == policy.delay(-5) == policy.delay(1) == 2


def test_jitter_stays_within_its_fraction_and_varies() -> None:
    policy = RetryPolicy(base=10, factor=2, jitter=0.1)
    rand = random.Random(1234)
    for attempt in range(1, 6):
        raw = 10 * 2 ** (attempt - 1)
        seen = {policy.delay(attempt, rand) for _ in range(200)}
        assert all(raw * 0.9 <= d <= raw * 1.1 for d in seen)
        assert len(seen) > 100  # actually random, not a constant offset


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    policy = RetryPolicy(base=1, jitter=0.5)
    a = [policy.delay(n, random.Random(7)) for n in range(1, 5)]
    b = [policy.delay(n, random.Random(7)) for n in range(1, 5)]
    assert a == b


def test_jittered_delays_still_grow_on_average() -> None:
    policy = RetryPolicy(base=1, factor=2, jitter=0.3)
    rand = random.Random(99)
    means = [sum(policy.delay(n, rand) for _ in range(500)) / 500 for n in range(1, 6)]
    assert means == sorted(means)
    assert all(later > 1.5 * earlier for earlier, later in itertools.pairwise(means))


def test_zero_base_never_waits() -> None:
    policy = RetryPolicy(base=0, jitter=1)
    assert policy.delay(3, random.Random(0)) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": -1},
        {"max_delay": -0.1},
        {"factor": 0.5},
        {"jitter": -0.01},
        {"jitter": 1.5},
        {"max_attempts": 0},
        {"max_attempts": 1001},
        {"max_attempts": 2.5},
        {"max_attempts": True},
    ],
)
def test_invalid_policies_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_default_policy_backs_off() -> None:
    rand = random.Random(3)
    first = DEFAULT_POLICY.delay(1, rand)
    third = DEFAULT_POLICY.delay(3, rand)
    assert 0 < first < third


def test_after_failure_retries_with_the_policy_delay() -> None:
    policy = RetryPolicy(base=0.05, factor=2, jitter=0)
    outcomes = [after_failure(a, 5, policy) for a in range(1, 5)]
    assert all(o.retry for o in outcomes)
    assert [o.delay for o in outcomes] == [0.05, 0.1, 0.2, 0.4]


def test_after_failure_gives_up_when_attempts_are_spent() -> None:
    policy = RetryPolicy(jitter=0)
    assert not after_failure(3, 3, policy).retry
    assert not after_failure(4, 3, policy).retry
    assert not after_failure(1, 1, policy).retry


def test_non_retryable_fails_at_once() -> None:
    outcome = after_failure(1, 10, RetryPolicy(), retryable=False)
    assert not outcome.retry


def test_requested_delay_wins_over_the_policy() -> None:
    policy = RetryPolicy(base=100, jitter=0)
    assert after_failure(1, 3, policy, requested_delay=0.25).delay == 0.25
    assert after_failure(2, 3, policy, requested_delay=-4).delay == 0.0


def test_requested_delay_does_not_extend_attempts() -> None:
    assert not after_failure(3, 3, RetryPolicy(), requested_delay=1).retry


def test_a_very_late_attempt_waits_the_cap_instead_of_overflowing() -> None:
    # max_attempts may be large; factor ** attempt overflows a float past ~1024 doublings.
    assert RetryPolicy(jitter=0).delay(1500) == 300.0
    assert RetryPolicy(base=0, jitter=0).delay(5000) == 0.0
    assert after_failure(2000, 10**6, RetryPolicy(jitter=0)).delay == 300.0
