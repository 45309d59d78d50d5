"""Retry schedule and reply classification."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.queue.backoff import BackoffPolicy, base_delay, classify, expired, next_attempt

NOW = 1_700_000_000.0
NO_JITTER = BackoffPolicy(jitter=0.0)


def test_first_retry_after_first_delay() -> None:
    """After the first failure the next attempt is `first` seconds later (no jitter)."""
    assert next_attempt(NO_JITTER, 1, NOW, random.Random(1)) == NOW + 300


def test_delay_doubles_each_attempt() -> None:
    """Each further failure multiplies the delay by `factor`."""
    delays = [next_attempt(NO_JITTER, n, NOW, random.Random(1)) - NOW for n in (1, 2, 3, 4)]
    assert delays == [300, 600, 1200, 2400]


def test_delay_is_capped_at_maximum() -> None:
    """The delay never grows beyond `maximum` (Postfix maximal_backoff_time)."""
    assert next_attempt(NO_JITTER, 5, NOW, random.Random(1)) == NOW + 4000
    assert next_attempt(NO_JITTER, 10_000, NOW, random.Random(1)) == NOW + 4000


def test_zero_attempts_behaves_like_one() -> None:
    """Attempt counts below 1 use the first delay."""
    assert base_delay(NO_JITTER, 0) == base_delay(NO_JITTER, 1) == 300


def test_jitter_spreads_retries() -> None:
    """With jitter, different random streams give different retry times within ±jitter."""
    policy = BackoffPolicy()
    times = {next_attempt(policy, 1, NOW, random.Random(seed)) for seed in range(20)}
    assert len(times) > 1
    assert all(NOW + 240 <= t <= NOW + 360 for t in times)


def test_same_seed_same_schedule() -> None:
    """The schedule depends only on the injected random stream."""
    policy = BackoffPolicy()
    a = next_attempt(policy, 3, NOW, random.Random(42))
    b = next_attempt(policy, 3, NOW, random.Random(42))
    assert a == b


def test_never_below_one_second() -> None:
    """Even a tiny first delay with full jitter waits at least one second."""
    policy = BackoffPolicy(first=0.01, maximum=0.01, jitter=0.9)
    assert next_attempt(policy, 1, NOW, random.Random(3)) >= NOW + 1


def test_expired_after_lifetime() -> None:
    """A message is expired once it has been queued for `lifetime` seconds."""
    policy = BackoffPolicy()
    assert not expired(policy, NOW, NOW + 5 * 86400 - 1)
    assert expired(policy, NOW, NOW + 5 * 86400)


@pytest.mark.parametrize(
    ("field", "value"),
    [("first", 0), ("maximum", 10), ("factor", 0.5), ("jitter", 1.5), ("lifetime", 0)],
)
def test_invalid_policy_is_rejected(field: str, value: float) -> None:
    """A policy that could not produce a sane schedule is refused at construction."""
    with pytest.raises(ValueError, match=field):
        BackoffPolicy(**{field: value})


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, "delivered"),
        (251, "delivered"),
        (421, "deferred"),
        (452, "deferred"),
        (550, "failed"),
        (554, "failed"),
        (354, "deferred"),
        (199, "deferred"),
        (0, "deferred"),
        (600, "deferred"),
        (-1, "deferred"),
    ],
)
def test_classify(code: int, outcome: str) -> None:
    """2xx is delivered, 4xx deferred, 5xx failed, anything else deferred."""
    assert classify(code) == outcome


policies = st.builds(
    BackoffPolicy,
    first=st.floats(1, 1000),
    maximum=st.floats(1000, 100_000),
    factor=st.floats(1, 4),
    jitter=st.floats(0, 1),
)


@given(policy=policies, attempts=st.integers(1, 200))
def test_base_delay_is_monotone_and_capped(policy: BackoffPolicy, attempts: int) -> None:
    """Before jitter, delays never decrease with attempts and never exceed the maximum."""
    assert base_delay(policy, attempts) <= base_delay(policy, attempts + 1) <= policy.maximum


@given(
    policy=policies,
    attempts=st.integers(-5, 10_000),
    seed=st.integers(0, 2**32),
    now=st.floats(0, 4e9),
)
def test_jittered_delay_is_bounded(
    policy: BackoffPolicy, attempts: int, seed: int, now: float
) -> None:
    """The jittered delay lies within ±jitter of the base delay, at least 1 s, at most
    maximum * (1 + jitter)."""
    delay = next_attempt(policy, attempts, now, random.Random(seed)) - now
    base = base_delay(policy, attempts)
    slack = 1e-6 * max(1.0, now)  # float rounding of now + delay - now
    assert delay >= 1.0 - slack
    assert delay <= max(1.0, policy.maximum * (1 + policy.jitter)) + slack
    assert delay >= base * (1 - policy.jitter) - slack
    assert delay <= max(1.0, base * (1 + policy.jitter)) + slack
