"""Queue operations that must agree with the scheduler's memory, and the delivery log.

Owns: ``queue list/show`` (the send queue as the database holds it, in the state the
scheduler gives it, and the retry queue; a held message says who held it: ``operator``
or ``account``, disabled), ``queue purge`` and ``queue retry`` (SEMANTICS.md §4), one
message's ``queue hold/release/delete`` (any account; SEMANTICS.md §5), ``relayctl log``
queries (also one message's history), and the prune of the delivery log.

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
from relayd.store import removal
from relayd.store.records import QUEUE_DELETE, QUEUE_PURGE

_LOG_STATUSES = ("queued", "deferred", "delivered", "failed", "purged", "suppressed")


def _message_id(ext_id: str) -> int:
    """A message id as ``queue list`` shows it (16 hex digits, below 8000000000000000:
    ids are signed 64-bit integers in the spool), else a 400."""
    try:
        mid = parse_id(ext_id.upper())
    except ValueError:
        mid = -1
    if not 0 <= mid < 1 << 63:
        raise LifecycleError("message id must be 16 hex digits, below 8000000000000000",
                             "bad_request")
    return mid


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
                held_by = None
                if sm.held is not None:
                    seen, held_by = ("held", None), sm.held
                elif seen is None:
                    if sm.id in held_before or self.s.scheduler.in_memory(sm.id):
                        # Being attempted now, or attempted while the spool was read
                        # (the read may predate its result's commit).
                        continue
                    seen = self.s.scheduler.account_state(sm.account_id)
                st, until = seen
                if st == "held" and held_by is None:
                    held_by = "account"
                if state is not None and st != state:
                    continue
                items.append(schemas.QueueItem(
                    id=format_id(sm.id), username=sm.username, sender=sm.sender, state=st,
                    age_seconds=now - sm.received_at,
                    attempts=max(r.attempts for r in sm.recipients),
                    recipients=[r.rcpt for r in sm.recipients], reset_at=until,
                    size=sm.size, held_by=held_by))
        if state in (None, "deferred", "held"):
            for d in await self.s.spool.deferred_messages(acct_filter):
                st = "deferred" if d.held is None else "held"
                if state is not None and st != state:
                    continue
                items.append(schemas.QueueItem(
                    id=format_id(d.id), username=d.username, sender=d.sender, state=st,
                    age_seconds=now - d.received_at, attempts=d.attempts,
                    next_attempt=d.next_attempt if d.held is None else None,
                    recipients=d.recipients, last_error=d.last_error, size=d.size,
                    held_by=d.held))
        elif state not in ("queued", "waiting_limit"):
            raise LifecycleError("state must be queued, waiting_limit, held or deferred",
                                 "bad_request")
        return schemas.QueueList(items=items)

    async def queue_show(self, ext_id: str) -> schemas.QueueItem:
        """One queued message."""
        mid = _message_id(ext_id)
        for item in (await self.queue_list(None, None)).items:
            if item.id == format_id(mid):
                return item
        raise not_found("queued message", ext_id)

    async def queue_hold(self, ext_id: str) -> schemas.QueueItem:
        """Hold one message (any account): not attempted, first time or retry, until
        released; stored, so it survives a restart. Holding a held message changes
        nothing. The message as ``queue show`` shows it."""
        mid = _message_id(ext_id)
        owner = await removal.message_owner(self.s.spool, mid)
        if owner is None:
            raise not_found("queued message", ext_id)
        undo = self.s.scheduler.hold_message(mid, owner[0])  # takes a right away: first
        if await agree(removal.hold(self.s.spool, mid), undo=undo) is None:
            undo()  # gone meanwhile (delivered or deleted)
            raise not_found("queued message", ext_id)
        self.s.log("queue_held", message_id=format_id(mid))
        return await self._shown(mid, ext_id)

    async def queue_release(self, ext_id: str) -> schemas.QueueItem:
        """Release a message the operator held: attempted again at once (deferred
        recipients due now). Releasing a message not held changes nothing; a disabled
        account's mail stays held until ``user enable``."""
        mid = _message_id(ext_id)
        retrying = self.s.scheduler.retrying(mid)
        owner = await removal.release(self.s.spool, mid, self.s.clock(), retrying)
        if owner is None:
            raise not_found("queued message", ext_id)
        queued = await self.s.spool.queued_messages([mid])
        try:  # shown before memory takes it up (a dispatched message is not listed)
            return await self._shown(mid, ext_id)
        finally:
            self.s.scheduler.release_message(mid, queued)
            self.s.log("queue_released", message_id=format_id(mid))

    async def queue_delete(self, ext_id: str) -> schemas.QueueChanged:
        """Delete one message (any account) for good; its recipients not yet final are
        logged ``purged``. One already at the next hop finishes its attempt."""
        mid = _message_id(ext_id)
        owner = await removal.message_owner(self.s.spool, mid)
        if owner is None:
            raise not_found("queued message", ext_id)
        self.s.scheduler.delete_message(mid, owner[0])
        if not await removal.delete_message(self.s.spool, mid, reason=QUEUE_DELETE):
            raise not_found("queued message", ext_id)
        self.s.log("queue_deleted", message_id=format_id(mid))
        return schemas.QueueChanged(count=1)

    async def _shown(self, mid: int, ext_id: str) -> schemas.QueueItem:
        for item in (await self.queue_list(None, None)).items:
            if item.id == format_id(mid):
                return item
        raise not_found("queued message", ext_id)  # delivered meanwhile

    async def queue_purge(self, user: str, state: str | None) -> schemas.QueueChanged:
        """Remove an account's queued messages (all, or one state)."""
        acct = self.s.account(user, allow_deleted=True)
        if state not in (None, "queued", "waiting_limit", "held", "deferred"):
            raise LifecycleError("state must be queued, waiting_limit, held or deferred",
                                 "bad_request")
        dropped: list[int] = []
        if state != "deferred":
            dropped = self.s.scheduler.drop_account(acct.id, state)
        if state == "held":  # those the operator held, too
            held = await removal.held_ids(self.s.spool, acct.id)
            dropped += [m for m in held if m not in dropped]
        write = removal.purge(self.s.spool, acct.id, state, reason=QUEUE_PURGE) \
            if state is None or state == "deferred" \
            else removal.purge_messages(self.s.spool, dropped, reason=QUEUE_PURGE)
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
                           limit: int, message: str | None = None) -> schemas.LogList:
        """Delivery attempts, newest first; ``queued`` lists recipients not yet attempted.
        With ``message``: that message's history, oldest first, then its recipients not
        yet attempted (``queued``), whether or not it is still queued."""
        if not 1 <= limit <= schemas.LOG_LIMIT_MAX:
            raise LifecycleError(f"limit must be 1 to {schemas.LOG_LIMIT_MAX}", "bad_request")
        if status not in (None, *_LOG_STATUSES):
            raise LifecycleError("status must be " + ", ".join(_LOG_STATUSES[:-1])
                                 + f" or {_LOG_STATUSES[-1]}", "bad_request")
        mid = _message_id(message) if message is not None else None
        shown, limit = limit, limit + 1  # one more: says whether the limit stopped the list
        rows: list[Any] = []
        if status in (None, "queued") and mid is not None:
            rows = await self.s.dlog.entries(user, None, since, limit, mid) \
                if status is None else []
            rows += await self.s.spool.queued_entries(user, since, limit - len(rows), mid,
                                                      kinds=True) if len(rows) < limit else []
        elif status == "queued":
            rows = await self.s.spool.queued_entries(user, since, limit, kinds=True)
        else:
            rows = await self.s.dlog.entries(user, status, since, limit, mid)
        return schemas.LogList(entries=[
            schemas.LogEntry(ts=r[0], message_id=format_id(r[1]), username=r[2], domain=r[3],
                             recipient=r[4], next_hop=r[5], code=r[6], text=r[7],
                             outcome=r[8], kind=r[9]) for r in rows[:shown]],
            more=len(rows) > shown)

    async def prune_delivery_log(self) -> int:
        """Delete delivery-log entries older than the retention period, then the oldest
        while the log is over its size; in small batches on the log's own connection."""
        cutoff = self.s.clock() - self.s.cfg.spool.delivery_log_retention_days * 86400
        return await self.s.dlog.prune(cutoff, self.s.cfg.spool.delivery_log_max_bytes)
