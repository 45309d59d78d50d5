"""Per-account sending limits in fixed UTC windows (SEMANTICS.md §5, "Send queue").

Owns: the arithmetic of "may this account send another message now, and if not,
when exactly may it". An account may have a limit per minute, per hour and per
day, each optional (``None`` = unlimited). Each limit counts messages in a fixed
window aligned to a UTC boundary (``:00`` seconds, ``:00:00`` of the hour,
``00:00:00`` UTC of the day), so a message held for its limit has an exact reset
time that ``queue list`` can show and the scheduler can sleep until.

Exactness: with a limit of N per window, exactly N messages may be consumed in
that window; the (N+1)-th is blocked until the window's end. When several
windows are full, the binding one is the one that resets last.

Cost: a RateWindow is three integers and three window starts; every method is
O(1), does no I/O and never reads the clock (``now`` is POSIX time, passed in).
POSIX time has no leap seconds, so ``floor(now / 60) * 60`` is a UTC minute
boundary, and likewise for hours and days.

Clock stepping back: counts stay with the newest window seen. A message sent
at an earlier time is counted against that newer window, which errs on the side
of sending less, never more.

Untrusted input: none (limits come from the operator, counts from the spool).
Settings read: none; the caller passes the account's ``Limits``
(``limits_from`` turns ``[limits]`` into the workspace default).
See also: relayd.queue.scheduler (holds mail in the send queue until
``blocked_until``), relayd.store.spool (the delivery log that ``restore`` is seeded
from), relayd.controlplane.accounts (``relayctl user limits`` calls ``set_limits``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from relayd.config import LimitsConfig

MINUTE = 60
HOUR = 3600
DAY = 86400
PERIODS: tuple[int, int, int] = (MINUTE, HOUR, DAY)


@dataclass(frozen=True)
class Limits:
    """Messages an account may send per UTC minute, hour and day (None = unlimited)."""

    per_minute: int | None = None
    per_hour: int | None = None
    per_day: int | None = None

    def __post_init__(self) -> None:
        for name in ("per_minute", "per_hour", "per_day"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, not {value}")

    def as_tuple(self) -> tuple[int | None, int | None, int | None]:
        """The limits in PERIODS order (minute, hour, day)."""
        return (self.per_minute, self.per_hour, self.per_day)

    @property
    def unlimited(self) -> bool:
        """True when no window has a limit."""
        return self.as_tuple() == (None, None, None)


@dataclass(frozen=True)
class WindowCounts:
    """Messages already sent since the start of the current minute, hour and day."""

    minute: int = 0
    hour: int = 0
    day: int = 0


def window_start(now: float, period: int) -> float:
    """The start (POSIX time) of the fixed window of ``period`` seconds holding ``now``."""
    return float(math.floor(now / period) * period)


class RateWindow:
    """Sending-limit state for one account: cheap, O(1), no I/O."""

    __slots__ = ("_counts", "_limits", "_starts")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._starts: list[float] = [-math.inf, -math.inf, -math.inf]
        self._counts: list[int] = [0, 0, 0]

    @property
    def limits(self) -> Limits:
        """The limits in force."""
        return self._limits

    def set_limits(self, limits: Limits) -> None:
        """Change the limits, keeping the counts of the current windows."""
        self._limits = limits

    def _roll(self, now: float) -> None:
        for i, period in enumerate(PERIODS):
            start = window_start(now, period)
            if start > self._starts[i]:
                self._starts[i] = start
                self._counts[i] = 0

    def counts(self, now: float) -> WindowCounts:
        """Messages counted so far in the windows holding ``now``."""
        self._roll(now)
        return WindowCounts(*self._counts)

    def blocked_until(self, now: float) -> float | None:
        """None if one message may be sent now; else when the binding window resets."""
        self._roll(now)
        until: float | None = None
        for i, limit in enumerate(self._limits.as_tuple()):
            if limit is not None and self._counts[i] >= limit:
                reset = self._starts[i] + PERIODS[i]
                until = reset if until is None else max(until, reset)
        return until

    def consume(self, now: float, n: int = 1) -> None:
        """Count ``n`` sends in every current window (no check: see try_consume)."""
        if n < 0:
            raise ValueError(f"cannot consume a negative count: {n}")
        self._roll(now)
        for i in range(len(PERIODS)):
            self._counts[i] += n

    def try_consume(self, now: float) -> float | None:
        """Count one send if allowed and return None; else return blocked_until."""
        until = self.blocked_until(now)
        if until is None:
            self.consume(now)
        return until

    def restore(self, now: float, sent_in_windows: WindowCounts) -> None:
        """Seed the current windows' counts at startup (e.g. from the delivery log)."""
        self._roll(now)
        self._counts = [sent_in_windows.minute, sent_in_windows.hour, sent_in_windows.day]


def limits_from(cfg: LimitsConfig) -> Limits:
    """The workspace default sending limits of ``[limits]`` (0 there: unlimited)."""
    return Limits(per_minute=cfg.per_minute or None, per_hour=cfg.per_hour or None,
                  per_day=cfg.per_day or None)
