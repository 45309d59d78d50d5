"""The directory tables (domains, accounts, networks, DKIM keys, limits, last connection,
totals, labels, the audit trail) behind an interface.

Owns: :class:`DirectoryStore`, the protocol the control plane uses to read and
change the directory (async methods, typed records in and out, no SQL, no
connection), its records, and :class:`SqliteDirectory`, the implementation on
the spool's database: its writes join the spool's group commit, its reads use
the spool's reader. Another implementation (PostgreSQL, shared by several
nodes) can sit beside it. A check that must hold in the transaction that
writes (no overlapping network bindings) is passed in as a function of the
stored bindings and runs inside that transaction; whatever it raises aborts
the write and reaches the caller.

Every write takes ``audit``: the audit trail's entries of the change
(:class:`AuditEntry`), written in the same transaction as the change itself, so a
change never lands without them. Entries are kept by name (no reference to the
row), so an account's or domain's trail outlives it.

Deleting an account also purges its messages (``purge_queue``): on SQLite
both live in one database, so one transaction does both.
See also: relayd.controlplane.domains, .accounts (the operations), relayd.directory.accounts
(the in-memory directory).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from relayd.store import messages as q
from relayd.store import removal
from relayd.store.db import IntegrityError, SqlConn
from relayd.store.records import ACCOUNT_DELETED
from relayd.store.webhooks import WebhookRecord

if TYPE_CHECKING:
    from relayd.store.spool import Spool

T = TypeVar("T")


@dataclass(slots=True)
class DomainRecord:
    """A sending domain as stored (``deleted``: its keys are gone, its selectors kept)."""

    id: int
    name: str
    selector: str
    private_key: bytes | None
    ed25519_selector: str | None
    ed25519_key: bytes | None
    created_at: float
    deleted: bool = False
    check_header_from: bool = True


@dataclass(slots=True)
class NewDomain:
    """A domain to add."""

    name: str
    selector: str
    algorithm: str
    private_key: bytes | None
    ed25519_selector: str | None
    ed25519_key: bytes | None
    created_at: float


@dataclass(slots=True)
class AccountRecord:
    """An account as stored, with its bound networks."""

    id: int
    username: str
    domain_id: int
    password_hash: str | None
    status: str
    disabled_reason: str
    created_at: float
    last_connection: float | None
    total_sent: int
    per_minute: int | None
    per_hour: int | None
    per_day: int | None
    networks: list[str] = field(default_factory=list)
    label: str = ""
    #: The previous password's hash kept by ``reset-password --keep-old``, until
    #: ``old_password_expires`` (POSIX seconds); None when there is none.
    old_password_hash: str | None = None
    old_password_expires: float | None = None


@dataclass(slots=True)
class NewAccount:
    """An account to add (active), with the networks to bind."""

    username: str
    domain_id: int
    password_hash: str
    created_at: float
    networks: list[str]
    label: str = ""


@dataclass(slots=True)
class AuditEntry:
    """One entry of the audit trail: ``action`` done to the account or domain (``kind``)
    named ``subject`` at ``at``, by the operator ``uid`` (None: not through the control
    socket), with the operator's ``reason`` and ``details`` (a JSON object, never a
    secret). ``node``: the node that made the change (cluster mode; the store fills it)."""

    at: float
    kind: str
    subject: str
    action: str
    uid: int | None = None
    reason: str = ""
    details: str = ""
    domain: str = ""
    node: str = ""


#: No entry: a write the audit trail does not record.
NO_AUDIT: tuple[AuditEntry, ...] = ()


@dataclass(slots=True)
class NetworkBinding:
    """A network bound to an account that is not deleted."""

    cidr: str
    username: str
    domain: str


@dataclass(slots=True)
class SuppressionRecord:
    """A suppressed recipient of a domain as stored (``address``: domain part lower-cased)."""

    domain_id: int
    address: str
    reason: str
    since: float


#: Runs inside the transaction that binds networks, given every binding of the other
#: accounts that are not deleted; raises to refuse the write.
BindingCheck = Callable[[list[NetworkBinding]], None]


@dataclass(slots=True)
class DkimKey:
    """A DKIM selector of a domain besides its active ones (table ``dkim_selectors``).

    ``slot`` is the active key it replaces: ``main`` (the domain's ``selector``) or
    ``ed25519`` (its dual-signing key). ``state``: ``pending`` (made by rotate-key, not
    yet signing; has its key), ``retired`` (replaced by an activation) or ``cancelled``
    (a pending key dropped); ``at``: when it got that state. Its selector is never drawn
    again.
    """

    selector: str
    slot: str
    state: str
    private_key: bytes | None
    at: float


class KeyPending(Exception):
    """The domain has a pending key already (``selectors``)."""

    def __init__(self, selectors: list[str]) -> None:
        super().__init__(", ".join(selectors))
        self.selectors = selectors


class NoPendingKey(Exception):
    """The domain has no pending key to activate or cancel."""


class DomainExists(Exception):
    """A live domain of that name is stored already."""


class PlanFull(Exception):
    """Every account slot of the plan is in use (``used``), counted in the write."""

    def __init__(self, used: int) -> None:
        super().__init__(f"{used} account slot(s) in use")
        self.used = used


class QueueNotEmpty(Exception):
    """The account still has stored messages (``count``)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} message(s) stored")
        self.count = count


class DirectoryStore(Protocol):
    """Where the directory is kept. Every write is durable when its call returns."""

    async def domains(self) -> list[DomainRecord]:
        """Every domain, deleted ones included (at start)."""
    async def accounts(self) -> list[AccountRecord]:
        """Every account with its networks, deleted ones included (at start)."""
    async def domain(self, domain_id: int) -> DomainRecord | None:
        """One domain, with its keys."""
    async def live_domains(self) -> list[DomainRecord]:
        """The domains not deleted, by name."""
    async def selectors_used(self, selectors: Sequence[str]) -> bool:
        """True if any of ``selectors`` was ever given to a domain (deleted ones included)."""
    async def add_domain(self, new: NewDomain, audit: Sequence[AuditEntry] = NO_AUDIT) -> int:
        """Store a domain; its id. DomainExists if a live one has the name."""
    async def delete_domain(self, domain_id: int, now: float,
                            audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Mark deleted, destroy its keys, disable its accounts (reason domain_deleted)."""
    async def dkim_keys(self, domain_id: int) -> list[DkimKey]:
        """The domain's pending, retired and cancelled selectors, oldest first."""
    async def add_pending_keys(self, domain_id: int, keys: Sequence[DkimKey],
                               audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Store a rotation's new key(s); KeyPending if the domain has one already."""
    async def activate_keys(self, domain_id: int, now: float,
                            audit: Sequence[AuditEntry] = NO_AUDIT) -> list[DkimKey]:
        """The pending key(s) become the active ones, the active ones retired (returned).
        NoPendingKey if there is none."""
    async def cancel_keys(self, domain_id: int, now: float,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> list[DkimKey]:
        """Drop the pending key(s) (their selectors kept as cancelled; returned).
        NoPendingKey if there is none."""
    async def set_check_header_from(self, domain_id: int, on: bool,
                                    audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Switch the header From check of a domain on or off."""
    async def add_account(self, new: NewAccount, check: BindingCheck,
                          slots: int | None = None,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> int:
        """Store an active account with its networks (``check`` first); its id. With
        ``slots``, PlanFull if that many accounts that are not deleted exist already."""
    async def set_status(self, account_id: int, status: str, reason: str,
                         audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Set an account's status and disabled reason (a kept old password ends)."""
    async def set_password(self, account_id: int, password_hash: str,
                           old_hash: str | None = None, old_expires: float | None = None,
                           audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Set an account's password hash and the old one it keeps until ``old_expires``
        (None, the default: none; a kept old password ends)."""
    async def set_limits(self, account_id: int, per_minute: int | None, per_hour: int | None,
                         per_day: int | None, audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Set an account's sending limits (None: the default)."""
    async def set_label(self, account_id: int, label: str,
                        audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Set an account's label (the operator's free text; empty: none)."""
    async def add_network(self, account_id: int, cidr: str, check: BindingCheck,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Bind a network to an account (``check`` first)."""
    async def remove_network(self, account_id: int, cidr: str,
                             audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Unbind a network from an account."""
    async def delete_account(self, account_id: int, now: float, purge_queue: bool,
                             audit: Sequence[AuditEntry] = NO_AUDIT) -> list[int]:
        """Delete an account for good (hash, stats, limits, networks gone) and its messages;
        the ids of the messages purged. Without ``purge_queue``, QueueNotEmpty if it has any."""
    async def audit_entries(self, *, account: str | None = None, domain: str | None = None,
                            since: float | None = None, limit: int = 100
                            ) -> list[AuditEntry]:
        """The audit trail, newest first: of one account (by name, deleted ones too), of one
        domain (its own entries and its accounts'), since a time; at most ``limit``."""
    async def save_last_connections(self, changed: Sequence[tuple[float | None, int]]) -> None:
        """Store ``(last connection, account id)`` pairs."""
    async def webhooks(self) -> list[WebhookRecord]:
        """Every domain's webhook (live domains: a deleted one's is removed with it)."""
    async def webhook(self, domain_id: int) -> WebhookRecord | None:
        """One domain's webhook, if it has one."""
    async def set_webhook(self, domain_id: int, url: str | None, secret: str | None,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """Set (``url`` and ``secret``) or remove (``url`` None) a domain's webhook."""
    async def suppressions(self, domain_id: int | None, after: float) -> list[SuppressionRecord]:
        """The suppressed recipients added after ``after`` (of one domain, or of all)."""
    async def add_suppressions(self, domain_id: int, recs: Sequence[SuppressionRecord],
                               expired: float) -> None:
        """Store (or renew) entries of a domain; drop its entries older than ``expired``."""
    async def remove_suppression(self, domain_id: int, address: str) -> bool:
        """Drop one entry; True if it was stored."""


_DOMAIN_COLUMNS = ("SELECT id, name, selector, private_key, ed25519_selector, ed25519_key,"
                   " created_at, deleted_at, check_header_from FROM domains")


def _domain(r: Sequence[object]) -> DomainRecord:
    return DomainRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6],  # type: ignore[arg-type]
                        deleted=r[7] is not None, check_header_from=bool(r[8]))


class SqliteDirectory:
    """The directory tables in the spool's SQLite database."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    async def domains(self) -> list[DomainRecord]:
        return [_domain(r) for r in await self._spool.fetchall(_DOMAIN_COLUMNS)]

    async def holds_any(self) -> bool:
        """True if a domain was ever added here (the data directory of a single node)."""
        row = await self._spool.fetchone("SELECT EXISTS(SELECT 1 FROM domains)")
        return bool(row and row[0])

    async def cluster_id(self) -> str | None:
        """The cluster whose directory this spool's account ids refer to (None: this
        spool's own tables, a single node)."""
        row = await self._spool.fetchone("SELECT value FROM meta WHERE key='cluster_id'")
        return str(row[0]) if row else None

    async def set_cluster_id(self, cluster_id: str) -> None:
        await self._spool._transact(functools.partial(
            _execute, sql="INSERT OR REPLACE INTO meta(key, value) VALUES ('cluster_id', ?)",
            params=(cluster_id,)))

    async def accounts(self) -> list[AccountRecord]:
        nets: dict[int, list[str]] = {}
        for row in await self._spool.fetchall("SELECT account_id, cidr FROM account_networks"):
            nets.setdefault(row[0], []).append(row[1])
        return [AccountRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                              r[11], networks=nets.get(r[0], []), old_password_hash=r[12],
                              old_password_expires=r[13], label=r[14]) for r in
                await self._spool.fetchall(
                    "SELECT id, username, domain_id, password_hash, status, disabled_reason,"
                    " created_at, last_connection, total_sent, per_minute, per_hour, per_day,"
                    " old_password_hash, old_password_expires, label FROM accounts")]

    async def domain(self, domain_id: int) -> DomainRecord | None:
        row = await self._spool.fetchone(_DOMAIN_COLUMNS + " WHERE id=?", (domain_id,))
        return _domain(row) if row else None

    async def live_domains(self) -> list[DomainRecord]:
        return [_domain(r) for r in await self._spool.fetchall(
            _DOMAIN_COLUMNS + " WHERE deleted_at IS NULL ORDER BY name")]

    async def selectors_used(self, selectors: Sequence[str]) -> bool:
        marks = ",".join("?" * len(selectors))
        row = await self._spool.fetchone(
            f"SELECT COUNT(*) FROM domains WHERE selector IN ({marks})"  # noqa: S608 - marks only
            f" OR ed25519_selector IN ({marks})", [*selectors, *selectors])
        if row and row[0]:
            return True
        row = await self._spool.fetchone(
            f"SELECT COUNT(*) FROM dkim_selectors WHERE selector IN ({marks})",  # noqa: S608
            list(selectors))
        return bool(row and row[0])

    async def dkim_keys(self, domain_id: int) -> list[DkimKey]:
        return [DkimKey(*r) for r in await self._spool.fetchall(
            "SELECT selector, slot, state, private_key, at FROM dkim_selectors"
            " WHERE domain_id=? ORDER BY at, selector", (domain_id,))]

    async def add_pending_keys(self, domain_id: int, keys: Sequence[DkimKey],
                               audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._spool._transact(_audited(functools.partial(
            _add_pending_keys, domain_id=domain_id, keys=list(keys)), audit))

    async def activate_keys(self, domain_id: int, now: float,
                            audit: Sequence[AuditEntry] = NO_AUDIT) -> list[DkimKey]:
        return await self._spool._transact(_audited(functools.partial(
            _activate_keys, domain_id=domain_id, now=now), audit))

    async def cancel_keys(self, domain_id: int, now: float,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> list[DkimKey]:
        return await self._spool._transact(_audited(functools.partial(
            _cancel_keys, domain_id=domain_id, now=now), audit))

    async def add_domain(self, new: NewDomain, audit: Sequence[AuditEntry] = NO_AUDIT) -> int:
        try:
            return await self._spool._transact(_audited(
                functools.partial(_add_domain, new=new), audit))
        except IntegrityError as exc:
            if "domains.name" in str(exc) or "domains_live_name" in str(exc):
                raise DomainExists(new.name) from None
            raise

    async def delete_domain(self, domain_id: int, now: float,
                            audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._spool._transact(_audited(functools.partial(
            _delete_domain, domain_id=domain_id, now=now), audit))

    async def set_check_header_from(self, domain_id: int, on: bool,
                                    audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._spool._transact(_audited(functools.partial(
            _execute, sql="UPDATE domains SET check_header_from=? WHERE id=?",
            params=(int(on), domain_id)), audit))

    async def add_account(self, new: NewAccount, check: BindingCheck,
                          slots: int | None = None,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> int:
        return await self._spool._transact(_audited(functools.partial(
            _add_account, new=new, check=check, slots=slots), audit))

    async def set_status(self, account_id: int, status: str, reason: str,
                         audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, "status=?, disabled_reason=?, old_password_hash=NULL,"
                           " old_password_expires=NULL", status, reason, audit=audit)

    async def set_password(self, account_id: int, password_hash: str,
                           old_hash: str | None = None, old_expires: float | None = None,
                           audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, "password_hash=?, old_password_hash=?,"
                           " old_password_expires=?", password_hash, old_hash, old_expires,
                           audit=audit)

    async def set_limits(self, account_id: int, per_minute: int | None, per_hour: int | None,
                         per_day: int | None, audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, "per_minute=?, per_hour=?, per_day=?",
                           per_minute, per_hour, per_day, audit=audit)

    async def set_label(self, account_id: int, label: str,
                        audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, "label=?", label, audit=audit)

    async def _update(self, account_id: int, columns: str, *values: object,
                      audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        """``UPDATE accounts SET columns`` (literals of this module, values bound)."""
        sql = f"UPDATE accounts SET {columns} WHERE id=?"  # noqa: S608 - columns are literals
        await self._spool._transact(_audited(functools.partial(
            _execute, sql=sql, params=(*values, account_id)), audit))

    async def add_network(self, account_id: int, cidr: str, check: BindingCheck,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        def add(conn: SqlConn) -> None:
            check(_bindings(conn, account_id))
            conn.execute("INSERT INTO account_networks(account_id, cidr) VALUES (?,?)",
                         (account_id, cidr))
        await self._spool._transact(_audited(add, audit))

    async def remove_network(self, account_id: int, cidr: str,
                             audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._spool._transact(_audited(functools.partial(
            _execute, sql="DELETE FROM account_networks WHERE account_id=? AND cidr=?",
            params=(account_id, cidr)), audit))

    async def delete_account(self, account_id: int, now: float, purge_queue: bool,
                             audit: Sequence[AuditEntry] = NO_AUDIT) -> list[int]:
        purged: list[q.PurgedRow] = []
        ids = await self._spool._transact(_audited(removal.with_events(
            self._spool, functools.partial(_delete_account, account_id=account_id, now=now,
                                           purge_queue=purge_queue, purged=purged),
            purged, ACCOUNT_DELETED), audit), deletes_messages=True)
        removal.log_purged(self._spool, purged, ACCOUNT_DELETED)
        return ids

    async def audit_entries(self, *, account: str | None = None, domain: str | None = None,
                            since: float | None = None, limit: int = 100
                            ) -> list[AuditEntry]:
        where, params = audit_filter(account, domain, since, "?")
        rows = await self._spool.fetchall(
            AUDIT_COLUMNS + where + " ORDER BY at DESC, id DESC LIMIT ?", (*params, limit))
        return [audit_entry(r) for r in rows]

    async def save_last_connections(self, changed: Sequence[tuple[float | None, int]]) -> None:
        rows = list(changed)

        def save(conn: SqlConn) -> None:
            conn.executemany("UPDATE accounts SET last_connection=? WHERE id=?", rows)
        await self._spool._transact(save)

    async def webhooks(self) -> list[WebhookRecord]:
        return [WebhookRecord(int(r[0]), r[1], r[2]) for r in await self._spool.fetchall(
            "SELECT domain_id, url, secret FROM domain_webhooks")]

    async def webhook(self, domain_id: int) -> WebhookRecord | None:
        r = await self._spool.fetchone(
            "SELECT domain_id, url, secret FROM domain_webhooks WHERE domain_id=?", (domain_id,))
        return None if r is None else WebhookRecord(int(r[0]), r[1], r[2])

    async def set_webhook(self, domain_id: int, url: str | None, secret: str | None,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        if url is None or secret is None:
            work = functools.partial(_execute, sql="DELETE FROM domain_webhooks"
                                     " WHERE domain_id=?", params=(domain_id,))
        else:
            work = functools.partial(
                _execute, sql="INSERT OR REPLACE INTO domain_webhooks(domain_id, url, secret)"
                " VALUES (?,?,?)", params=(domain_id, url, secret))
        await self._spool._transact(_audited(work, audit))


    async def suppressions(self, domain_id: int | None, after: float) -> list[SuppressionRecord]:
        sql = "SELECT domain_id, address, reason, since FROM suppressions WHERE since > ?"
        params: tuple[object, ...] = (after,)
        if domain_id is not None:
            sql, params = sql + " AND domain_id = ?", (after, domain_id)
        return [SuppressionRecord(int(r[0]), r[1], r[2], float(r[3]))
                for r in await self._spool.fetchall(sql, params)]

    async def add_suppressions(self, domain_id: int, recs: Sequence[SuppressionRecord],
                               expired: float) -> None:
        rows = [(domain_id, r.address, r.reason, r.since) for r in recs]

        def add(conn: SqlConn) -> None:
            conn.execute("DELETE FROM suppressions WHERE domain_id=? AND since <= ?",
                         (domain_id, expired))
            conn.executemany("INSERT OR REPLACE INTO suppressions(domain_id, address, reason,"
                             " since) VALUES (?,?,?,?)", rows)
        await self._spool._transact(add)

    async def remove_suppression(self, domain_id: int, address: str) -> bool:
        def remove(conn: SqlConn) -> bool:
            return bool(conn.execute("DELETE FROM suppressions WHERE domain_id=? AND address=?",
                                     (domain_id, address)).rowcount)
        return bool(await self._spool._transact(remove))


# -- the audit trail, shared with relayd.store.pgdirectory ---------------------------------
AUDIT_COLUMNS = ("SELECT at, kind, subject, action, uid, reason, details, domain, node"
                 " FROM audit")
_AUDIT_INSERT = ("INSERT INTO audit(at, kind, subject, action, uid, reason, details, domain,"
                 " node) VALUES ({})")


def audit_rows(audit: Sequence[AuditEntry], node: str) -> list[tuple[object, ...]]:
    """The rows of ``audit`` for ``audit_insert``, made by ``node``."""
    return [(e.at, e.kind, e.subject, e.action, e.uid, e.reason, e.details, e.domain, node)
            for e in audit]


def audit_insert(marks: Sequence[str]) -> str:
    """The INSERT of one audit row, with the driver's placeholders ``marks`` (9)."""
    return _AUDIT_INSERT.format(",".join(marks))


def audit_filter(account: str | None, domain: str | None, since: float | None,
                 mark: str) -> tuple[str, list[object]]:
    """The WHERE clause (or "") and its values of an audit query; ``mark``: "?" (SQLite)
    or "$" (PostgreSQL, numbered from 1)."""
    clauses: list[str] = []
    params: list[object] = []

    def p(value: object) -> str:
        params.append(value)
        return "?" if mark == "?" else f"${len(params)}"

    if account is not None:
        clauses.append(f"(kind = 'account' AND subject = {p(account)})")
    if domain is not None:
        clauses.append(f"((kind = 'domain' AND subject = {p(domain)}) OR"
                       f" (kind = 'account' AND domain = {p(domain)}))")
    if since is not None:
        clauses.append(f"at >= {p(since)}")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def audit_entry(r: Sequence[object]) -> AuditEntry:
    """An entry from a row of ``AUDIT_COLUMNS``."""
    return AuditEntry(float(r[0]), str(r[1]), str(r[2]), str(r[3]),  # type: ignore[arg-type]
                      None if r[4] is None else int(r[4]),  # type: ignore[call-overload]
                      str(r[5]), str(r[6]), str(r[7]), str(r[8]))


def _audited(work: Callable[[SqlConn], T], audit: Sequence[AuditEntry]
             ) -> Callable[[SqlConn], T]:
    """``work`` and then, in its transaction, the audit entries of the change."""
    if not audit:
        return work
    rows = audit_rows(audit, "")

    def run(conn: SqlConn) -> T:
        result = work(conn)
        conn.executemany(audit_insert("?" * 9), rows)
        return result
    return run


# -- on the writer's thread, inside a group transaction ------------------------------------
def _execute(conn: SqlConn, sql: str, params: tuple[object, ...]) -> None:
    conn.execute(sql, params)


def _bindings(conn: SqlConn, exclude_account: int | None) -> list[NetworkBinding]:
    """The networks bound to accounts that are not deleted, but ``exclude_account``'s."""
    rows = conn.execute(
        "SELECT n.cidr, a.username, d.name FROM account_networks n"
        " JOIN accounts a ON a.id = n.account_id JOIN domains d ON d.id = a.domain_id"
        " WHERE a.status != 'deleted' AND n.account_id IS NOT ?", (exclude_account,)).fetchall()
    return [NetworkBinding(str(r[0]), r[1], r[2]) for r in rows]


def _add_domain(conn: SqlConn, new: NewDomain) -> int:
    cur = conn.execute(
        "INSERT INTO domains(name, selector, algorithm, private_key,"
        " ed25519_selector, ed25519_key, created_at) VALUES (?,?,?,?,?,?,?)",
        (new.name, new.selector, new.algorithm, new.private_key, new.ed25519_selector,
         new.ed25519_key, new.created_at))
    return int(cur.lastrowid or 0)


def _delete_domain(conn: SqlConn, domain_id: int, now: float) -> None:
    conn.execute("UPDATE domains SET deleted_at=?, private_key=NULL, ed25519_key=NULL"
                 " WHERE id=?", (now, domain_id))
    conn.execute("DELETE FROM domain_webhooks WHERE domain_id=?", (domain_id,))
    _cancel_keys(conn, domain_id, now, missing_ok=True)
    conn.execute("UPDATE accounts SET status='disabled', disabled_reason='domain_deleted',"
                 " old_password_hash=NULL, old_password_expires=NULL"
                 " WHERE domain_id=? AND status != 'deleted'", (domain_id,))


def _add_account(conn: SqlConn, new: NewAccount, check: BindingCheck,
                 slots: int | None) -> int:
    if slots is not None:
        used = conn.execute("SELECT COUNT(*) FROM accounts WHERE status != 'deleted'")\
            .fetchone()[0]
        if used >= slots:
            raise PlanFull(used)
    check(_bindings(conn, None))
    cur = conn.execute(
        "INSERT INTO accounts(username, domain_id, password_hash, status, created_at, label)"
        " VALUES (?,?,?,'active',?,?)", (new.username, new.domain_id, new.password_hash,
                                         new.created_at, new.label))
    acct_id = int(cur.lastrowid or 0)
    conn.executemany("INSERT INTO account_networks(account_id, cidr) VALUES (?,?)",
                     [(acct_id, n) for n in new.networks])
    return acct_id


def _delete_account(conn: SqlConn, account_id: int, now: float, purge_queue: bool,
                    purged: list[q.PurgedRow]) -> list[int]:
    if not purge_queue:
        # a message committed after the caller's check: still refused
        count = q.count_of_account(conn, account_id)
        if count:
            raise QueueNotEmpty(count)
    ids = q.purge_account(conn, account_id, None, purged)
    conn.execute(
        "UPDATE accounts SET status='deleted', password_hash=NULL, deleted_at=?,"
        " old_password_hash=NULL, old_password_expires=NULL,"
        " total_sent=0, last_connection=NULL, per_minute=NULL, per_hour=NULL,"
        " per_day=NULL WHERE id=?", (now, account_id))
    conn.execute("DELETE FROM account_networks WHERE account_id=?", (account_id,))
    return ids


def _pending(conn: SqlConn, domain_id: int) -> list[DkimKey]:
    return [DkimKey(*r) for r in conn.execute(
        "SELECT selector, slot, state, private_key, at FROM dkim_selectors"
        " WHERE domain_id=? AND state='pending' ORDER BY slot", (domain_id,)).fetchall()]


def _add_pending_keys(conn: SqlConn, domain_id: int, keys: list[DkimKey]) -> None:
    pending = _pending(conn, domain_id)
    if pending:
        raise KeyPending([k.selector for k in pending])
    conn.executemany(
        "INSERT INTO dkim_selectors(selector, domain_id, slot, state, private_key, at)"
        " VALUES (?,?,?,'pending',?,?)",
        [(k.selector, domain_id, k.slot, k.private_key, k.at) for k in keys])


def _activate_keys(conn: SqlConn, domain_id: int, now: float) -> list[DkimKey]:
    pending = _pending(conn, domain_id)
    if not pending:
        raise NoPendingKey()
    row = conn.execute("SELECT selector, ed25519_selector FROM domains WHERE id=?",
                       (domain_id,)).fetchone()
    active = {"main": row[0], "ed25519": row[1]}
    retired = []
    for key in pending:
        old = active.get(key.slot)
        if old:
            retired.append(DkimKey(old, key.slot, "retired", None, now))
        if key.slot == "main":
            conn.execute("UPDATE domains SET selector=?, private_key=? WHERE id=?",
                         (key.selector, key.private_key, domain_id))
        else:
            conn.execute("UPDATE domains SET ed25519_selector=?, ed25519_key=? WHERE id=?",
                         (key.selector, key.private_key, domain_id))
    conn.execute("DELETE FROM dkim_selectors WHERE domain_id=? AND state='pending'",
                 (domain_id,))
    conn.executemany(
        "INSERT INTO dkim_selectors(selector, domain_id, slot, state, private_key, at)"
        " VALUES (?,?,?,'retired',NULL,?)",
        [(k.selector, domain_id, k.slot, now) for k in retired])
    return retired


def _cancel_keys(conn: SqlConn, domain_id: int, now: float,
                 missing_ok: bool = False) -> list[DkimKey]:
    pending = _pending(conn, domain_id)
    if not pending and not missing_ok:
        raise NoPendingKey()
    conn.execute("UPDATE dkim_selectors SET state='cancelled', private_key=NULL, at=?"
                 " WHERE domain_id=? AND state='pending'", (now, domain_id))
    return [DkimKey(k.selector, k.slot, "cancelled", None, now) for k in pending]
