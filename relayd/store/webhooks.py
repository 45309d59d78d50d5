"""The poster's named queries on the stored webhook events, and a domain's webhook record.

Owns: :class:`WebhookQueue` (the events due, the backlog, and the writes after a post:
delete what was posted, push back what failed, drop what no webhook wants any more —
each write in the spool's next group transaction) and :class:`WebhookRecord`, a
domain's webhook as the directory stores keep it (both stores: relayd.store.directory,
relayd.store.pgdirectory).

Untrusted input: none (rows written by relayd). See also: relayd.store.hookevents
(writes the events), relayd.webhooks.poster (posts them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from relayd.store.db import SqlConn, delete_in
from relayd.store.spool import Spool


@dataclass(slots=True)
class WebhookRecord:
    """A domain's webhook: where events are posted and the secret that signs them."""

    domain_id: int
    url: str
    secret: str


@dataclass(slots=True)
class StoredEvent:
    """An event waiting to be posted: its body as it will be sent, and its failed posts."""

    id: int
    domain: str
    body: bytes
    attempts: int


class WebhookQueue:
    """The stored events of this node's spool, for the poster."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    async def due(self, now: float, limit: int) -> list[StoredEvent]:
        """Events due at ``now`` (oldest first), at most ``limit``."""
        rows = await self._spool.fetchall(
            "SELECT id, domain, body, attempts FROM webhook_events WHERE next_attempt <= ?"
            " ORDER BY next_attempt, id LIMIT ?", (now, limit))
        return [StoredEvent(int(r[0]), r[1], bytes(r[2]), int(r[3])) for r in rows]

    async def next_due(self) -> float | None:
        """When the earliest stored event is due (None: none stored)."""
        row = await self._spool.fetchone("SELECT MIN(next_attempt) FROM webhook_events")
        return None if row is None or row[0] is None else float(row[0])

    async def backlog(self) -> int:
        """Events stored (waiting for their first post or for a retry)."""
        row = await self._spool.fetchone("SELECT COUNT(*) FROM webhook_events")
        return int(row[0]) if row else 0

    async def remove(self, ids: Sequence[int], *, dropped: bool = False) -> int:
        """Delete these events (posted; or ``dropped``: counted as such); how many existed."""
        if not ids:
            return 0
        return await self._spool._transact(functools.partial(
            _remove, ids=list(ids), spool=self._spool, dropped=dropped))

    async def drop_domain(self, domain: str) -> int:
        """Delete the events of ``domain`` (its webhook is gone), counted as dropped; how
        many."""
        def drop(conn: SqlConn) -> int:
            n = int(conn.execute("DELETE FROM webhook_events WHERE domain=?",
                                 (domain,)).rowcount)
            self._spool.hooks.removed(n, dropped=True)
            return n
        return await self._spool._transact(drop)

    async def retry(self, failed: Sequence[tuple[int, float, str]]) -> None:
        """``(event id, next attempt, error)``: one more failed post each, tried again then."""
        rows = [(nxt, err[:500], eid) for eid, nxt, err in failed]

        def push(conn: SqlConn) -> None:
            conn.executemany("UPDATE webhook_events SET attempts = attempts + 1,"
                             " next_attempt=?, last_error=? WHERE id=?", rows)
        if rows:
            await self._spool._transact(push)


def _remove(conn: SqlConn, ids: list[int], spool: Spool, dropped: bool) -> int:
    n = delete_in(conn, "DELETE FROM webhook_events WHERE id", ids)
    spool.hooks.removed(n, dropped=dropped)
    return n
