"""What the operator does to stored messages: hold, release, delete one, purge an account's.

Owns: the named operations on the spool behind ``queue hold|release|delete ID``,
``queue purge``, ``user delete --purge-queue`` (and a node applying a cluster delete):
each is one write through the spool's group commit, and every recipient removed before
it was final is handed to the delivery log as ``purged`` (``log_purged``), so removed
mail stays visible (SEMANTICS §5).
See also: relayd.store.spool (the writer), relayd.store.messages (the statements),
relayd.controlplane.queues (the operations).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from relayd.store import messages as q
from relayd.store.db import SqlConn
from relayd.store.records import AttemptResult
from relayd.store.spool import Spool

T = TypeVar("T")


async def purge(spool: Spool, account_id: int, status: str | None = None, *,
                reason: str = "purged") -> list[int]:
    """Delete an account's messages (all, or those with a recipient in ``status``);
    the ids deleted. Their pending recipients are logged ``purged`` (``reason``)."""
    purged: list[q.PurgedRow] = []
    ids = await spool._transact(with_events(spool, functools.partial(
        q.purge_account, account_id=account_id, status=status, purged=purged), purged,
        reason), deletes_messages=True)
    log_purged(spool, purged, reason)
    return ids


async def purge_messages(spool: Spool, message_ids: Sequence[int], *,
                         reason: str = "purged") -> list[int]:
    """Delete these messages (with their recipients); the ids given. Their pending
    recipients are logged ``purged`` (``reason``)."""
    ids = list(message_ids)
    purged: list[q.PurgedRow] = []
    await spool._transact(with_events(spool, functools.partial(
        q.purge_ids, ids=ids, purged=purged), purged, reason), deletes_messages=True)
    log_purged(spool, purged, reason)
    return ids


async def delete_message(spool: Spool, message_id: int, *, reason: str) -> bool:
    """Delete one message for good (``queue delete``); False if there is none. Its
    pending recipients are logged ``purged`` (``reason``)."""
    purged: list[q.PurgedRow] = []
    n = await spool._transact(with_events(spool, functools.partial(
        q.purge_ids, ids=[message_id], purged=purged), purged, reason), deletes_messages=True)
    log_purged(spool, purged, reason)
    return bool(n)


def log_purged(spool: Spool, rows: Sequence[q.PurgedRow], reason: str) -> None:
    """Recipients removed before they were final (committed): a ``purged`` row each in
    the delivery log (``on_results``), counted by ``on_purged``."""
    if not rows:
        return
    results = _purged_results(rows, reason, time.time())
    if spool.on_results is not None:
        spool.on_results(results)
    if spool.on_purged is not None:
        spool.on_purged(len(results))


def _purged_results(rows: Sequence[q.PurgedRow], reason: str,
                    now: float) -> list[AttemptResult]:
    return [AttemptResult(message_id=m, idx=i, recipient=rcpt, username=user, domain=dom,
                          next_hop="-", code=None, text=reason, outcome="purged", ts=now,
                          account_id=acct, is_bounce=bool(bounce))
            for m, i, rcpt, acct, user, dom, bounce in rows]


def with_events(spool: Spool, fn: Callable[[SqlConn], T], purged: list[q.PurgedRow],
                reason: str) -> Callable[[SqlConn], T]:
    """``fn`` (a purge filling ``purged``), then, in the same transaction, a ``purged``
    webhook event for each removed recipient of a domain with a webhook."""
    def run(conn: SqlConn) -> T:
        result = fn(conn)
        if purged and spool.hooks.domains:
            spool.hooks.store_apart(conn, _purged_results(purged, reason, time.time()))
        return result
    return run


async def held_ids(spool: Spool, account_id: int) -> list[int]:
    """The ids of an account's messages the operator held."""
    return [r[0] for r in await spool.fetchall(q.HELD_OF_ACCOUNT_SQL, (account_id,))]


async def message_owner(spool: Spool, message_id: int) -> tuple[int, str | None] | None:
    """``(account id, held)`` of a stored message (who held it, or None); None if
    there is no such message."""
    row = await spool.fetchone(q.OWNER_SQL, (message_id,))
    return (int(row[0]), row[1]) if row else None


async def hold(spool: Spool, message_id: int,
               by: str = "operator") -> tuple[int, str | None] | None:
    """Hold a message: neither attempted nor retried until :func:`release` (stored:
    it survives a restart); ``(account id, held before)``, None if no such message."""
    return await spool._transact(functools.partial(q.hold, message_id=message_id, by=by))


async def release(spool: Spool, message_id: int, now: float,
                  retrying: bool = False) -> tuple[int, str | None] | None:
    """Release a held message (its deferred recipients due ``now`` unless ``retrying``);
    ``(account id, held before)``, None if no such message."""
    return await spool._transact(functools.partial(q.release, message_id=message_id,
                                                  now=now, retrying=retrying))
