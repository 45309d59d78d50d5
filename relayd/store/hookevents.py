"""Delivery events for webhooks, written in the transaction that records the outcome.

Owns: :class:`EventSink`, the part of the spool's writer that turns the final
delivery results of domains with a webhook (and the recipients an operator purged:
relayd.store.removal.with_events) into rows of ``webhook_events`` (the JSON body each
is posted with, built once here), in the same group transaction as the results
themselves: no second commit, no second fsync. The bound on the
stored events: past ``cap``, the oldest are deleted in that same transaction and
counted in ``dropped`` (the poster turns that into a metric).

Cost: for a batch when no domain has a webhook, one truth test (``domains`` empty);
otherwise one set lookup per result and one multi-row insert of the events. The
count of stored events is kept approximately on the writer's thread (it only ever
errs high: a rolled-back insert); it is counted for real only past the cap.

Untrusted input: none (results built by the dispatcher; addresses and reply texts
go into JSON through the encoder). See also: relayd.store.spool (calls ``store``),
relayd.store.webhooks (the poster's named queries), relayd.webhooks (the poster).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from relayd.ids import format_id
from relayd.store.db import DbError, SqlConn, insert_rows
from relayd.store.records import AttemptResult

#: Event outcomes: a delivery result's outcome to what the event says (a result that
#: is not final, or a purge, has no event).
DELIVERED, FAILED, BOUNCED, PURGED = "delivered", "failed", "bounced", "purged"
SUPPRESSED = "suppressed"


def event_outcome(r: AttemptResult) -> str | None:
    """``delivered``; ``failed`` (a permanent 5xx reply, or a route refused for good);
    ``bounced`` (relayd gave up: the queue lifetime ran out, a DSN went to the sender);
    ``purged`` (removed by the operator before it was final); ``suppressed`` (not sent:
    on the domain's suppression list); None for a deferral. Pure."""
    if r.outcome == "delivered":
        return DELIVERED
    if r.outcome in (PURGED, SUPPRESSED):
        return r.outcome
    if r.outcome == "failed":
        return FAILED if r.code is not None and 500 <= r.code < 600 else BOUNCED
    return None


def event_body(r: AttemptResult, outcome: str) -> bytes:
    """The JSON an application receives for one recipient's outcome (SEMANTICS §5). Pure."""
    reply = f"{r.code} {r.text}" if r.code is not None else r.text
    return json.dumps({
        "id": f"{format_id(r.message_id)}.{r.idx}", "message_id": format_id(r.message_id),
        "account": r.username, "domain": r.domain, "recipient": r.recipient,
        "outcome": outcome, "reply": reply, "attempts": r.attempts, "time": r.ts,
    }, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class EventSink:
    """Which domains have a webhook (set on the loop), and the events' bound (writer side)."""

    __slots__ = ("_approx", "cap", "domains", "dropped")

    def __init__(self, cap: int = 100_000) -> None:
        #: Names of the live domains with a webhook; replaced whole (never mutated).
        self.domains: frozenset[str] = frozenset()
        self.cap = cap
        #: Events deleted unposted: the cap was reached, or their webhook is gone (only
        #: grows, on the writer's thread; read by the poster for the metric).
        self.dropped = 0
        self._approx: int | None = None  # stored events, never below the truth

    def store(self, conn: SqlConn, results: Sequence[AttemptResult]) -> None:
        """On the writer's thread, inside the transaction recording ``results``: an event
        row for each final result of a domain with a webhook (not for relayd's DSNs)."""
        domains = self.domains
        rows = []
        for r in results:
            if r.domain in domains and not r.is_bounce:
                outcome = event_outcome(r)
                if outcome is not None:
                    rows.append((r.domain, event_body(r, outcome), r.ts))
        if not rows:
            return
        insert_rows(conn, "INSERT INTO webhook_events(domain, body, next_attempt)",
                    "(?,?,?)", rows)
        self._bound(conn, len(rows))

    def store_apart(self, conn: SqlConn, results: Sequence[AttemptResult]) -> None:
        """``store`` in a savepoint of its own: if it fails, the transaction goes on
        without the events (the outcomes they report are never lost for them)."""
        conn.execute("SAVEPOINT hooks")
        try:
            self.store(conn, results)
        except DbError:
            conn.execute("ROLLBACK TO hooks")
        conn.execute("RELEASE hooks")

    def _bound(self, conn: SqlConn, added: int) -> None:
        if self._approx is None:
            self._approx = int(conn.execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0])
        else:
            self._approx += added
        if self._approx <= self.cap:
            return
        stored = int(conn.execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0])
        over = stored - self.cap
        if over > 0:
            conn.execute("DELETE FROM webhook_events WHERE id IN (SELECT id FROM webhook_events"
                         " ORDER BY id LIMIT ?)", (over,))
            self.dropped += over
        self._approx = min(stored, self.cap)

    def removed(self, count: int, *, dropped: bool = False) -> None:
        """On the writer's thread: ``count`` events were deleted (posted; or ``dropped``:
        their domain's webhook is gone)."""
        if dropped:
            self.dropped += count
        if self._approx is not None:
            self._approx = max(0, self._approx - count)
