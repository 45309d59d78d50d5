"""Per-account sending limits in fixed UTC windows, with an injected clock."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.queue.ratelimit import DAY, HOUR, MINUTE, PERIODS, Limits, RateWindow, WindowCounts

# 2024-05-01T12:34:00Z, a minute boundary (and 34 minutes into an hour).
T0 = 1714566840.0


def fill(window: RateWindow, now: float, n: int) -> None:
    """Consume n sends one at a time, asserting each was allowed."""
    for _ in range(n):
        assert window.try_consume(now) is None


def test_unlimited_never_blocks() -> None:
    """With no limits, any number of sends is allowed."""
    window = RateWindow(Limits())
    window.consume(T0, 10_000)
    assert window.blocked_until(T0) is None


def test_exactly_n_per_minute_are_allowed() -> None:
    """A limit of N per minute allows exactly N sends in that minute."""
    window = RateWindow(Limits(per_minute=5))
    fill(window, T0 + 1, 5)
    assert window.blocked_until(T0 + 1) is not None


def test_blocked_until_the_next_minute_boundary() -> None:
    """The (N+1)-th send in a minute waits for the next UTC minute boundary exactly."""
    window = RateWindow(Limits(per_minute=3))
    fill(window, T0 + 10, 3)
    assert window.blocked_until(T0 + 59.999) == T0 + 60
    assert window.try_consume(T0 + 59.999) == T0 + 60
    assert window.blocked_until(T0 + 60) is None


def test_window_is_aligned_not_sliding() -> None:
    """Sends at the end of a minute do not count against the next minute."""
    window = RateWindow(Limits(per_minute=2))
    fill(window, T0 + 59, 2)
    fill(window, T0 + 60, 2)
    assert window.blocked_until(T0 + 60) == T0 + 120


def test_hour_limit_resets_on_the_hour() -> None:
    """An hourly limit blocks until the next UTC hour boundary."""
    hour_start = math.floor(T0 / HOUR) * HOUR
    window = RateWindow(Limits(per_hour=4))
    for i in range(4):
        fill(window, T0 + i * MINUTE, 1)
    assert window.blocked_until(T0 + 5 * MINUTE) == hour_start + HOUR
    assert window.blocked_until(hour_start + HOUR) is None


def test_day_limit_resets_at_utc_midnight() -> None:
    """A daily limit blocks until 00:00:00 UTC of the next day."""
    midnight = math.floor(T0 / DAY) * DAY + DAY
    window = RateWindow(Limits(per_day=2))
    fill(window, T0, 1)
    fill(window, T0 + 3 * HOUR, 1)
    assert window.blocked_until(T0 + 4 * HOUR) == midnight
    assert window.blocked_until(midnight) is None


def test_binding_window_is_the_one_that_resets_last() -> None:
    """When the minute and the day are both full, the wait is until the day resets."""
    midnight = math.floor(T0 / DAY) * DAY + DAY
    window = RateWindow(Limits(per_minute=2, per_day=2))
    fill(window, T0, 2)
    assert window.blocked_until(T0) == midnight


def test_set_limits_keeps_counts() -> None:
    """Lowering a limit below what was already sent blocks at once; raising it unblocks."""
    window = RateWindow(Limits(per_minute=10))
    fill(window, T0, 5)
    window.set_limits(Limits(per_minute=5))
    assert window.blocked_until(T0) == T0 + 60
    window.set_limits(Limits(per_minute=6))
    assert window.try_consume(T0) is None
    assert window.blocked_until(T0) == T0 + 60


def test_zero_limit_blocks_everything() -> None:
    """A limit of 0 allows no send at all."""
    window = RateWindow(Limits(per_hour=0))
    assert window.blocked_until(T0) is not None


def test_restore_seeds_current_windows() -> None:
    """Counts restored at startup count against the current windows."""
    window = RateWindow(Limits(per_minute=10, per_hour=100, per_day=20))
    window.restore(T0 + 5, WindowCounts(minute=10, hour=15, day=18))
    assert window.blocked_until(T0 + 5) == T0 + 60
    assert window.counts(T0 + 60) == WindowCounts(minute=0, hour=15, day=18)
    fill(window, T0 + 60, 2)
    assert window.blocked_until(T0 + 60) == math.floor(T0 / DAY) * DAY + DAY


def test_clock_stepping_back_counts_against_the_newest_window() -> None:
    """After the clock steps back, sends still count in the newest window seen."""
    window = RateWindow(Limits(per_minute=1))
    fill(window, T0 + 60, 1)
    assert window.blocked_until(T0 + 30) == T0 + 120


def test_negative_limit_is_rejected() -> None:
    """A negative limit is a configuration error."""
    with pytest.raises(ValueError, match="per_hour"):
        Limits(per_hour=-1)


limits_strategy = st.builds(
    Limits,
    per_minute=st.none() | st.integers(0, 5),
    per_hour=st.none() | st.integers(0, 20),
    per_day=st.none() | st.integers(0, 60),
)
steps = st.lists(
    st.tuples(st.floats(0, 2 * HOUR, allow_nan=False), st.integers(1, 3)), max_size=200
)


@settings(max_examples=200, deadline=None)
@given(limits=limits_strategy, start=st.floats(0, 4e9, allow_nan=False), steps=steps)
def test_no_window_ever_exceeds_its_limit(
    limits: Limits, start: float, steps: list[tuple[float, int]]
) -> None:
    """Over any sequence of attempts, each aligned window holds at most its limit, and an
    attempt is refused only when some window is full and then until a time in the future."""
    window = RateWindow(limits)
    sent: list[float] = []
    now = start
    for gap, tries in steps:
        now += gap
        for _ in range(tries):
            until = window.try_consume(now)
            if until is None:
                sent.append(now)
            else:
                assert until > now
    for period, limit in zip(PERIODS, limits.as_tuple(), strict=True):
        per_window = Counter(math.floor(t / period) for t in sent)
        if limit is not None and per_window:
            assert max(per_window.values()) <= limit
    # Exactness: every window that refused a send was full.
    final = window.counts(now)
    for count, limit in zip((final.minute, final.hour, final.day), limits.as_tuple(), strict=True):
        if limit is not None:
            assert count <= limit


@settings(max_examples=200, deadline=None)
@given(limits=limits_strategy, start=st.floats(0, 4e9, allow_nan=False), steps=steps)
def test_refusal_only_when_a_window_is_full(
    limits: Limits, start: float, steps: list[tuple[float, int]]
) -> None:
    """A send is refused exactly when some limited window already holds its limit."""
    window = RateWindow(limits)
    sent: list[float] = []
    now = start
    for gap, tries in steps:
        now += gap
        for _ in range(tries):
            full = any(
                limit is not None
                and sum(1 for t in sent if math.floor(t / p) == math.floor(now / p)) >= limit
                for p, limit in zip(PERIODS, limits.as_tuple(), strict=True)
            )
            until = window.try_consume(now)
            assert (until is not None) == full
            if until is None:
                sent.append(now)
