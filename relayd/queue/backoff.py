"""Retry schedule and outcome classification for delivery attempts (SEMANTICS.md §5).

Owns: when a deferred recipient is tried again, when it has been queued too long
and must fail, and how a next hop's reply code maps to an outcome recorded in
the delivery log (``delivered``, ``deferred``, ``failed``).

Schedule, in the spirit of Postfix (minimal_backoff_time 300 s,
maximal_backoff_time 4000 s, maximal_queue_lifetime 5 d): after the n-th failed
attempt the next one is ``min(maximum, first * factor ** (n - 1))`` seconds
later, spread by a random fraction in ``[-jitter, +jitter]`` so that mail
deferred together does not come back together; never sooner than 1 s.
``expired`` says when the recipient has been queued longer than ``lifetime``;
the caller then fails it (a bounce, see relayd.delivery.dsn).

Classification: 2xx is delivered, 4xx deferred, 5xx failed; anything else (a
reply that is not a reply, a 1xx/3xx out of place) is deferred, because
failing a recipient is irreversible and a retry is not. Network errors
(timeout, refused connection, TLS failure) never reach ``classify``: they are
always deferred.

Pure: time (``now``) and randomness (``rand``) are passed in; no I/O.
Untrusted input: the reply code of a remote server (any int is accepted).
Settings read: none directly; ``policy_from`` builds a BackoffPolicy from the
``[delivery]`` retry settings (it raises ValueError for a maximum below the first delay).
See also: relayd.queue.scheduler (the retry queue), relayd.delivery.client (reply codes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from relayd.config import DeliveryConfig

Outcome = Literal["delivered", "deferred", "failed"]

MIN_DELAY = 1.0


@dataclass(frozen=True)
class BackoffPolicy:
    """Retry delays (seconds): first, cap, growth factor, jitter fraction, lifetime."""

    first: float = 300.0
    maximum: float = 4000.0
    factor: float = 2.0
    jitter: float = 0.2
    lifetime: float = 5 * 86400

    def __post_init__(self) -> None:
        if not self.first > 0:
            raise ValueError(f"first must be > 0, not {self.first}")
        if not self.maximum >= self.first:
            raise ValueError(f"maximum ({self.maximum}) must be >= first ({self.first})")
        if not self.factor >= 1:
            raise ValueError(f"factor must be >= 1, not {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], not {self.jitter}")
        if not self.lifetime > 0:
            raise ValueError(f"lifetime must be > 0, not {self.lifetime}")


def base_delay(policy: BackoffPolicy, attempts: int) -> float:
    """The delay after ``attempts`` failed attempts, before jitter."""
    exponent = max(0, attempts - 1)
    try:
        grown = policy.first * policy.factor**exponent
    except OverflowError:
        return policy.maximum
    return min(policy.maximum, grown)


def next_attempt(policy: BackoffPolicy, attempts: int, now: float, rand: random.Random) -> float:
    """The time of the next attempt after ``attempts`` failed ones, jitter included."""
    spread = rand.uniform(-policy.jitter, policy.jitter) if policy.jitter else 0.0
    delay = base_delay(policy, attempts) * (1.0 + spread)
    return now + max(MIN_DELAY, delay)


#: What ends the text of a recipient failed because the queue lifetime ran out (``4.4.7``).
GAVE_UP = "(gave up: queue lifetime exceeded)"


def expired(policy: BackoffPolicy, received_at: float, now: float) -> bool:
    """True when a message received at ``received_at`` has outlived the queue lifetime."""
    return now - received_at >= policy.lifetime


def classify(code: int) -> Outcome:
    """Map a next hop's reply code to delivered (2xx), deferred (4xx) or failed (5xx)."""
    if 200 <= code <= 299:
        return "delivered"
    if 500 <= code <= 599:
        return "failed"
    return "deferred"


def policy_from(cfg: DeliveryConfig) -> BackoffPolicy:
    """The retry schedule of ``[delivery]`` (``retry_jitter`` capped at 0.99).

    Raises ValueError when the settings contradict each other (maximum below first).
    """
    return BackoffPolicy(first=cfg.retry_first_seconds, maximum=cfg.retry_max_seconds,
                         jitter=min(cfg.retry_jitter, 0.99),
                         lifetime=cfg.max_queue_lifetime_seconds)
