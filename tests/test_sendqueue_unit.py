"""The send queue built directly: pure code, no asyncio, no relay, the clock passed in.

Per-account FIFOs taken in turn, held accounts, sending windows with their exact
reset time, handed messages, the data budget and purges (relayd.queue.sendqueue).
"""

from __future__ import annotations

from relayd.directory.accounts import Account, Domain
from relayd.queue.ratelimit import Limits, RateWindow
from relayd.queue.sendqueue import DATA_CACHE_MAX_MESSAGE, QMsg, SendQueue, effective_limits

T0 = 1_800_000_001.0  # 1 s after a UTC minute (and hour, and day) boundary


def _msg(mid: int, account_id: int, data: bytes | None = None) -> QMsg:
    return QMsg(mid, account_id, f"user{account_id}", "example.com", "app@example.com",
                T0, {0: (f"r{mid}@dest.test", 0)}, data=data)


def _everyone(_account_id: int) -> bool:
    return True


def _queue(*accounts: int, limits: Limits | None = None) -> SendQueue:
    """A send queue whose accounts have their windows; one message each was sent (id 0)."""
    sq = SendQueue(cache_budget=1 << 20)
    for a in accounts:
        sq.push(_msg(0, a))
        sq.set_window(a, RateWindow(limits or Limits()))
        taken = sq.take(T0, _everyone)
        assert taken is not None and taken.id == 0
    return sq


def _drain(sq: SendQueue, now: float = T0) -> list[int]:
    """Take messages until none may go; an account without a window gets an unlimited one."""
    out = []
    while True:
        m = sq.take(now, _everyone)
        if m is not None:
            out.append(m.id)
        elif sq.wanted is not None:
            sq.set_window(sq.wanted, RateWindow(Limits()))
        else:
            return out


def test_each_account_is_a_fifo_and_accounts_take_turns() -> None:
    sq = SendQueue(cache_budget=0)
    for mid in (1, 2, 3, 4):
        sq.push(_msg(mid, 7))
    for mid in (11, 12):
        sq.push(_msg(mid, 8))
    assert sq.has_mail()
    assert _drain(sq) == [1, 11, 2, 12, 3, 4]
    assert not sq.has_mail()


def test_an_account_without_a_window_is_wanted_and_not_skipped() -> None:
    sq = SendQueue(cache_budget=0)
    sq.push(_msg(1, 5))
    assert sq.take(T0, _everyone) is None
    assert sq.wanted == 5 and sq.earliest is None
    sq.set_window(5, RateWindow(Limits()))
    taken = sq.take(T0, _everyone)
    assert taken is not None and taken.id == 1 and sq.wanted is None


def test_a_held_account_keeps_its_mail_and_others_go_on() -> None:
    sq = _queue(1, 2)
    sq.push(_msg(10, 1))
    sq.push(_msg(20, 2))
    usable = {1: False, 2: True}
    assert [m.id for m in iter(lambda: sq.take(T0, usable.__getitem__), None)] == [20]
    assert sq.state(1, usable[1], T0) == ("held", None)
    assert [(m.id, st) for m, st, _ in sq.view(usable.__getitem__, T0)] == [(10, "held")]
    usable[1] = True  # enable
    assert _drain(sq) == [10]


def test_a_limit_blocks_until_the_exact_window_reset() -> None:
    sq = _queue(1, limits=Limits(per_minute=2))  # the placeholder used one of the two
    for mid in (1, 2, 3):
        sq.push(_msg(mid, 1))
    assert _drain(sq) == [1]
    reset = T0 - 1 + 60  # the end of the UTC minute holding T0
    assert sq.earliest == reset and sq.wanted is None
    assert sq.state(1, True, T0) == ("waiting_limit", reset)
    assert [st for _, st, _ in sq.view(_everyone, T0)] == ["waiting_limit", "waiting_limit"]
    assert _drain(sq, reset - 0.001) == []
    assert _drain(sq, reset) == [2, 3]


def test_new_limits_keep_the_counts_of_the_current_window() -> None:
    sq = _queue(1, limits=Limits(per_minute=1))
    sq.push(_msg(1, 1))
    assert _drain(sq) == []
    sq.set_limits(1, Limits(per_minute=3))
    assert _drain(sq) == [1]
    sq.push(_msg(2, 1))
    sq.push(_msg(3, 1))
    assert _drain(sq) == [2]  # 3 of 3 used this minute
    sq.set_limits(1, Limits())
    assert _drain(sq) == [3]


def test_a_handed_message_still_counts_and_a_purge_drops_it() -> None:
    sq = _queue(1, 2)
    sq.push(_msg(1, 1, data=b"x" * 10))
    sq.push(_msg(2, 1))
    sq.push(_msg(3, 2))
    sq.cache_used = 10
    first = sq.take(T0, _everyone)
    assert first is not None and first.id == 1
    sq.hand(first)
    assert sorted(m.id for m, _, _ in sq.view(_everyone, T0)) == [1, 2, 3]
    assert sorted(sq.drop(1)) == [1, 2]
    assert sq.cache_used == 0 and first.data is None
    assert not sq.unhand(1)  # its attempt finds it dropped
    assert _drain(sq) == [3]


def test_unhand_once_then_push_front_holds_it_first() -> None:
    sq = _queue(1)
    sq.push(_msg(1, 1))
    sq.push(_msg(2, 1))
    m = sq.take(T0, _everyone)
    assert m is not None
    sq.hand(m)
    assert sq.unhand(1) and not sq.unhand(1)
    sq.push_front(m)  # disabled between dispatch and attempt
    assert _drain(sq) == [1, 2]


def test_small_data_is_kept_within_the_budget() -> None:
    sq = SendQueue(cache_budget=100)
    assert sq.keep_data(b"a" * 60) is not None
    assert sq.keep_data(b"b" * 60) is not None  # under budget when asked: kept
    assert sq.keep_data(b"c") is None  # over budget now
    assert sq.cache_used == 120
    big = SendQueue(cache_budget=1 << 30)
    assert big.keep_data(b"x" * (DATA_CACHE_MAX_MESSAGE + 1)) is None
    m = _msg(1, 1, data=b"a" * 60)
    assert sq.take_data(m) == b"a" * 60 and m.data is None and sq.cache_used == 60
    assert sq.take_data(m) is None and sq.cache_used == 60


def test_effective_limits_fall_back_per_window_and_zero_is_unlimited() -> None:
    acct = Account(1, "u", Domain(1, "example.com", "s"), "hash",
                   per_minute=0, per_hour=None, per_day=50)
    got = effective_limits(acct, Limits(per_minute=10, per_hour=100, per_day=1000))
    assert got == Limits(per_minute=None, per_hour=100, per_day=50)
