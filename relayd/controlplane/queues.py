"""Queue operations that must agree with the scheduler's memory, and the delivery log.

Owns: ``queue list/show`` (the send queue as the database holds it, in the state the
scheduler gives it, and the retry queue), ``queue purge`` and ``queue retry``
(SEMANTICS.md §4), ``relayctl log`` queries, and the prune of the delivery log.

Untrusted input: usernames, states, message ids and numbers from the control socket,
already decoded by control.schemas. Settings read: [spool] (delivery-log retention).
See also: relayd.controlplane.changes, relayd.queue.scheduler, relayd.store.spool,
relayd.store.deliverylog.
"""

from __future__ import annotations

from typing import Any

from control import schemas
from relayd.controlplane.changes import LifecycleError, Shared, agree, not_found
from relayd.ids import format_id, parse_id


class Queues:
    """The operator's operations on queued mail and the delivery log."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared

    async def queue_list(self, user: str | None, state: str | None) -> schemas.QueueList:
        """Messages waiting: send queue (queued, waiting_limit, held) and retry queue."""
        now = self.s.clock()
        acct_filter = self.s.account(user, allow_deleted=True).id if user else None
        items: list[schemas.QueueItem] = []
        if state in (None, "queued", "waiting_limit", "held"):
            # The send queue as the database holds it, in the state the scheduler
            # gives it (a message memory lost is listed too: its account's state).
            view = {m.id: (st, until) for m, st, until in self.s.scheduler.send_queue_view()}
            held_before = self.s.scheduler.never_attempted_in_memory()
            for sm in await self.s.spool.queued_messages(account_id=acct_filter):
                seen = view.get(sm.id)
                if seen is None:
                    if sm.id in held_before or self.s.scheduler.in_memory(sm.id):
                        # Being attempted now, or attempted while the spool was read
                        # (the read may predate its result's commit).
                        continue
                    seen = self.s.scheduler.account_state(sm.account_id)
                st, until = seen
                if state is not None and st != state:
                    continue
                items.append(schemas.QueueItem(
                    id=format_id(sm.id), username=sm.username, sender=sm.sender, state=st,
                    age_seconds=now - sm.received_at,
                    attempts=max(r.attempts for r in sm.recipients),
                    recipients=[r.rcpt for r in sm.recipients], reset_at=until))
        if state in (None, "deferred"):
            for d in await self.s.spool.deferred_messages(acct_filter):
                items.append(schemas.QueueItem(
                    id=format_id(d.id), username=d.username, sender=d.sender, state="deferred",
                    age_seconds=now - d.received_at, attempts=d.attempts,
                    next_attempt=d.next_attempt, recipients=d.recipients,
                    last_error=d.last_error, size=d.size))
        elif state not in ("queued", "waiting_limit", "held"):
            raise LifecycleError("state must be queued, waiting_limit, held or deferred",
                                 "bad_request")
        return schemas.QueueList(items=items)

    async def queue_show(self, ext_id: str) -> schemas.QueueItem:
        """One queued message."""
        try:
            mid = parse_id(ext_id.upper())
        except ValueError:
            raise LifecycleError("message id must be 16 hex digits", "bad_request") from None
        for item in (await self.queue_list(None, None)).items:
            if item.id == format_id(mid):
                return item
        raise not_found("queued message", ext_id)

    async def queue_purge(self, user: str, state: str | None) -> schemas.QueueChanged:
        """Remove an account's queued messages (all, or one state)."""
        acct = self.s.account(user, allow_deleted=True)
        if state not in (None, "queued", "waiting_limit", "held", "deferred"):
            raise LifecycleError("state must be queued, waiting_limit, held or deferred",
                                 "bad_request")
        dropped: list[int] = []
        if state != "deferred":
            dropped = self.s.scheduler.drop_account(acct.id, state)
        write = self.s.spool.purge(acct.id, state) if state is None or state == "deferred" \
            else self.s.spool.purge_messages(dropped)
        # forget exactly what left the database (deferred mail included)
        ids = await agree(write, apply=lambda ids: self.s.scheduler.forget(acct.id, dropped + ids))
        n = len(ids)
        self.s.log("queue_purged", username=user, state=state, count=n)
        return schemas.QueueChanged(count=n)

    async def queue_retry(self, user: str | None) -> schemas.QueueChanged:
        """Make deferred mail due now."""
        now = self.s.clock()
        acct_id = self.s.account(user, allow_deleted=True).id if user else None
        n = await agree(self.s.spool.retry_now(now, acct_id),
                        apply=lambda _: self.s.scheduler.wake_retry())
        self.s.log("queue_retry", username=user, count=n)
        return schemas.QueueChanged(count=n)

    async def delivery_log(self, user: str | None, status: str | None, since: float | None,
                           limit: int) -> schemas.LogList:
        """Delivery attempts, newest first; ``queued`` lists recipients not yet attempted."""
        if not 1 <= limit <= schemas.LOG_LIMIT_MAX:
            raise LifecycleError(f"limit must be 1 to {schemas.LOG_LIMIT_MAX}", "bad_request")
        if status not in (None, "queued", "deferred", "delivered", "failed"):
            raise LifecycleError("status must be queued, deferred, delivered or failed",
                                 "bad_request")
        rows: list[Any]
        if status == "queued":
            rows = await self.s.spool.queued_entries(user, since, limit)
        else:
            rows = await self.s.dlog.entries(user, status, since, limit)
        return schemas.LogList(entries=[
            schemas.LogEntry(ts=r[0], message_id=format_id(r[1]), username=r[2], domain=r[3],
                             recipient=r[4], next_hop=r[5], code=r[6], text=r[7],
                             outcome=r[8]) for r in rows])

    async def prune_delivery_log(self) -> int:
        """Delete delivery-log entries older than the retention period, then the oldest
        while the log is over its size; in small batches on the log's own connection."""
        cutoff = self.s.clock() - self.s.cfg.spool.delivery_log_retention_days * 86400
        return await self.s.dlog.prune(cutoff, self.s.cfg.spool.delivery_log_max_bytes)
