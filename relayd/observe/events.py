"""Observability hooks: the SMTP server's and the scheduler's events as metrics and logs.

Owns: turning hot-path events (connection, rejection, AUTH result, acceptance,
delivery attempt) into Prometheus updates through pre-bound children, and
into one structured log event per transaction outcome. The reason of a 535 is
visible here (metric label and log field), never on the wire. Passwords and
AUTH payloads are never passed here.

Log events (JSON lines, relayd.observe.logs), each SMTP one with the session id
``sid`` (relayd.smtp.server.SessionState.sid) and the client address:

- ``smtp_accepted`` (info): a message got 250; ``id`` is the queue id.
- ``smtp_rejected`` (info): every refusal, 4xx and 5xx alike, with
  ``reason`` (the metric label), ``code`` (the reply code, an int), ``user``
  (the authenticated account, or null) and ``detail`` (the why, or null).
- ``auth_failed`` (info): a failed credential check, with the username tried
  and ``detail`` (``unknown_user``, ``bad_password``, ``account_disabled``,
  ...); the 535 it caused is not logged a second time. ``auth_ok`` is debug.
  This is the line config/fail2ban/filter.d/relayd.conf matches.
- ``smtp_rejections_suppressed`` (warning): ``suppressed`` lines of one
  ``reason`` from one ``client`` were counted but not written (``client`` is
  null for the count of addresses no longer tracked; see below).

Rate limit. ``smtp_rejected`` and ``auth_failed`` lines pass through a
relayd.observe.logbudget.LogBudget keyed by (reason, client address): a generous burst
per address, then a trickle, and a ceiling for all addresses together; what is
not written is counted and reported by a ``smtp_rejections_suppressed`` line
before the key's next written line or ``log_rejections_summary_seconds``
after the first line it held back (a loop timer). The metric counts every
rejection regardless. Why per address, not per reason: see relayd.observe.logbudget
(fail2ban counts lines per address; a per-reason budget would let one loud
address hide the others).
- ``smtp_internal_error`` (error): a handler failed; the client got 451.
- ``delivery_attempt`` (info): one per recipient per attempt, with ``id``.
- ``queue_reconciled`` (warning): ``count`` messages of the spool that the
  scheduler had lost track of were put back in its queue (see
  relayd.queue.scheduler, reconciliation); counted in ``relayd_queue_reconciled_total``.

The credential cache counters: a *hit* is a successful AUTH answered from the
cache without argon2; a *miss* is a password check of an existing, live
account that the cache could not answer, so argon2 ran: the first login, the
first after an invalidation, and every wrong password, even for an account
with a cached entry (failures always cost one argon2 verification, so that
all 535s take the same time). Unknown and deleted users touch neither
counter. So ``hits + misses`` is the number of password checks of known
accounts, and ``hits / (hits + misses)`` is the share argon2 was saved.

Interface cost: each hook is a few counter increments and at most one log
call; no I/O beyond the log stream. A rejection costs its counter, the budget's
decision (O(1)) and, if written, one line through the fast
relayd.observe.logs.Event path (flushed once per loop turn).
See also: relayd.observe.metrics, relayd.observe.logs, relayd.observe.logbudget, relayd.smtp.server,
relayd.queue.scheduler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relayd.ids import format_id
from relayd.observe.logbudget import LogBudget
from relayd.observe.logs import Event
from relayd.observe.metrics import Metrics
from relayd.smtp.replies import Reply

if TYPE_CHECKING:  # types only: observe is called by smtp and the scheduler, not the reverse
    from relayd.smtp.server import SessionState
    from relayd.store.spool import AttemptResult

#: Credential-check outcomes (relayd.directory.credentials.AuthOutcome.reason) -> metric reason.
_AUTH_REASON = {
    "unknown_user": "auth_failed",
    "bad_password": "auth_failed",
    "account_disabled": "account_disabled",
    "account_deleted": "account_deleted",
    "domain_deleted": "domain_deleted",
}


class Observer:
    """Implements relayd.smtp.server.Events and relayd.queue.scheduler.SchedulerEvents."""

    def __init__(self, metrics: Metrics, log: Any, budget: LogBudget | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``budget`` limits rejection lines (None: every one is written); ``clock``
        is its time source (monotonic seconds)."""
        self.m = metrics
        self.log = log
        self._rej = metrics.rejections
        self._rej_total = metrics.smtp_rejections_total
        self._budget = budget
        self._clock = clock
        self._summary_timer: asyncio.TimerHandle | None = None
        self._rejected_line = Event(log, "smtp_rejected")
        self._auth_failed_line = Event(log, "auth_failed")
        # The two lines of every message, written without structlog's chain (same JSON).
        self._accepted_line = Event(log, "smtp_accepted")
        self._attempt_line = Event(log, "delivery_attempt")
        self._accepted_inc = metrics.messages_accepted_total.inc
        self._accept_observe = metrics.accept_duration_seconds.observe
        self._delivery = metrics.delivery
        self._delivery_observe = metrics.delivery_duration_seconds.observe

    # -- SMTP --------------------------------------------------------------------
    def connection_opened(self) -> None:
        """A client connected."""
        self.m.smtp_connections_total.inc()
        self.m.smtp_sessions_active.inc()

    def connection_closed(self) -> None:
        """A client went away."""
        self.m.smtp_sessions_active.dec()

    def rejected(self, reply: Reply, session: SessionState, detail: str = "") -> None:
        """A command was refused."""
        reason = reply.reason or "other"
        child = self._rej.get(reason)
        if child is None:
            child = self._rej[reason] = self._rej_total.labels(reason=reason)
        child.inc()
        if detail in _AUTH_REASON:
            return  # a failed credential check: already logged by auth_result
        client = session.peer_ip
        if self._budget is not None and not self._admit(reason, client):
            return
        account = session.account
        self._rejected_line({"sid": session.sid, "client": client,
                             "user": account.username if account else None,
                             "reason": reason, "code": reply.code, "detail": detail or None})

    def _admit(self, reason: str, client: str) -> bool:
        """Whether the budget lets this line out (its pending summary written first)."""
        budget = self._budget
        assert budget is not None
        ok, held = budget.admit(reason, client, self._clock())
        if held:
            self._suppressed(reason, client, held)
        if not ok and self._summary_timer is None:
            self._arm_summary_timer()
        return ok

    def _suppressed(self, reason: str, client: str, count: int) -> None:
        self.log.warning("smtp_rejections_suppressed", client=client or None, reason=reason,
                         suppressed=count)

    def _arm_summary_timer(self) -> None:
        budget = self._budget
        at = budget.next_due() if budget is not None else None
        if at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): reported by report_suppressed()
            return
        self._summary_timer = loop.call_later(max(0.0, at - self._clock()),
                                              self._summary_due)

    def _summary_due(self) -> None:
        self._summary_timer = None
        self.report_suppressed()
        self._arm_summary_timer()

    def report_suppressed(self, *, everything: bool = False) -> None:
        """Write the summaries that are due (all pending ones with ``everything``:
        at shutdown, so that no count is lost)."""
        budget = self._budget
        if budget is None:
            return
        for reason, client, count in budget.due(self._clock(), everything=everything):
            self._suppressed(reason, client, count)

    def auth_result(self, session: SessionState, username: str, reason: str,
                    cache_hit: bool) -> None:
        """An AUTH was decided (the 535 reason is counted by ``rejected``)."""
        if reason == "success":
            self.m.auth_success.inc()
            self.log.debug("auth_ok", sid=session.sid, client=session.peer_ip,
                           user=username[:64], cache_hit=cache_hit)
        else:
            self.m.auth_failure.inc()
            label = _AUTH_REASON.get(reason, reason)
            client = session.peer_ip
            if self._budget is not None and not self._admit(label, client):
                return
            self._auth_failed_line({"sid": session.sid, "client": client,
                                    "user": username[:64], "reason": label, "detail": reason})

    def cache_hit(self) -> None:
        """A login was answered from the credential cache (no argon2)."""
        self.m.credential_cache_hits_total.inc()

    def cache_miss(self) -> None:
        """A known account's password needed argon2 (see the module doc)."""
        self.m.credential_cache_misses_total.inc()

    def accepted(self, session: SessionState, message_id: str, size: int, rcpts: int,
                 seconds: float) -> None:
        """A message was committed and acknowledged with 250."""
        self._accepted_inc()
        self._accept_observe(seconds)
        account = session.account
        self._accepted_line({"sid": session.sid, "id": message_id, "client": session.peer_ip,
                             "user": account.username if account else None,
                             "size": size, "rcpts": rcpts})

    def error(self, session: SessionState, where: str, exc: BaseException) -> None:
        """A handler failed: logged with detail, the client got 451."""
        self.log.error("smtp_internal_error", sid=session.sid, where=where,
                       client=session.peer_ip,
                       error=f"{type(exc).__name__}: {exc}")

    # -- spool ---------------------------------------------------------------------
    def batch(self, size: int) -> None:
        """A group commit wrote ``size`` messages."""
        self.m.spool_commit_batch_size.observe(size)

    # -- delivery ------------------------------------------------------------------
    def in_flight(self, delta: int) -> None:
        """A transmission started (+1) or ended (-1)."""
        self.m.messages_in_flight.inc(delta)

    def shaped(self, destination: str, kind: str) -> None:
        """Per-destination shaping held an attempt (``waited``, ``deferred``,
        ``backed_off``) or backed a destination off (``throttled``)."""
        self.m.destination_shaped_total.labels(destination=destination, kind=kind).inc()

    def mta_sts(self, mode: str, result: str) -> None:
        """An MTA-STS outcome (relayd.delivery.sts): ``success`` or an RFC 8460 result type."""
        self.m.mta_sts_results_total.labels(mode=mode, result=result).inc()

    def reconciled(self, count: int) -> None:
        """The reconciliation found ``count`` messages the scheduler had lost track of."""
        self.m.queue_reconciled_total.inc(count)
        self.log.warning("queue_reconciled", count=count)

    def purged(self, count: int) -> None:
        """Recipients an operator removed before they were final (``queue purge``,
        ``queue delete``, ``user delete --purge-queue``)."""
        self._delivery["purged"].inc(count)

    def attempt(self, result: AttemptResult, seconds: float) -> None:
        """One recipient's attempt finished."""
        self._delivery[result.outcome].inc()
        self._delivery_observe(seconds)
        line = {"id": format_id(result.message_id), "user": result.username,
                "rcpt": result.recipient, "hop": result.next_hop,
                "code": result.code, "reply": result.text[:200], "outcome": result.outcome}
        if result.tls:  # MX hops: what TLS achieved (relayd.delivery.tlslevels)
            line["tls"] = result.tls
            self.m.delivery_tls[result.tls].inc()
            if result.tls == "dane_failed":  # the MX host and why are in the reply text
                self.log.warning("dane_failed", id=line["id"], hop=result.next_hop,
                                 rcpt=result.recipient, reason=result.text[:200])
            if result.tls == "fallback":
                self.log.warning("tls_plaintext_fallback", id=line["id"],
                                 hop=result.next_hop, rcpt=result.recipient,
                                 outcome=result.outcome)
        self._attempt_line(line)
