"""Per-destination shaping for MX delivery: limits and automatic back-off (pure).

Owns: which *destination* a recipient domain belongs to (a table entry matched by
the domain or by its best MX host's name suffix, else the domain itself under the
default row), and per destination the state that decides whether an attempt may
start now: transmissions in progress (the connection cap), two token buckets
(messages per second and per minute, spread evenly), and the back-off after a
throttling reply (421, or a 4.7.x enhanced status): exponential from
``backoff_initial_seconds`` to ``backoff_max_seconds``, reset by a delivery.

No I/O and no clock of its own: every call takes ``now`` (the dispatcher passes
its clock), so the unit tests drive it with numbers. The dispatcher asks
``acquire`` before a transmission and calls ``release`` with its replies after.

Untrusted input: reply codes and texts of next hops (``throttling``: any text).
Settings read: [delivery.shaping] (``ShapingConfig``, replaced on reload).
See also: relayd.queue.dispatch (where it is applied), docs/SEMANTICS.md §4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from relayd.config import ShapingConfig, ShapingDestination

#: A connection-level error text carrying a throttling reply, e.g. a greeting
#: ``SMTPConnectResponseError: (421, '4.7.0 Try again later')``.
_THROTTLE_IN_TEXT = re.compile(r"\(421, |\(4\d\d, ['\"]4\.7\.\d")
_ENHANCED_47 = re.compile(r"4\.7\.\d{1,3}\b")


def throttling(code: int | None, text: str) -> bool:
    """True for a reply by which a destination asks to be sent less: 421, or a 4xx
    with a 4.7.x enhanced status (also inside a connection error's text)."""
    if code is None:
        return _THROTTLE_IN_TEXT.search(text) is not None
    if code == 421:
        return True
    return 400 <= code < 500 and _ENHANCED_47.match(text.lstrip()) is not None


@dataclass(frozen=True, slots=True)
class Limits:
    """One destination's limits (0: no limit)."""

    connections: int = 0
    messages_per_connection: int = 0
    per_second: float = 0.0
    per_minute: int = 0

    @property
    def limited(self) -> bool:
        """True if any limit applies (else only the back-off can hold mail)."""
        return bool(self.connections or self.per_second or self.per_minute)


class Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` kept."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: now)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1.0


@dataclass(slots=True)
class State:
    """One destination's state."""

    name: str
    limits: Limits
    buckets: list[Bucket] = field(default_factory=list)
    active: int = 0  # transmissions in progress
    backoff_until: float = 0.0
    backoff_level: int = 0  # throttling replies in a row
    throttled: int = 0  # throttling replies since start
    reason: str = ""  # the last throttling reply


def _limits(row: ShapingDestination | ShapingConfig, base: Limits) -> Limits:
    def pick(value: float | None, default: float) -> float:
        return default if value is None else value
    return Limits(
        connections=int(pick(row.connections, base.connections)),
        messages_per_connection=int(pick(row.messages_per_connection,
                                         base.messages_per_connection)),
        per_second=float(pick(row.messages_per_second, base.per_second)),
        per_minute=int(pick(row.messages_per_minute, base.per_minute)))


class Shaper:
    """Destinations, their limits and their state; every decision takes ``now``."""

    def __init__(self, cfg: ShapingConfig) -> None:
        self.states: dict[str, State] = {}
        self.configure(cfg)

    def configure(self, cfg: ShapingConfig) -> None:
        """New settings (a reload): limits apply to the next attempts; back-offs stay."""
        self.cfg = cfg
        self.default = _limits(cfg, Limits())
        self._by_domain: dict[str, tuple[str, Limits]] = {}
        self._by_suffix: list[tuple[str, str, Limits]] = []
        for row in cfg.destination:
            lim = _limits(row, self.default)
            for d in row.domains:
                self._by_domain[d.lower().rstrip(".")] = (row.name, lim)
            for s in row.mx_suffixes:
                self._by_suffix.append((s.lower().strip(".").lstrip("*."), row.name, lim))
        for st in self.states.values():
            st.limits = self._limits_of(st.name)
            st.buckets = []

    def _limits_of(self, name: str) -> Limits:
        for row in self.cfg.destination:
            if row.name == name:
                return _limits(row, self.default)
        return self.default

    def destination(self, domain: str, mx_host: str) -> tuple[str, Limits]:
        """The destination of a recipient domain whose best MX host is ``mx_host``."""
        found = self._by_domain.get(domain)
        if found is not None:
            return found
        host = mx_host.lower().rstrip(".")
        for suffix, name, lim in self._by_suffix:
            if host == suffix or host.endswith("." + suffix):
                return name, lim
        return domain, self.default

    def state(self, name: str, limits: Limits) -> State:
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = State(name, limits)
        return st

    def backed_off(self, name: str, now: float) -> float:
        """The end of the destination's back-off, or 0 if it is not backed off now."""
        st = self.states.get(name)
        return st.backoff_until if st is not None and st.backoff_until > now else 0.0

    def acquire(self, name: str, limits: Limits, now: float) -> float:
        """0 and the attempt counts as started; else seconds to wait (a limit is reached;
        ``float('inf')``: until a transmission ends)."""
        st = self.state(name, limits)
        lim = st.limits
        if lim.connections and st.active >= lim.connections:
            return float("inf")
        if not st.buckets:
            st.buckets = [Bucket(r, max(1.0, r), now) for r in
                          (lim.per_second, lim.per_minute / 60.0) if r > 0]
        wait = max((b.wait(now) for b in st.buckets), default=0.0)
        if wait > 0:
            return wait
        for b in st.buckets:
            b.take()
        st.active += 1
        return 0.0

    def release(self, name: str, replies: list[tuple[int | None, str]], now: float) -> bool:
        """A transmission ended with these replies; True if the destination backs off now."""
        st = self.states.get(name)
        if st is None:
            return False
        st.active = max(0, st.active - 1)
        if any(code is not None and 200 <= code < 300 for code, _t in replies):
            st.backoff_level = 0
            return False
        for code, text in replies:
            if throttling(code, text):
                return self.throttle(st, text, now)
        return False

    def throttle(self, st: State, text: str, now: float) -> bool:
        """Back the destination off after a throttling reply (exponential, bounded; replies
        to transmissions that overlapped one already backed off do not double it)."""
        cfg = self.cfg
        st.throttled += 1
        st.reason = text[:200]
        if st.backoff_until > now:
            return True
        seconds = min(cfg.backoff_max_seconds,
                      cfg.backoff_initial_seconds * (2 ** min(st.backoff_level, 30)))
        st.backoff_level += 1
        st.backoff_until = now + seconds
        return True

    def backoffs(self, now: float) -> list[State]:
        """The destinations backed off now."""
        return [st for st in self.states.values() if st.backoff_until > now]

    def forget_idle(self, now: float) -> None:
        """Drop the state of destinations with nothing to remember (bounded memory)."""
        for name in [n for n, st in self.states.items()
                     if not st.active and st.backoff_until <= now and not st.backoff_level
                     and all(b.wait(now) == 0 and b.tokens >= b.burst for b in st.buckets)]:
            del self.states[name]
