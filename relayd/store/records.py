"""The records the message store takes and gives: typed, no SQL, no connection.

Owns: message id allocation (:class:`IdAllocator`), an accepted message
(:class:`NewMessage`), one delivery attempt's result (:class:`AttemptResult`; also a
recipient the operator removed: outcome ``purged``, with the texts saying what removed
it) and a stored message with its pending recipients (:class:`StoredMessage`,
:class:`PendingRecipient`, :class:`DeferredMessage`).

Message ids are 64-bit integers made from the clock in microseconds and a
counter (unique across restarts while the clock does not go back by more than
the restart takes); on the wire and in the CLI they are 16 hex digits (relayd.ids).
See also: relayd.store.spool (stores and reads them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: The reply text of a ``purged`` delivery-log row: what removed the recipient.
ACCOUNT_DELETED = "purged: account deleted (user delete --purge-queue)"
QUEUE_PURGE = "purged: relayctl queue purge"
QUEUE_DELETE = "purged: relayctl queue delete"


class IdAllocator:
    """Monotonic 64-bit message ids from the clock and a counter."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0

    def seed(self, floor: int) -> None:
        """Never hand out an id at or below ``floor`` (the largest one stored)."""
        self._last = max(self._last, floor)

    def next(self) -> int:
        """A new id, larger than every id handed out before."""
        candidate = int(self._clock() * 1_000_000) << 8
        self._last = candidate if candidate > self._last else self._last + 1
        return self._last


@dataclass(slots=True)
class NewMessage:
    """A message ready to be committed at acceptance."""

    id: int
    account_id: int
    username: str
    domain: str
    sender: str
    recipients: list[str]
    data: bytes
    received_at: float
    is_bounce: bool = False


@dataclass(slots=True)
class AttemptResult:
    """The outcome of one delivery attempt for one recipient."""

    message_id: int
    idx: int
    recipient: str
    username: str
    domain: str
    next_hop: str
    code: int | None
    text: str
    outcome: str  # delivered | deferred | failed | purged (removed by the operator) |
    # suppressed (not sent: on the domain's suppression list)
    ts: float
    next_attempt: float | None = None
    account_id: int | None = None
    is_bounce: bool = False  # a DSN relayd generated: logged as kind ``bounce``, not sent
    attempts: int = 0  # this attempt's number (1: the first); 0: not an attempt (purged)
    at_rcpt: bool = False  # the next hop's reply to this recipient's own RCPT (not stored)
    tls: str = ""  # MX hops: what TLS achieved (relayd.delivery.tlslevels; not stored)


@dataclass(slots=True)
class PendingRecipient:
    """A recipient not yet in a final state, as stored."""

    idx: int
    rcpt: str
    status: str
    attempts: int
    next_attempt: float | None
    last_code: int | None
    last_error: str | None


@dataclass(slots=True)
class StoredMessage:
    """A message with its not-yet-final recipients (data loaded separately)."""

    id: int
    account_id: int
    username: str
    domain: str
    sender: str
    received_at: float
    size: int
    is_bounce: bool
    recipients: list[PendingRecipient] = field(default_factory=list)
    held: str | None = None  # who held it (``queue hold``: 'operator'), None: not held


@dataclass(slots=True)
class DeferredMessage:
    """A message of the retry queue as ``queue list`` shows it (one row per message)."""

    id: int
    username: str
    sender: str
    received_at: float
    attempts: int
    next_attempt: float | None
    recipients: list[str]
    last_error: str | None
    size: int
    held: str | None = None
