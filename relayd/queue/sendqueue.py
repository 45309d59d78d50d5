"""The send queue and the sending windows: which message is attempted next.

Owns: new messages waiting for their first attempt, in one FIFO per account;
accounts take turns one message at a time (round robin), so one account's
backlog never starves another. An account over its sending limit keeps its
mail here until its window resets (state ``waiting_limit``, with the exact
reset time from relayd.queue.ratelimit); a disabled account's mail is *held*
here, untouched, until ``enable``. Messages taken out for a worker but whose
attempt has not started yet (``handed``) still count as in the send queue (a
disable in between holds them again). The data of small messages stays in
memory within a byte budget (``keep_data``).

Pure: no asyncio, no I/O, no clock. Time (``now``) and whether an account may
send (``usable``) are passed in. An account's sending window is made by the
caller (it is seeded from the delivery log): ``take`` says which account needs
one (``wanted``) and ``set_window`` gives it. In cluster mode (``quota`` set), an
account also needs a unit of quota leased from the cluster for each first attempt
(relayd.queue.quota); without one its mail waits and ``take`` asks for a lease.

Cost: ``push`` and ``take`` are O(1) per account visited; ``view``,
``remove`` and ``drop`` are O(messages) (control path).
Untrusted input: none (messages were checked at acceptance).
Settings read: none; the caller passes limits and budgets.
See also: relayd.queue.scheduler (the loop around ``take``), relayd.queue.dispatch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relayd.directory.accounts import Account
from relayd.queue.quota import QuotaLedger
from relayd.queue.ratelimit import Limits, RateWindow

DATA_CACHE_MAX_MESSAGE = 256 * 1024


@dataclass(slots=True)
class QMsg:
    """A message (or the part of it due now) in memory."""

    id: int
    account_id: int
    username: str
    domain: str
    sender: str
    received_at: float
    rcpts: dict[int, tuple[str, int]]  # idx -> (address, attempts so far)
    is_bounce: bool = False
    data: bytes | None = None
    retry: bool = False
    size: int = 0  # of the data: what loading it for an attempt costs in memory


def effective_limits(account: Account, default: Limits) -> Limits:
    """The account's limits, falling back to the workspace default per window.

    An account value of 0 means unlimited (as in ``[limits]``), overriding
    the workspace default; None means "use the default".
    """

    def pick(own: int | None, fallback: int | None) -> int | None:
        if own is None:
            return fallback
        return own or None

    return Limits(
        per_minute=pick(account.per_minute, default.per_minute),
        per_hour=pick(account.per_hour, default.per_hour),
        per_day=pick(account.per_day, default.per_day),
    )


@dataclass(slots=True)
class _AccountQueue:
    pending: deque[QMsg] = field(default_factory=deque)
    window: RateWindow | None = None


class SendQueue:
    """Per-account FIFOs taken in turn, within each account's sending window."""

    def __init__(self, cache_budget: int) -> None:
        self.cache_budget = cache_budget
        self.cache_used = 0  # bytes of message data held by queued messages
        self._queues: dict[int, _AccountQueue] = {}
        self._rr: deque[int] = deque()
        self._handed: dict[int, QMsg] = {}  # left the send queue, attempt not started yet
        #: After ``take`` returned None: the account that needs its window first
        #: (``set_window``), else None.
        self.wanted: int | None = None
        #: After ``take`` returned None: when the first blocked account may send again.
        self.earliest: float | None = None
        #: Cluster mode: the quota this node leased (None: a single node, limits local).
        self.quota: QuotaLedger | None = None

    # -- data held in memory --------------------------------------------------------
    def keep_data(self, data: bytes) -> bytes | None:
        """``data`` if it is kept in memory for the attempt (small, within the budget)."""
        if len(data) <= DATA_CACHE_MAX_MESSAGE and self.cache_used < self.cache_budget:
            self.cache_used += len(data)
            return data
        return None

    def take_data(self, msg: QMsg) -> bytes | None:
        """The message's data, which leaves the memory budget (None if not held)."""
        data = msg.data
        if data is not None:
            self.cache_used -= len(data)
            msg.data = None
        return data

    # -- in and out -----------------------------------------------------------------
    def push(self, msg: QMsg) -> None:
        """Put a message at the end of its account's FIFO."""
        aq = self._queues.get(msg.account_id)
        if aq is None:
            aq = self._queues[msg.account_id] = _AccountQueue()
        if not aq.pending:
            self._rr.append(msg.account_id)
        aq.pending.append(msg)

    def push_front(self, msg: QMsg) -> None:
        """Put a message back at the head of its account's FIFO (held on disable)."""
        aq = self._queues.setdefault(msg.account_id, _AccountQueue())
        if not aq.pending:
            self._rr.append(msg.account_id)
        aq.pending.appendleft(msg)

    def has_mail(self) -> bool:
        """True if some account has mail waiting (held or blocked ones included)."""
        return bool(self._rr)

    def take(self, now: float, usable: Callable[[int], bool]) -> QMsg | None:
        """The next message to attempt, its send counted in its account's window.

        Visits each account with mail at most once, in turn. None when no
        account may send now: then ``wanted`` names an account whose window
        must be set first, or ``earliest`` says when a blocked one resets.
        """
        self.wanted = None
        self.earliest = None
        for _ in range(len(self._rr)):
            if not self._rr:
                break
            acct_id = self._rr[0]
            aq = self._queues.get(acct_id)
            if aq is None or not aq.pending:
                self._rr.popleft()
                continue
            if not usable(acct_id):
                self._rr.rotate(-1)
                continue  # held until enable (or purge)
            if aq.window is None:
                self.wanted = acct_id
                return None
            self._rr.rotate(-1)
            until = aq.window.blocked_until(now)
            if until is None and not self._quota_allows(acct_id, aq, now):
                until = self.quota.blocked_until(acct_id, now) if self.quota else None
                if until is None:
                    continue  # a lease was asked for: its answer wakes the caller
            if until is not None:
                self.earliest = until if self.earliest is None else min(self.earliest, until)
                continue
            aq.window.consume(now)
            if self.quota is not None:
                self.quota.consume(acct_id, aq.window.limits, now)
            msg = aq.pending.popleft()
            if not aq.pending:
                self._rr.remove(acct_id)
            return msg
        return None

    def _quota_allows(self, acct_id: int, aq: _AccountQueue, now: float) -> bool:
        """Cluster mode: True if the account holds quota for one message; else a lease is
        asked for. Always True on a single node."""
        quota = self.quota
        if quota is None or aq.window is None:
            return True
        limits = aq.window.limits
        if quota.allows(acct_id, limits, now):
            return True
        quota.need(acct_id, limits, now, len(aq.pending))
        return False

    def hand(self, msg: QMsg) -> None:
        """``msg`` (from ``take``) waits for a worker: it still counts as queued."""
        self._handed[msg.id] = msg

    def unhand(self, message_id: int) -> bool:
        """The handed message's attempt starts; False if it was not handed (or dropped)."""
        return self._handed.pop(message_id, None) is not None

    # -- windows and states -----------------------------------------------------------
    def set_window(self, account_id: int, window: RateWindow) -> None:
        """Give an account (that has mail) its sending window, unless it has one."""
        aq = self._queues.get(account_id)
        if aq is not None and aq.window is None:
            aq.window = window

    def set_limits(self, account_id: int, limits: Limits) -> None:
        """Apply an account's (new) limits to its window, keeping the counts."""
        aq = self._queues.get(account_id)
        if aq is not None and aq.window is not None:
            aq.window.set_limits(limits)

    def state(self, account_id: int, usable: bool, now: float) -> tuple[str, float | None]:
        """The state of an account's pending mail (queued, held, waiting_limit), with the
        reset time if any."""
        if not usable:
            return "held", None
        aq = self._queues.get(account_id)
        if aq is not None and aq.window is not None:
            until = aq.window.blocked_until(now)
            if until is None and self.quota is not None and not self.quota.allows(
                    account_id, aq.window.limits, now):
                until = self.quota.blocked_until(account_id, now)
            if until is not None:
                return "waiting_limit", until
        return "queued", None

    def view(self, usable: Callable[[int], bool],
             now: float) -> list[tuple[QMsg, str, float | None]]:
        """Every message in the send queue (handed ones included) with its state."""
        out: list[tuple[QMsg, str, float | None]] = []
        for acct_id, aq in self._queues.items():
            state, until = self.state(acct_id, usable(acct_id), now)
            out.extend((m, state, until) for m in aq.pending)
        out.extend((m, *self.state(m.account_id, usable(m.account_id), now))
                   for m in self._handed.values())
        return out

    def remove(self, message_id: int, account_id: int) -> QMsg | None:
        """Take one message out of the send queue (``queue hold``, ``queue delete``),
        a handed one included; None if it is not there. O(messages of the account)."""
        msg = self._handed.pop(message_id, None)
        if msg is None:
            aq = self._queues.get(account_id)
            found = [m for m in aq.pending if m.id == message_id] if aq else []
            if not found or aq is None:
                return None
            msg = found[0]
            aq.pending.remove(msg)
            if not aq.pending:
                while account_id in self._rr:
                    self._rr.remove(account_id)
        self.take_data(msg)
        return msg

    def drop(self, account_id: int) -> list[int]:
        """Forget an account's send queue (purge), handed messages included; return
        the message ids dropped."""
        aq = self._queues.pop(account_id, None)
        while account_id in self._rr:
            self._rr.remove(account_id)
        handed = [m for m in self._handed.values() if m.account_id == account_id]
        for m in handed:
            del self._handed[m.id]
        dropped = [*(aq.pending if aq else ()), *handed]
        for m in dropped:
            self.take_data(m)
        return [m.id for m in dropped]
