"""Failover you can see: failed MX hops logged and counted, attempts counted by destination.

Owns: ``HopWatch``, the dispatcher's ``watch`` in MX mode (relayd.queue.destinations
``Watch``) and the MX resolver's ``on_dns_failure``:

- ``mx_hop_failed`` (info), one line per MX hop (one address of one MX host) that
  left recipients without an answer during an attempt, whether a later MX then
  took the mail or not: ``id``, ``domain``, ``hop`` (``mx.example[IP]:PORT``),
  ``mx``, ``address``, ``port``, ``reason`` (relayd.delivery.hopfailures: refused,
  timeout, greeting_4xx, ...), ``detail`` (the error text, cut to 200 characters)
  and ``rcpts`` (how many recipients it left). Postfix's ``connect to mx1...:
  Connection refused`` line.
- ``mx_hop_failures_suppressed`` (warning): ``suppressed`` lines of one ``reason``
  for one ``address`` that were counted but not written (``address`` null: for
  addresses no longer tracked).

Rate limit: the lines pass through their own relayd.observe.logbudget.LogBudget keyed
by (reason, address): ``BURST`` lines, then ``PER_MINUTE`` a minute per key, and
``MAX_PER_SECOND`` for all keys together; the rest is counted and reported by a
summary line at most ``SUMMARY_SECONDS`` later. An MX that is down for hours is
then a few lines a minute, however much mail waits for it. The metrics count
every failure.

Metrics (relayd.observe.metrics): ``relayd_mx_hop_failures_total`` (destination,
reason), ``relayd_destination_attempts_total`` (destination, outcome),
``relayd_destination_tls_total`` (destination, outcome), ``relayd_dns_failures_total``
(reason). A destination label is bounded: a shaping table entry's name or ``other``.

Cost: MX-mode attempts only (never the smarthost fast way): a dict lookup and an
increment per recipient result, one budget decision per failed hop.
Settings read: none (the budget's figures are constants).
See also: relayd.queue.destinations, relayd.delivery.mx, relayd.observe.events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relayd.delivery import hopfailures
from relayd.ids import format_id
from relayd.observe.logbudget import LogBudget
from relayd.observe.metrics import DESTINATION_OUTCOMES, Metrics

if TYPE_CHECKING:  # types only
    from relayd.delivery.client import Hop
    from relayd.store.records import AttemptResult

#: Lines per (reason, address) at once, then a minute, and for all keys a second.
BURST = 10
PER_MINUTE = 6.0
MAX_PER_SECOND = 20.0
#: Seconds after the first line held back when its count is reported at the latest.
SUMMARY_SECONDS = 60.0


class HopWatch:
    """Logs and counts what MX-mode attempts saw (see the module doc)."""

    def __init__(self, metrics: Metrics, log: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.m = metrics
        self.log = log
        self.clock = clock
        self.budget = LogBudget(burst=BURST, per_minute=PER_MINUTE,
                                max_per_second=MAX_PER_SECOND, summary_seconds=SUMMARY_SECONDS)
        self._timer: asyncio.TimerHandle | None = None

    def dns_failed(self, kind: str) -> None:
        """The MX resolver's ``on_dns_failure``: one DNS failure of ``kind``."""
        self.m.dns_failures[kind].inc()

    def hop_failed(self, msg_id: int, domain: str, dest: str, hop: Hop, text: str,
                   rcpts: int) -> None:
        """An MX hop left ``rcpts`` recipients without an answer (``text``: the first)."""
        reason = hopfailures.kind(text)
        self.m.by_destination("mx_hop_failures", dest, reason).inc()
        ok, held = self.budget.admit(reason, hop.host, self.clock())
        if held:
            self._suppressed(reason, hop.host, held)
        if not ok:
            if self._timer is None:
                self._arm()
            return
        self.log.info("mx_hop_failed", id=format_id(msg_id), domain=domain, hop=hop.name,
                      mx=hop.mx or None, address=hop.host, port=hop.port, reason=reason,
                      detail=text[:200], rcpts=rcpts)

    def attempted(self, dest: str, results: list[AttemptResult]) -> None:
        """One group's results at destination label ``dest``: counted by outcome and TLS."""
        for r in results:
            if r.outcome in DESTINATION_OUTCOMES:
                self.m.by_destination("destination_attempts", dest, r.outcome).inc()
            if r.tls:
                self.m.by_destination("destination_tls", dest, r.tls).inc()

    def _suppressed(self, reason: str, address: str, count: int) -> None:
        self.log.warning("mx_hop_failures_suppressed", address=address or None,
                         reason=reason, suppressed=count)

    def _arm(self) -> None:
        at = self.budget.next_due()
        if at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: report_suppressed() at the end says it
            return
        self._timer = loop.call_later(max(0.0, at - self.clock()), self._due)

    def _due(self) -> None:
        self._timer = None
        self.report_suppressed()
        self._arm()

    def report_suppressed(self, *, everything: bool = False) -> None:
        """Write the summaries due (all pending ones with ``everything``: at shutdown)."""
        for reason, address, count in self.budget.due(self.clock(), everything=everything):
            self._suppressed(reason, address, count)
        if everything and self._timer is not None:
            self._timer.cancel()
            self._timer = None
