"""Per-destination shaping's pure state (relayd.queue.shaping): destinations, token
buckets, the connection cap, throttling replies and the bounded exponential back-off,
driven by an injected clock (plain numbers)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from relayd.config import ConfigError, ShapingConfig, ShapingDestination, loads
from relayd.delivery.client import Hop
from relayd.queue.shaped import RunChain, Shaping
from relayd.queue.shaping import Shaper, throttling
from relayd.store.records import AttemptResult

GOOGLE = ShapingDestination(name="google", mx_suffixes=("google.com",), connections=2,
                            messages_per_second=2.0)
SMALL = ShapingDestination(name="small", domains=("small.test",), messages_per_minute=6)


def shaper(**kw: object) -> Shaper:
    return Shaper(ShapingConfig(destination=(GOOGLE, SMALL), **kw))  # type: ignore[arg-type]


def test_destination_by_domain_then_mx_suffix_else_the_domain() -> None:
    s = shaper(messages_per_second=5.0)
    assert s.destination("small.test", "mx.small.test")[0] == "small"
    name, lim = s.destination("gmail.com", "gmail-smtp-in.l.google.com.")
    assert (name, lim.connections, lim.per_second) == ("google", 2, 2.0)
    assert s.destination("x.test", "google.com")[0] == "google"  # the suffix itself
    assert s.destination("x.test", "notgoogle.com")[0] == "x.test"  # not a label boundary
    name, lim = s.destination("other.test", "mx.other.test")
    assert (name, lim.per_second, lim.connections) == ("other.test", 5.0, 0)
    # A table entry's omitted limits are the default row's.
    assert s.destination("small.test", "")[1].per_second == 5.0


def test_per_second_spreads_messages() -> None:
    s = shaper()
    _n, lim = s.destination("gmail.com", "mx.google.com")
    starts: list[float] = []
    now = 100.0
    while len(starts) < 6:
        wait = s.acquire("google", lim, now)
        if wait == 0:
            starts.append(now)
            s.release("google", [(250, "ok")], now)
        else:
            assert 0 < wait <= 0.5 + 1e-9
            now += wait
    # A burst of two (one second's worth), then one every half second.
    assert starts[:2] == [100.0, 100.0]
    assert starts[-1] == pytest.approx(102.0)


def test_per_minute_spreads_evenly() -> None:
    s = shaper()
    _n, lim = s.destination("small.test", "")
    assert s.acquire("small", lim, 0.0) == 0
    assert s.acquire("small", lim, 0.0) == pytest.approx(10.0)
    assert s.acquire("small", lim, 10.0) == 0


def test_connection_cap_until_a_transmission_ends() -> None:
    s = shaper()
    _n, lim = s.destination("gmail.com", "mx.google.com")
    assert s.acquire("google", lim, 0.0) == 0
    assert s.acquire("google", lim, 5.0) == 0
    assert s.acquire("google", lim, 10.0) == float("inf")  # two in progress
    s.release("google", [(250, "ok")], 10.0)
    assert s.acquire("google", lim, 10.0) == 0


@pytest.mark.parametrize(("code", "text", "expected"), [
    (421, "4.7.0 Try again later", True),
    (421, "Service not available", True),
    (451, "4.7.1 Please slow down", True),
    (450, "4.2.1 Mailbox busy", False),
    (451, "4.3.0 Local error", False),
    (550, "5.7.1 Rejected", False),
    (250, "2.0.0 OK", False),
    (None, "SMTPConnectResponseError: (421, '4.7.0 Try again later')", True),
    (None, "SMTPConnectResponseError: (450, '4.7.1 Too many connections')", True),
    (None, "SMTPConnectError: Error connecting to 127.0.0.2 on port 25", False),
])
def test_throttling_replies(code: int | None, text: str, expected: bool) -> None:
    assert throttling(code, text) is expected


def test_backoff_is_exponential_bounded_and_reset_by_a_delivery() -> None:
    s = shaper(backoff_initial_seconds=10.0, backoff_max_seconds=25.0)
    _n, lim = s.destination("gmail.com", "mx.google.com")
    ends = []
    now = 0.0
    for _ in range(3):
        assert s.acquire("google", lim, now) == 0
        assert s.release("google", [(421, "4.7.0 Try again later")], now)
        ends.append(s.backed_off("google", now) - now)
        now = s.backed_off("google", now)  # the back-off ended
        assert s.backed_off("google", now) == 0
    assert ends == [10.0, 20.0, 25.0]
    st = s.states["google"]
    assert (st.throttled, st.reason) == (3, "4.7.0 Try again later")
    # A delivery resets the level: the next throttling starts over.
    s.acquire("google", lim, now)
    assert not s.release("google", [(250, "ok")], now)
    s.acquire("google", lim, now)
    s.release("google", [(451, "4.7.1 slow down")], now)
    assert s.backed_off("google", now) == now + 10.0
    assert [b.name for b in s.backoffs(now)] == ["google"]
    # Another destination is not affected.
    assert s.backed_off("small", now) == 0


def test_reload_keeps_backoffs_and_applies_new_limits() -> None:
    s = shaper()
    _n, lim = s.destination("gmail.com", "mx.google.com")
    s.acquire("google", lim, 0.0)
    s.release("google", [(421, "busy")], 0.0)
    s.configure(ShapingConfig(destination=(msgspec.structs.replace(GOOGLE, connections=1),)))
    assert s.states["google"].limits.connections == 1
    assert s.backed_off("google", 1.0) > 1.0


def test_idle_state_is_forgotten() -> None:
    s = shaper()
    _n, lim = s.destination("gmail.com", "mx.google.com")
    s.acquire("google", lim, 0.0)
    s.release("google", [(250, "ok")], 0.0)
    s.forget_idle(0.1)
    assert "google" in s.states  # its bucket is not full again yet
    s.forget_idle(100.0)
    assert "google" not in s.states


def test_config_table_from_toml() -> None:
    cfg = loads("""
[delivery.shaping]
connections = 10
messages_per_second = 5
backoff_initial_seconds = 30

[[delivery.shaping.destination]]
name = "google"
mx_suffixes = ["google.com", "googlemail.com"]
connections = 3
messages_per_connection = 50
""")
    sh = cfg.delivery.shaping
    assert (sh.connections, sh.backoff_initial_seconds) == (10, 30.0)
    assert sh.destination[0].mx_suffixes == ("google.com", "googlemail.com")
    assert sh.destination[0].messages_per_second is None  # the default row's
    with pytest.raises(ConfigError):
        loads('[[delivery.shaping.destination]]\nname = "x"\n')  # matches nothing


# -- the dispatcher's side (relayd.queue.shaped): waiting, deferring, backing off ---------
class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _result(msg: object, idx: int, hop: str, code: int | None, text: str,
            now: float) -> AttemptResult:
    outcome = "deferred" if code is None or 400 <= code < 500 else "delivered"
    return AttemptResult(message_id=1, idx=idx, recipient="r@x.test", username="u",
                         domain="example.com", next_hop=hop, code=code, text=text,
                         outcome=outcome, ts=now,
                         next_attempt=now + 300 if outcome == "deferred" else None)


async def test_shaped_waits_then_defers_beyond_the_waiters_and_backs_off() -> None:
    clock = _Clock()
    cfg = ShapingConfig(backoff_initial_seconds=30.0, destination=(
        ShapingDestination(name="one", domains=("one.test",), connections=1),))
    sh = Shaping(cfg, clock, workers=4)  # one waiter per destination
    hop = Hop("127.0.0.2", 25, mx="mx.one.test")
    dest = sh.destination("one.test", [hop])
    gate = asyncio.Event()
    reply = [(250, "ok")]
    order: list[str] = []

    def chain(name: str) -> RunChain:
        async def send(hops: tuple[Hop, ...]) -> list[AttemptResult]:
            order.append(name)
            await gate.wait()
            return [_result(None, 0, hops[0].name, *reply[0], clock())]
        return send

    async def attempt(name: str) -> list[AttemptResult]:
        return await sh.send(dest, (hop,), [0], chain(name),
                             lambda i, text, now: _result(None, i, "-", None, text, now))

    first = asyncio.ensure_future(attempt("first"))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(attempt("second"))  # waits for the connection
    await asyncio.sleep(0.01)
    [third] = await attempt("third")  # beyond the waiters: deferred, back soon
    assert order == ["first"]
    assert third.outcome == "deferred" and "shaping limit" in third.text
    assert third.next_attempt == clock.now + 5.0  # not the retry schedule's 300 s
    reply[0] = (421, "4.7.0 Try again later")
    gate.set()
    [r1], [r2] = await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert r1.next_attempt == r2.next_attempt == clock.now + 300  # later than the back-off
    [b] = sh.backoffs()
    assert (b.name, b.backoff_until, b.throttled) == ("one", clock.now + 30.0, 2)
    # Backed off: deferred without a transmission, back at the end of the back-off.
    clock.now += 10
    [r3] = await attempt("fourth")
    assert order == ["first", "second"]
    assert "backed off" in r3.text and r3.next_attempt == clock.now + 300
    sh.configure(ShapingConfig(backoff_initial_seconds=30.0))
    assert sh.label("one") == "other" and sh.backoffs()  # a reload keeps back-offs
