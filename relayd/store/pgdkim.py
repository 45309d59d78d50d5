"""The DKIM key rotation rows of the cluster's directory (table ``dkim_selectors``).

Owns: :class:`PgDkimKeys`, the part of relayd.store.pgdirectory.PgDirectory that stores a
domain's pending DKIM key(s), activates them (the domain's active key columns replaced,
the old selectors kept as retired) and cancels them: each one control write, with a change
log row for the domain, so every node applies an activation (relayd.controlplane.follow).
Keys are sealed before they are written and opened after they are read, like the active
ones. A mixin: the database, the seal functions and ``_write`` are PgDirectory's.

Untrusted input: none (records from the control plane; rows written by relayd).
See also: relayd.store.directory (the records, the SQLite implementation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from relayd.store.directory import NO_AUDIT, AuditEntry, DkimKey, KeyPending, NoPendingKey
from relayd.store.pg import Database, Tx

T = TypeVar("T")


def _sealed(seal: Callable[[bytes], bytes], key: bytes | None) -> bytes | None:
    return seal(key) if key is not None else None


class PgDkimKeys:
    """Pending, retired and cancelled DKIM selectors in PostgreSQL (a PgDirectory part)."""

    _db: Database
    _seal: Callable[[bytes], bytes]
    _unseal: Callable[[bytes], bytes]

    if TYPE_CHECKING:
        async def _write(self, work: Callable[[Tx], Awaitable[tuple[T, list[tuple[str, int]]]]],
                         audit: Sequence[AuditEntry] = NO_AUDIT) -> T: ...

    async def _selectors_kept(self, selectors: Sequence[str]) -> bool:
        """True if any of ``selectors`` is pending, retired or cancelled (of any domain)."""
        return bool(await self._db.fetchval(
            "SELECT count(*) FROM dkim_selectors WHERE selector = ANY($1::text[])",
            list(selectors)))

    @staticmethod
    async def _cancel_pending(tx: Tx, domain_id: int, now: float) -> None:
        """In a write: the domain's pending key(s) dropped (kept as cancelled selectors)."""
        await tx.execute("UPDATE dkim_selectors SET state='cancelled', private_key=NULL,"
                         " at=$2 WHERE domain_id=$1 AND state='pending'", domain_id, now)

    def _dkim_key(self, r: Any) -> DkimKey:
        key = self._unseal(bytes(r[3])) if r[3] is not None else None
        return DkimKey(r[0], r[1], r[2], key, float(r[4]))

    async def _pending(self, tx: Tx, domain_id: int) -> list[DkimKey]:
        return [self._dkim_key(r) for r in await tx.fetch(
            "SELECT selector, slot, state, private_key, at FROM dkim_selectors"
            " WHERE domain_id=$1 AND state='pending' ORDER BY slot FOR UPDATE", domain_id)]

    async def dkim_keys(self, domain_id: int) -> list[DkimKey]:
        return [self._dkim_key(r) for r in await self._db.fetch(
            "SELECT selector, slot, state, private_key, at FROM dkim_selectors"
            " WHERE domain_id=$1 ORDER BY at, selector", domain_id)]

    async def add_pending_keys(self, domain_id: int, keys: Sequence[DkimKey],
                               audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        async def add(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            pending = await self._pending(tx, domain_id)
            if pending:
                raise KeyPending([k.selector for k in pending])
            await tx.executemany(
                "INSERT INTO dkim_selectors(selector, domain_id, slot, state, private_key, at)"
                " VALUES ($1,$2,$3,'pending',$4,$5)",
                [(k.selector, domain_id, k.slot, _sealed(self._seal, k.private_key), k.at)
                 for k in keys])
            return None, [("domain", domain_id)]
        await self._write(add, audit)

    async def activate_keys(self, domain_id: int, now: float,
                            audit: Sequence[AuditEntry] = NO_AUDIT) -> list[DkimKey]:
        async def activate(tx: Tx) -> tuple[list[DkimKey], list[tuple[str, int]]]:
            pending = await self._pending(tx, domain_id)
            if not pending:
                raise NoPendingKey()
            row = await tx.fetchrow("SELECT selector, ed25519_selector FROM domains"
                                    " WHERE id=$1 FOR UPDATE", domain_id)
            active = {"main": row[0], "ed25519": row[1]}
            retired = [DkimKey(active[k.slot], k.slot, "retired", None, now)
                       for k in pending if active.get(k.slot)]
            for k in pending:
                column = "selector=$2, private_key=$3" if k.slot == "main" else \
                    "ed25519_selector=$2, ed25519_key=$3"
                await tx.execute(f"UPDATE domains SET {column} WHERE id=$1",  # noqa: S608
                                 domain_id, k.selector, _sealed(self._seal, k.private_key))
            await tx.execute("DELETE FROM dkim_selectors WHERE domain_id=$1"
                             " AND state='pending'", domain_id)
            await tx.executemany(
                "INSERT INTO dkim_selectors(selector, domain_id, slot, state, private_key, at)"
                " VALUES ($1,$2,$3,'retired',NULL,$4)",
                [(k.selector, domain_id, k.slot, now) for k in retired])
            return retired, [("domain", domain_id)]
        return await self._write(activate, audit)

    async def cancel_keys(self, domain_id: int, now: float,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> list[DkimKey]:
        async def cancel(tx: Tx) -> tuple[list[DkimKey], list[tuple[str, int]]]:
            pending = await self._pending(tx, domain_id)
            if not pending:
                raise NoPendingKey()
            await self._cancel_pending(tx, domain_id, now)
            return ([DkimKey(k.selector, k.slot, "cancelled", None, now) for k in pending],
                    [("domain", domain_id)])
        return await self._write(cancel, audit)
