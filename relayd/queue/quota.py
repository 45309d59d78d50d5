"""Sending-limit quota leased from the cluster: the units this node holds (SEMANTICS §7).

Owns: in cluster mode, the count of units this node holds for each account's current
sending windows, and what to ask for next. Every node of a cluster leases units of an
account's limited windows (minute, hour, day, fixed UTC windows as in
relayd.queue.ratelimit) from PostgreSQL; the sum of the units leased to all nodes in a
window never exceeds its limit, so an account may send its first attempt of a message
only while this node holds a unit of each of its limited windows, and each first
attempt uses one unit of each (``consume``). Units of a window that has ended are
dropped (an unused lease under-sends, never over-sends).

When an account with mail holds no unit, the send queue asks for some (``need``): how
many (``want``) is the account's pending mail here, capped by a batch that shrinks as
the window's remaining quota nears zero (``batch``), so one node does not hold what
another could send. The lease itself (I/O) is the caller's: it takes the requests
(``take_needs``) and reports the answer (``granted`` or ``failed``). A lease that
showed a window used up makes the account wait until that window resets
(``blocked_until``: the ``waiting_limit`` reset time); it asks no more until then.

Pure: no I/O, no asyncio, no clock (``now`` is passed in); ``on_need`` is called when
a request is added, so that whoever leases may wake. Cost: O(1) per call (three
windows at most).
Untrusted input: none. Settings read: none (limits are passed in).
See also: relayd.queue.sendqueue (``take`` asks ``allows``), relayd.cluster.quota (the
leases), relayd.store.pgdirectory (``lease``: the table and its one transaction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from relayd.queue.ratelimit import PERIODS, Limits, window_start

BATCH_MAX = 32


@dataclass(frozen=True, slots=True)
class Need:
    """A lease to ask for: ``windows`` as (period, start, limit, units held) and the
    number of messages (``want``) this node would send with it, under ``limits``."""

    account_id: int
    limits: Limits
    windows: list[tuple[int, int, int, int]]
    want: int


@dataclass(slots=True)
class _Account:
    # period -> [window start, units held, remaining quota seen at the last lease]
    held: dict[int, list[int]] = field(default_factory=dict)
    exhausted_until: float | None = None
    asking: bool = False


def batch(remaining: int) -> int:
    """How many units to ask for when about ``remaining`` are left cluster-wide."""
    return max(1, min(BATCH_MAX, remaining // 4))


class QuotaLedger:
    """The units this node holds, per account and current window."""

    def __init__(self) -> None:
        self._accounts: dict[int, _Account] = {}
        self._needs: dict[int, Need] = {}
        #: Called (no arguments) when a request is added.
        self.on_need: Callable[[], None] | None = None

    def _current(self, account_id: int, limits: Limits, now: float) -> list[tuple[int, int, int]]:
        """(period, start, limit) of the limited windows holding ``now``; units of ended
        windows (and of periods no longer limited) dropped."""
        acct = self._accounts.get(account_id)
        out = []
        for period, limit in zip(PERIODS, limits.as_tuple(), strict=True):
            if limit is None:
                if acct is not None:
                    acct.held.pop(period, None)
                continue
            start = int(window_start(now, period))
            if acct is not None:
                row = acct.held.get(period)
                if row is not None and row[0] != start:
                    del acct.held[period]
            out.append((period, start, limit))
        return out

    def held(self, account_id: int, limits: Limits, now: float) -> int:
        """Messages this node may send now on the units it holds (0 if none)."""
        windows = self._current(account_id, limits, now)
        acct = self._accounts.get(account_id)
        if not windows:
            return 1 << 62
        if acct is None:
            return 0
        return min(acct.held[p][1] if p in acct.held else 0 for p, _s, _l in windows)

    def allows(self, account_id: int, limits: Limits, now: float) -> bool:
        """True if the account may send one message now (unlimited, or a unit held in
        every limited window)."""
        return self.held(account_id, limits, now) > 0

    def consume(self, account_id: int, limits: Limits, now: float) -> None:
        """One first attempt: one unit of each limited window (never below zero)."""
        self._current(account_id, limits, now)
        acct = self._accounts.get(account_id)
        if acct is not None:
            for row in acct.held.values():
                row[1] = max(0, row[1] - 1)

    def blocked_until(self, account_id: int, now: float) -> float | None:
        """When a window the cluster has used up resets (None: not known to be used up)."""
        acct = self._accounts.get(account_id)
        if acct is None or acct.exhausted_until is None:
            return None
        if acct.exhausted_until <= now:
            acct.exhausted_until = None
            return None
        return acct.exhausted_until

    def need(self, account_id: int, limits: Limits, now: float, pending: int) -> None:
        """The account has ``pending`` messages and no unit: ask for a lease (unless one is
        being asked for, or a window is known used up)."""
        acct = self._accounts.setdefault(account_id, _Account())
        if acct.asking or self.blocked_until(account_id, now) is not None or pending <= 0:
            return
        windows = self._current(account_id, limits, now)
        if not windows:
            return
        remaining = min(acct.held[p][2] if p in acct.held else limit
                        for p, _s, limit in windows)
        rows = [(p, s, limit, acct.held[p][1] if p in acct.held else 0)
                for p, s, limit in windows]
        acct.asking = True
        self._needs[account_id] = Need(account_id, limits, rows, min(pending, batch(remaining)))
        if self.on_need is not None:
            self.on_need()

    def take_needs(self) -> list[Need]:
        """The requests to lease now (each is answered by ``granted`` or ``failed``)."""
        needs = list(self._needs.values())
        self._needs.clear()
        return needs

    def granted(self, account_id: int, limits: Limits, now: float,
                grants: list[tuple[int, int, int, int]]) -> None:
        """A lease's answer: (period, start, units granted, remaining after) per window.
        Units of a window that ended meanwhile are dropped."""
        acct = self._accounts.setdefault(account_id, _Account())
        acct.asking = False
        current = {p: s for p, s, _l in self._current(account_id, limits, now)}
        for period, start, units, remaining in grants:
            if current.get(period) != start:
                continue
            row = acct.held.setdefault(period, [start, 0, remaining])
            row[1] += units
            row[2] = remaining
        if self.held(account_id, limits, now) > 0:
            return
        used_up = [start + period for period, start, _u, remaining in grants
                   if remaining == 0 and current.get(period) == start
                   and acct.held.get(period, [0, 0])[1] == 0]
        acct.exhausted_until = float(max(used_up)) if used_up else None

    def failed(self, account_id: int) -> None:
        """The lease could not be made: no units; a later pass asks again."""
        acct = self._accounts.get(account_id)
        if acct is not None:
            acct.asking = False
