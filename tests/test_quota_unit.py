"""The pure quota ledger of cluster mode (relayd.queue.quota) and the lease arithmetic
(relayd.store.pgdirectory.lease_sizes): consume, windows that end, never negative."""

from __future__ import annotations

from relayd.queue.quota import BATCH_MAX, QuotaLedger, batch
from relayd.queue.ratelimit import Limits
from relayd.store.pgdirectory import Window, lease_sizes

T0 = 1_700_000_040.0  # a UTC minute boundary (divisible by 60), not an hour's
PER_MINUTE = Limits(per_minute=10)


def _grant_all(ledger: QuotaLedger, acct: int, limits: Limits, now: float,
               remaining: int = 5) -> int:
    """Answer the pending request of ``acct`` by granting what it wanted."""
    [need] = ledger.take_needs()
    assert need.account_id == acct
    ledger.granted(acct, limits, now, [(p, s, need.want, remaining)
                                       for p, s, _limit, _held in need.windows])
    return need.want


def test_unlimited_needs_nothing() -> None:
    ledger = QuotaLedger()
    assert ledger.allows(1, Limits(), T0)
    ledger.consume(1, Limits(), T0)
    assert ledger.allows(1, Limits(), T0)


def test_consume_until_none_left() -> None:
    ledger = QuotaLedger()
    asked: list[int] = []
    ledger.on_need = lambda: asked.append(1)
    assert not ledger.allows(7, PER_MINUTE, T0)
    ledger.need(7, PER_MINUTE, T0, pending=2)
    ledger.need(7, PER_MINUTE, T0, pending=2)  # already asking: no second request
    assert asked == [1]
    assert _grant_all(ledger, 7, PER_MINUTE, T0) == 2  # no more than the pending mail
    assert ledger.held(7, PER_MINUTE, T0 + 1) == 2
    ledger.consume(7, PER_MINUTE, T0 + 1)
    ledger.consume(7, PER_MINUTE, T0 + 2)
    assert not ledger.allows(7, PER_MINUTE, T0 + 3)
    ledger.consume(7, PER_MINUTE, T0 + 3)  # never below zero
    assert ledger.held(7, PER_MINUTE, T0 + 3) == 0
    ledger.need(7, PER_MINUTE, T0 + 3, pending=1)
    assert _grant_all(ledger, 7, PER_MINUTE, T0 + 3) == 1
    assert ledger.allows(7, PER_MINUTE, T0 + 3)


def test_window_change_drops_units() -> None:
    ledger = QuotaLedger()
    limits = Limits(per_minute=10, per_hour=100)
    ledger.need(3, limits, T0, pending=50)
    want = _grant_all(ledger, 3, limits, T0)
    assert ledger.held(3, limits, T0 + 59) == want
    assert ledger.held(3, limits, T0 + 60) == 0  # the minute's units are gone
    ledger.need(3, limits, T0 + 60, pending=50)
    [need] = ledger.take_needs()
    held = {p: h for p, _s, _l, h in need.windows}
    assert held == {60: 0, 3600: want}  # the hour's units are still held


def test_a_grant_for_an_ended_window_is_dropped() -> None:
    ledger = QuotaLedger()
    ledger.need(1, PER_MINUTE, T0 + 59, pending=5)
    [need] = ledger.take_needs()
    ledger.granted(1, PER_MINUTE, T0 + 60, [(60, need.windows[0][1], 5, 5)])
    assert ledger.held(1, PER_MINUTE, T0 + 60) == 0


def test_used_up_window_blocks_until_its_end() -> None:
    ledger = QuotaLedger()
    ledger.need(1, PER_MINUTE, T0 + 5, pending=5)
    [need] = ledger.take_needs()
    ledger.granted(1, PER_MINUTE, T0 + 5, [(60, need.windows[0][1], 0, 0)])
    assert ledger.blocked_until(1, T0 + 5) == T0 + 60
    ledger.need(1, PER_MINUTE, T0 + 6, pending=5)
    assert ledger.take_needs() == []  # no asking until the window resets
    assert ledger.blocked_until(1, T0 + 60) is None
    ledger.need(1, PER_MINUTE, T0 + 60, pending=5)
    assert len(ledger.take_needs()) == 1


def test_failed_lease_asks_again() -> None:
    ledger = QuotaLedger()
    ledger.need(1, PER_MINUTE, T0, pending=1)
    assert len(ledger.take_needs()) == 1
    ledger.failed(1)
    assert not ledger.allows(1, PER_MINUTE, T0)
    ledger.need(1, PER_MINUTE, T0, pending=1)
    assert len(ledger.take_needs()) == 1


def test_batch_shrinks_near_the_limit() -> None:
    assert batch(1000) == BATCH_MAX
    assert batch(40) == 10
    assert batch(3) == 1
    assert batch(0) == 1


def test_lease_sizes_never_exceed_any_window() -> None:
    minute, hour = Window(60, 0, 10, held=0), Window(3600, 0, 100, held=4)
    assert lease_sizes([minute, hour], [8, 50], want=5) == [2, 0]  # minute: 2 left
    assert lease_sizes([minute, hour], [0, 98], want=5) == [5, 1]  # hour: 4 held + 2 left
    assert lease_sizes([minute, hour], [10, 0], want=5) == [0, 0]
    assert lease_sizes([minute], [12], want=5) == [0]  # limit lowered below the count
