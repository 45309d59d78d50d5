"""The directory shared by the nodes of a cluster, in PostgreSQL, and the cluster's own tables.

Owns: the PostgreSQL schema of cluster mode (created by the first node that starts on
an empty database), :class:`PgDirectory` — the :class:`~relayd.store.directory.DirectoryStore`
of a cluster — and the tables that make the nodes agree: the control-plane version,
the change log, the node registry (heartbeats on the database clock, applied
versions), the per-node answers to a queue probe, and the sending-limit quota
leased to the nodes (one row per account, limited period and window).

Every control write is one transaction that first takes the next control-plane version
(``UPDATE control_version ... RETURNING``: the row lock orders every write of the
cluster, so the checks a write makes — plan slots, network overlaps, unique names —
see every write before it), then changes the rows, appends one change-log row per
changed domain or account, and ``NOTIFY relayd_control`` with the version only. The
audit trail's entries of a change (``audit``, shared by every node: ``relayctl audit`` on
any node lists them all, with the node that made each) are written in that same
transaction. A
node applies the log in order by reading each changed row again (so applying a change
twice, or a newer row state, is harmless) and then records its applied version and
``NOTIFY relayd_ack``.

DKIM private keys are sealed before they are written and opened after they are read,
by the two functions the composition root passes in (the key never enters the
database). Deleting an account does not purge messages here: every node's spool is
its own, and each node purges its own when it applies the deletion.

Untrusted input: none (records from the control plane; rows written by relayd).
See also: relayd.store.pg (the client), relayd.cluster.node (heartbeats, following,
acknowledgements), relayd.store.directory (the records and the SQLite implementation).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from relayd.store.directory import (
    AUDIT_COLUMNS,
    NO_AUDIT,
    AccountRecord,
    AuditEntry,
    BindingCheck,
    DomainExists,
    DomainRecord,
    NetworkBinding,
    NewAccount,
    NewDomain,
    PlanFull,
    SuppressionRecord,
    audit_entry,
    audit_filter,
    audit_insert,
    audit_rows,
)
from relayd.store.pg import Database, Tx, UniqueViolation
from relayd.store.pgdkim import PgDkimKeys
from relayd.store.webhooks import WebhookRecord

T = TypeVar("T")

SCHEMA_VERSION = 1
CONTROL_CHANNEL = "relayd_control"
ACK_CHANNEL = "relayd_ack"
_SCHEMA_LOCK = 0x72656C6179  # pg_advisory_xact_lock key while the schema is created
_KEY_CHECK = b"relayd cluster key check v1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS relayd_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS control_version (
    id int PRIMARY KEY CHECK (id = 1), version bigint NOT NULL);
INSERT INTO control_version VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS changes (
    version bigint NOT NULL, kind text NOT NULL, entity_id bigint NOT NULL,
    node text NOT NULL, at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (version, kind, entity_id));
CREATE TABLE IF NOT EXISTS domains (
    id bigserial PRIMARY KEY, name text NOT NULL, selector text NOT NULL UNIQUE,
    algorithm text NOT NULL, private_key bytea, ed25519_selector text, ed25519_key bytea,
    created_at double precision NOT NULL, deleted_at double precision);
CREATE UNIQUE INDEX IF NOT EXISTS domains_live_name ON domains(name)
    WHERE deleted_at IS NULL;
ALTER TABLE domains ADD COLUMN IF NOT EXISTS check_header_from boolean NOT NULL DEFAULT true;
CREATE TABLE IF NOT EXISTS accounts (
    id bigserial PRIMARY KEY, username text NOT NULL UNIQUE,
    domain_id bigint NOT NULL REFERENCES domains(id), password_hash text,
    status text NOT NULL, disabled_reason text NOT NULL DEFAULT '',
    created_at double precision NOT NULL, last_connection double precision,
    total_sent bigint NOT NULL DEFAULT 0, per_minute int, per_hour int, per_day int,
    deleted_at double precision);
CREATE TABLE IF NOT EXISTS account_networks (
    account_id bigint NOT NULL REFERENCES accounts(id), cidr text NOT NULL,
    PRIMARY KEY (account_id, cidr));
CREATE TABLE IF NOT EXISTS nodes (
    name text PRIMARY KEY, address text NOT NULL, applied_version bigint NOT NULL DEFAULT 0,
    heartbeat timestamptz NOT NULL DEFAULT now(), started_at timestamptz NOT NULL DEFAULT now(),
    queue_depth bigint NOT NULL DEFAULT 0, fenced boolean NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS queue_probes (
    version bigint NOT NULL, node text NOT NULL, account_id bigint NOT NULL,
    count bigint NOT NULL, PRIMARY KEY (version, node));
CREATE TABLE IF NOT EXISTS quota (
    account_id bigint NOT NULL, period int NOT NULL, window_start bigint NOT NULL,
    granted bigint NOT NULL, PRIMARY KEY (account_id, period, window_start));
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS old_password_hash text;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS old_password_expires double precision;
CREATE TABLE IF NOT EXISTS domain_webhooks (
    domain_id bigint PRIMARY KEY REFERENCES domains(id), url text NOT NULL,
    secret bytea NOT NULL);
CREATE TABLE IF NOT EXISTS dkim_selectors (
    selector text PRIMARY KEY, domain_id bigint NOT NULL REFERENCES domains(id),
    slot text NOT NULL, state text NOT NULL, private_key bytea, at double precision NOT NULL);
CREATE INDEX IF NOT EXISTS dkim_selectors_domain ON dkim_selectors(domain_id);
CREATE TABLE IF NOT EXISTS suppressions (
    domain_id bigint NOT NULL, address text NOT NULL, reason text NOT NULL,
    since double precision NOT NULL, PRIMARY KEY (domain_id, address));
CREATE TABLE IF NOT EXISTS audit (
    id bigserial PRIMARY KEY, at double precision NOT NULL, kind text NOT NULL,
    subject text NOT NULL, domain text NOT NULL DEFAULT '', action text NOT NULL, uid bigint,
    node text NOT NULL DEFAULT '', reason text NOT NULL DEFAULT '',
    details text NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS audit_subject ON audit(kind, subject, at);
CREATE INDEX IF NOT EXISTS audit_domain ON audit(domain, at);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS label text NOT NULL DEFAULT '';
"""


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the change log: ``kind`` (domain, account, probe, suppression: a domain's
    suppression list) and the entity's id."""

    version: int
    kind: str
    entity_id: int


@dataclass(frozen=True, slots=True)
class Window:
    """One limited sending window of an account as a lease sees it: its period and
    start (POSIX seconds), the limit, and the units this node already holds in it."""

    period: int
    start: int
    limit: int
    held: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """What a lease gave in one window: ``granted`` units, ``remaining`` after it."""

    period: int
    start: int
    granted: int
    remaining: int


def lease_sizes(windows: Sequence[Window], granted: Sequence[int], want: int) -> list[int]:
    """Units to grant per window so that ``want`` more messages may be sent, or as many
    as every window's remaining quota allows (a message takes one unit of each window;
    units already held count). Pure."""
    sendable = min(w.held for w in windows)
    target = min(sendable + max(0, want),
                 *(w.held + max(0, w.limit - g) for w, g in zip(windows, granted, strict=True)))
    return [max(0, target - w.held) for w in windows]


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A registered node as the database sees it (``live``: heartbeat recent, database clock)."""

    name: str
    address: str
    applied_version: int
    heartbeat_age: float
    live: bool
    fenced: bool
    queue_depth: int


class SchemaTooNew(Exception):
    """The database was created by a newer relayd."""


_DOMAIN_COLUMNS = ("SELECT id, name, selector, private_key, ed25519_selector, ed25519_key,"
                   " created_at, deleted_at, check_header_from FROM domains")
_ACCOUNT_FIELDS = ("id, username, domain_id, password_hash, status, disabled_reason,"
                   " created_at, last_connection, total_sent, per_minute, per_hour, per_day,"
                   " old_password_hash, old_password_expires, label")
_ACCOUNT_COLUMNS = "SELECT " + _ACCOUNT_FIELDS + " FROM accounts"  # noqa: S608 - literals
#: One account and, as a 16th column, its networks (one round trip).
_ONE_ACCOUNT = ("SELECT " + _ACCOUNT_FIELDS  # noqa: S608 - literals
                + ", array(SELECT cidr FROM account_networks n WHERE n.account_id = accounts.id"
                " ORDER BY cidr) FROM accounts WHERE id=$1")
_LIVE = "heartbeat > now() - make_interval(secs => $1)"
#: A status change ends a kept old password (an enable never brings it back).
_SET_STATUS = ("UPDATE accounts SET status=$2, disabled_reason=$3, old_password_hash=NULL,"
               " old_password_expires=NULL WHERE id=$1")
#: The password hash and the old one kept until its expiry (NULL, NULL: none).
_SET_HASHES = ("UPDATE accounts SET password_hash=$2, old_password_hash=$3,"
                 " old_password_expires=$4 WHERE id=$1")


class _Webhooks:
    """PgDirectory's webhooks (a part of its own, by size): the secret sealed like a DKIM
    key, a change logged as the domain's."""

    _db: Database
    _seal: Callable[[bytes], bytes]
    _unseal: Callable[[bytes], bytes]

    async def _write(self, work: Callable[[Tx], Awaitable[tuple[T, list[tuple[str, int]]]]],
                     audit: Sequence[AuditEntry] = NO_AUDIT) -> T:
        raise NotImplementedError

    def _webhook(self, r: Any) -> WebhookRecord:
        return WebhookRecord(int(r[0]), r[1], self._unseal(bytes(r[2])).decode("utf-8"))

    async def webhooks(self) -> list[WebhookRecord]:
        return [self._webhook(r) for r in await self._db.fetch(
            "SELECT domain_id, url, secret FROM domain_webhooks")]

    async def webhook(self, domain_id: int) -> WebhookRecord | None:
        r = await self._db.fetchrow(
            "SELECT domain_id, url, secret FROM domain_webhooks WHERE domain_id=$1", domain_id)
        return None if r is None else self._webhook(r)

    async def set_webhook(self, domain_id: int, url: str | None, secret: str | None,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        async def update(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            if url is None or secret is None:
                await tx.execute("DELETE FROM domain_webhooks WHERE domain_id=$1", domain_id)
            else:
                await tx.execute(
                    "INSERT INTO domain_webhooks(domain_id, url, secret) VALUES ($1,$2,$3)"
                    " ON CONFLICT (domain_id) DO UPDATE SET url=EXCLUDED.url,"
                    " secret=EXCLUDED.secret", domain_id, url, self._seal(secret.encode()))
            return None, [("domain", domain_id)]
        await self._write(update, audit)


class _SuppressionRows:
    """PgDirectory's suppression lists: a change names the domain, whose list every node
    then reads again."""

    _db: Database
    _write: Callable[..., Awaitable[Any]]

    async def suppressions(self, domain_id: int | None, after: float) -> list[SuppressionRecord]:
        rows = await self._db.fetch(
            "SELECT domain_id, address, reason, since FROM suppressions WHERE since > $1"
            " AND ($2::bigint IS NULL OR domain_id = $2)", after, domain_id)
        return [SuppressionRecord(int(r[0]), r[1], r[2], float(r[3])) for r in rows]

    async def add_suppressions(self, domain_id: int, recs: Sequence[SuppressionRecord],
                               expired: float) -> None:
        async def add(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            await tx.execute("DELETE FROM suppressions WHERE domain_id=$1 AND since <= $2",
                             domain_id, expired)
            await tx.executemany(
                "INSERT INTO suppressions(domain_id, address, reason, since)"
                " VALUES ($1,$2,$3,$4) ON CONFLICT (domain_id, address) DO UPDATE SET"
                " reason=EXCLUDED.reason, since=EXCLUDED.since",
                [(domain_id, r.address, r.reason, r.since) for r in recs])
            return None, [("suppression", domain_id)]
        await self._write(add)

    async def remove_suppression(self, domain_id: int, address: str) -> bool:
        async def remove(tx: Tx) -> tuple[bool, list[tuple[str, int]]]:
            gone = await tx.fetchval("DELETE FROM suppressions WHERE domain_id=$1"
                                     " AND address=$2 RETURNING 1", domain_id, address)
            return gone is not None, [("suppression", domain_id)]
        return await self._write(remove)


class PgDirectory(_Webhooks, _SuppressionRows, PgDkimKeys):
    """The directory and the cluster tables in one PostgreSQL database.

    ``written`` is the highest control-plane version this process has committed: a
    caller that must wait until every node applied its change waits for it.

    Size: one short method per DirectoryStore operation (each a transaction of the one
    ``_write`` discipline, with its audit entries), the change log, the node registry,
    queue probes and quota leases: the cluster's whole database surface in one place,
    as the SQLite side keeps its own in relayd.store.directory.
    """

    def __init__(self, db: Database, node: str, *, seal: Callable[[bytes], bytes],
                 unseal: Callable[[bytes], bytes]) -> None:
        self._db = db
        self.node = node
        self._seal = seal
        self._unseal = unseal
        self.written = 0
        #: The cluster's identity (created with its schema; known after ensure_schema).
        self.cluster_id = ""

    # -- schema, versions, change log ----------------------------------------------------
    async def ensure_schema(self) -> None:
        """Create the tables on an empty database (one node at a time); refuse a newer
        schema (SchemaTooNew) and a node whose key cannot open the key check the first
        node sealed (SealError from ``unseal``); learn the cluster's id."""
        async def create(tx: Tx) -> None:
            await tx.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await tx.execute(_SCHEMA)
            stored = await tx.fetchval("SELECT value FROM relayd_meta WHERE key='schema'")
            if stored is None:
                await tx.execute("INSERT INTO relayd_meta VALUES ('schema', $1)",
                                 str(SCHEMA_VERSION))
            elif int(stored) > SCHEMA_VERSION:
                raise SchemaTooNew(f"the cluster database has schema {stored}; this relayd"
                                   f" knows up to {SCHEMA_VERSION}: upgrade this node")
            # who the cluster is, and proof of its key: the first node seals a known
            # text; a node with another key cannot open it (unseal raises) and stops
            await tx.execute(
                "INSERT INTO relayd_meta VALUES ('cluster_id', $1), ('key_check', $2)"
                " ON CONFLICT DO NOTHING", uuid.uuid4().hex,
                base64.b64encode(self._seal(_KEY_CHECK)).decode("ascii"))
            check = await tx.fetchval("SELECT value FROM relayd_meta WHERE key='key_check'")
            if self._unseal(base64.b64decode(check)) != _KEY_CHECK:
                raise ValueError("cluster key check: unexpected content")
            self.cluster_id = str(await tx.fetchval(
                "SELECT value FROM relayd_meta WHERE key='cluster_id'"))
        await self._db.transaction(create)

    async def version(self) -> int:
        return int(await self._db.fetchval("SELECT version FROM control_version WHERE id=1"))

    async def changes_after(self, version: int, versions: int = 500) -> list[Change]:
        """The log rows of the next ``versions`` versions (every row of each), in order."""
        rows = await self._db.fetch(
            "SELECT version, kind, entity_id FROM changes WHERE version > $1"
            " AND version <= $1 + $2 ORDER BY version, kind, entity_id", version, versions)
        return [Change(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def prune_changes(self, keep_seconds: float) -> None:
        """Drop change-log rows (and probe answers) older than ``keep_seconds`` that every
        node heard from within ``keep_seconds`` has applied. A node further behind than
        what is kept reloads the whole directory instead of replaying."""
        async def prune(tx: Tx) -> None:
            floor = await tx.fetchval(
                f"SELECT min(applied_version) FROM nodes WHERE {_LIVE}",  # noqa: S608
                keep_seconds)
            if floor is None:
                return
            await tx.execute("DELETE FROM changes WHERE version < $1 AND at < now()"
                             " - make_interval(secs => $2)", floor, keep_seconds)
            await tx.execute("DELETE FROM queue_probes WHERE version < $1", floor)
        await self._db.transaction(prune)

    async def _write(self, work: Callable[[Tx], Awaitable[tuple[T, list[tuple[str, int]]]]],
                     audit: Sequence[AuditEntry] = NO_AUDIT) -> T:
        """Run ``work`` as one control write: next version first, then ``work`` and its
        audit entries, the log and NOTIFY last."""
        async def run(tx: Tx) -> tuple[T, int]:
            version = int(await tx.fetchval(
                "UPDATE control_version SET version = version + 1 WHERE id = 1"
                " RETURNING version"))
            result, changed = await work(tx)
            if audit:
                await tx.executemany(audit_insert([f"${i}" for i in range(1, 10)]),
                                     audit_rows(audit, self.node))
            await tx.executemany(
                "INSERT INTO changes(version, kind, entity_id, node) VALUES ($1,$2,$3,$4)"
                " ON CONFLICT DO NOTHING", [(version, k, i, self.node) for k, i in changed])
            await tx.execute("SELECT pg_notify($1, $2)", CONTROL_CHANNEL, str(version))
            return result, version

        result, version = await self._db.transaction(run)
        self.written = max(self.written, version)
        return result

    # -- the directory (DirectoryStore) ------------------------------------------------
    def _domain(self, r: Any) -> DomainRecord:
        key = self._unseal(bytes(r[3])) if r[3] is not None else None
        ed_key = self._unseal(bytes(r[5])) if r[5] is not None else None
        return DomainRecord(int(r[0]), r[1], r[2], key, r[4], ed_key, float(r[6]),
                            deleted=r[7] is not None, check_header_from=bool(r[8]))

    async def domains(self) -> list[DomainRecord]:
        return [self._domain(r) for r in await self._db.fetch(_DOMAIN_COLUMNS + " ORDER BY id")]

    async def accounts(self) -> list[AccountRecord]:
        nets: dict[int, list[str]] = {}
        for r in await self._db.fetch("SELECT account_id, cidr FROM account_networks"):
            nets.setdefault(int(r[0]), []).append(r[1])
        return [_account(r, nets.get(int(r[0]), []))
                for r in await self._db.fetch(_ACCOUNT_COLUMNS + " ORDER BY id")]

    async def account(self, account_id: int) -> AccountRecord | None:
        """One account with its networks (one round trip)."""
        row = await self._db.fetchrow(_ONE_ACCOUNT, account_id)
        return None if row is None else _account(row, list(row[15]))

    async def domain(self, domain_id: int) -> DomainRecord | None:
        row = await self._db.fetchrow(_DOMAIN_COLUMNS + " WHERE id=$1", domain_id)
        return self._domain(row) if row else None

    async def live_domains(self) -> list[DomainRecord]:
        return [self._domain(r) for r in await self._db.fetch(
            _DOMAIN_COLUMNS + " WHERE deleted_at IS NULL ORDER BY name")]

    async def selectors_used(self, selectors: Sequence[str]) -> bool:
        n = await self._db.fetchval(
            "SELECT count(*) FROM domains WHERE selector = ANY($1::text[])"
            " OR ed25519_selector = ANY($1::text[])", list(selectors))
        return bool(n) or await self._selectors_kept(selectors)

    async def add_domain(self, new: NewDomain, audit: Sequence[AuditEntry] = NO_AUDIT) -> int:
        async def add(tx: Tx) -> tuple[int, list[tuple[str, int]]]:
            domain_id = int(await tx.fetchval(
                "INSERT INTO domains(name, selector, algorithm, private_key, ed25519_selector,"
                " ed25519_key, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING id",
                new.name, new.selector, new.algorithm, self._sealed(new.private_key),
                new.ed25519_selector, self._sealed(new.ed25519_key), new.created_at))
            return domain_id, [("domain", domain_id)]
        try:
            return await self._write(add, audit)
        except UniqueViolation as exc:
            if exc.constraint == "domains_live_name":
                raise DomainExists(new.name) from None
            raise

    def _sealed(self, key: bytes | None) -> bytes | None:
        return self._seal(key) if key is not None else None

    async def delete_domain(self, domain_id: int, now: float,
                            audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        async def delete(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            await tx.execute("UPDATE domains SET deleted_at=$1, private_key=NULL,"
                             " ed25519_key=NULL WHERE id=$2", now, domain_id)
            await tx.execute("DELETE FROM domain_webhooks WHERE domain_id=$1", domain_id)
            await self._cancel_pending(tx, domain_id, now)
            ids = await tx.fetch(
                "UPDATE accounts SET status='disabled', disabled_reason='domain_deleted',"
                " old_password_hash=NULL, old_password_expires=NULL"
                " WHERE domain_id=$1 AND status != 'deleted' RETURNING id", domain_id)
            return None, [("domain", domain_id), *(("account", int(r[0])) for r in ids)]
        await self._write(delete, audit)

    async def set_check_header_from(self, domain_id: int, on: bool,
                                    audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        async def update(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            await tx.execute("UPDATE domains SET check_header_from=$2 WHERE id=$1",
                             domain_id, on)
            return None, [("domain", domain_id)]
        await self._write(update, audit)

    async def add_account(self, new: NewAccount, check: BindingCheck,
                          slots: int | None = None,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> int:
        async def add(tx: Tx) -> tuple[int, list[tuple[str, int]]]:
            if slots is not None:
                used = int(await tx.fetchval(
                    "SELECT count(*) FROM accounts WHERE status != 'deleted'"))
                if used >= slots:
                    raise PlanFull(used)
            check(await _bindings(tx, None))
            acct_id = int(await tx.fetchval(
                "INSERT INTO accounts(username, domain_id, password_hash, status, created_at,"
                " label) VALUES ($1,$2,$3,'active',$4,$5) RETURNING id", new.username,
                new.domain_id, new.password_hash, new.created_at, new.label))
            await tx.executemany("INSERT INTO account_networks(account_id, cidr) VALUES ($1,$2)",
                                 [(acct_id, n) for n in new.networks])
            return acct_id, [("account", acct_id)]
        return await self._write(add, audit)

    async def _update(self, account_id: int, sql: str, *values: Any,
                      audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        async def update(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            await tx.execute(sql, account_id, *values)
            return None, [("account", account_id)]
        await self._write(update, audit)

    async def set_status(self, account_id: int, status: str, reason: str,
                         audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, _SET_STATUS, status, reason, audit=audit)

    async def set_password(self, account_id: int, password_hash: str,
                           old_hash: str | None = None, old_expires: float | None = None,
                           audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, _SET_HASHES, password_hash, old_hash, old_expires,
                           audit=audit)

    async def set_limits(self, account_id: int, per_minute: int | None, per_hour: int | None,
                         per_day: int | None, audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, "UPDATE accounts SET per_minute=$2, per_hour=$3,"
                           " per_day=$4 WHERE id=$1", per_minute, per_hour, per_day,
                           audit=audit)

    async def set_label(self, account_id: int, label: str,
                        audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, "UPDATE accounts SET label=$2 WHERE id=$1", label,
                           audit=audit)

    async def add_network(self, account_id: int, cidr: str, check: BindingCheck,
                          audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        async def add(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            check(await _bindings(tx, account_id))
            await tx.execute("INSERT INTO account_networks(account_id, cidr) VALUES ($1,$2)",
                             account_id, cidr)
            return None, [("account", account_id)]
        await self._write(add, audit)

    async def remove_network(self, account_id: int, cidr: str,
                             audit: Sequence[AuditEntry] = NO_AUDIT) -> None:
        await self._update(account_id, "DELETE FROM account_networks WHERE account_id=$1"
                           " AND cidr=$2", cidr, audit=audit)

    async def audit_entries(self, *, account: str | None = None, domain: str | None = None,
                            since: float | None = None, limit: int = 100
                            ) -> list[AuditEntry]:
        where, params = audit_filter(account, domain, since, "$")
        rows = await self._db.fetch(
            AUDIT_COLUMNS + where
            + f" ORDER BY at DESC, id DESC LIMIT ${len(params) + 1}", *params, limit)
        return [audit_entry(r) for r in rows]

    async def delete_account(self, account_id: int, now: float, purge_queue: bool,
                             audit: Sequence[AuditEntry] = NO_AUDIT) -> list[int]:
        """Delete the account cluster-wide; each node purges its own spool when it applies
        the change (the caller has asked every node for its count first)."""
        async def delete(tx: Tx) -> tuple[list[int], list[tuple[str, int]]]:
            await tx.execute(
                "UPDATE accounts SET status='deleted', password_hash=NULL, deleted_at=$2,"
                " old_password_hash=NULL, old_password_expires=NULL,"
                " total_sent=0, last_connection=NULL, per_minute=NULL, per_hour=NULL,"
                " per_day=NULL WHERE id=$1", account_id, now)
            await tx.execute("DELETE FROM account_networks WHERE account_id=$1", account_id)
            return [], [("account", account_id)]
        return await self._write(delete, audit)

    async def save_last_connections(self, changed: Sequence[tuple[float | None, int]]) -> None:
        """Merge: a node's time replaces the stored one only if it is later."""
        await self._db.transaction(lambda tx: tx.executemany(
            "UPDATE accounts SET last_connection = GREATEST(last_connection, $1)"
            " WHERE id=$2", list(changed)))

    async def add_sent(self, deltas: Sequence[tuple[int, int]]) -> None:
        """Add ``(messages delivered, account id)`` pairs to the accounts' totals (each node
        adds what it delivered since its last call: the stored total is the sum)."""
        await self._db.transaction(lambda tx: tx.executemany(
            "UPDATE accounts SET total_sent = total_sent + $1 WHERE id=$2 AND"
            " status != 'deleted'", list(deltas)))

    async def stats(self) -> list[tuple[int, int, float | None]]:
        """``(account id, total sent, last connection)`` of every account not deleted."""
        rows = await self._db.fetch("SELECT id, total_sent, last_connection FROM accounts"
                                    " WHERE status != 'deleted'")
        return [(int(r[0]), int(r[1]), None if r[2] is None else float(r[2])) for r in rows]

    # -- queue probes: how much mail of an account each node holds ----------------------
    async def probe(self, account_id: int) -> int:
        """Ask every node for its count of ``account_id``'s messages; the probe's version."""
        async def ask(tx: Tx) -> tuple[None, list[tuple[str, int]]]:
            return None, [("probe", account_id)]
        await self._write(ask)
        return self.written

    async def answer_probe(self, version: int, account_id: int, count: int) -> None:
        await self._db.execute(
            "INSERT INTO queue_probes(version, node, account_id, count) VALUES ($1,$2,$3,$4)"
            " ON CONFLICT (version, node) DO UPDATE SET count = EXCLUDED.count",
            version, self.node, account_id, count)

    async def probe_answers(self, version: int) -> dict[str, int]:
        rows = await self._db.fetch("SELECT node, count FROM queue_probes WHERE version=$1",
                                    version)
        return {str(r[0]): int(r[1]) for r in rows}

    # -- sending-limit quota: units leased to the nodes -----------------------------------
    async def lease(self, account_id: int, windows: Sequence[Window], want: int) -> list[Grant]:
        """Lease units of ``account_id``'s windows so that this node may send up to ``want``
        more messages; never more, across every node, than a window's limit.

        One transaction: the rows are created if missing and locked in period order
        (the same order for every node), the grant is computed from their counts
        (``lease_sizes``) and added to them."""
        ordered = sorted(windows, key=lambda w: w.period)

        async def run(tx: Tx) -> list[Grant]:
            await tx.executemany(
                "INSERT INTO quota(account_id, period, window_start, granted)"
                " VALUES ($1,$2,$3,0) ON CONFLICT DO NOTHING",
                [(account_id, w.period, w.start) for w in ordered])
            counts = []
            for w in ordered:
                counts.append(int(await tx.fetchval(
                    "SELECT granted FROM quota WHERE account_id=$1 AND period=$2"
                    " AND window_start=$3 FOR UPDATE", account_id, w.period, w.start)))
            sizes = lease_sizes(ordered, counts, want)
            grants = []
            for w, count, n in zip(ordered, counts, sizes, strict=True):
                if n:
                    await tx.execute(
                        "UPDATE quota SET granted = granted + $4 WHERE account_id=$1"
                        " AND period=$2 AND window_start=$3", account_id, w.period, w.start, n)
                grants.append(Grant(w.period, w.start, n, max(0, w.limit - count - n)))
            return grants
        return await self._db.transaction(run)

    async def prune_quota(self, ended_before: float) -> None:
        """Forget the quota of windows that ended before ``ended_before``."""
        await self._db.execute("DELETE FROM quota WHERE window_start + period < $1",
                               int(ended_before))

    # -- the node registry --------------------------------------------------------------
    async def register(self, address: str, applied: int) -> None:
        """Insert or refresh this node's row (at start, and after it was forgotten)."""
        await self._db.execute(
            "INSERT INTO nodes(name, address, applied_version, heartbeat, started_at, fenced)"
            " VALUES ($1,$2,$3,now(),now(),false) ON CONFLICT (name) DO UPDATE SET"
            " address=EXCLUDED.address, applied_version=EXCLUDED.applied_version,"
            " heartbeat=now(), started_at=now(), fenced=false", self.node, address, applied)

    async def heartbeat(self, applied: int, queue_depth: int, fenced: bool,
                        within: float) -> bool:
        """Record this node alive (database clock); False if its row was forgotten.
        (Not waiting for the disk: a heartbeat lost in a crash of the database is
        rewritten a heartbeat later.)"""
        row = await self._db.fetchval_light(
            "UPDATE nodes SET heartbeat=now(), applied_version=GREATEST(applied_version, $2),"
            " queue_depth=$3, fenced=$4 WHERE name=$1 RETURNING 1",
            self.node, applied, queue_depth, fenced, within=within)
        return row is not None

    async def leave(self) -> None:
        """A clean stop: this node is gone at once (nobody waits for it)."""
        await self._db.execute("UPDATE nodes SET heartbeat = now() - interval '1 day'"
                               " WHERE name=$1", self.node, within=2.0)

    async def applied(self, version: int) -> None:
        """Record this node's applied version and wake the callers waiting for it: one
        statement, not waiting for the disk (lost in a crash of the database, the node
        only looks behind until its next heartbeat writes it again)."""
        await self._db.execute_light(
            "WITH done AS (UPDATE nodes SET applied_version=GREATEST(applied_version, $2)"
            " WHERE name=$1 RETURNING 1) SELECT pg_notify($3, $4) FROM done",
            self.node, version, ACK_CHANNEL, f"{self.node} {version}")

    async def nodes(self, gone_seconds: float) -> list[NodeRow]:
        rows = await self._db.fetch(
            f"SELECT name, address, applied_version,"  # noqa: S608 - _LIVE is a literal
            f" extract(epoch FROM now() - heartbeat), {_LIVE}, fenced, queue_depth"
            " FROM nodes ORDER BY name", gone_seconds)
        return [NodeRow(r[0], r[1], int(r[2]), max(0.0, float(r[3])), bool(r[4]), bool(r[5]),
                        int(r[6])) for r in rows]

    async def forget(self, name: str, gone_seconds: float) -> str:
        """Remove a node that is gone: 'forgotten', 'live' (refused) or 'unknown'."""
        async def run(tx: Tx) -> str:
            row = await tx.fetchrow(
                f"SELECT {_LIVE} FROM nodes WHERE name=$2 FOR UPDATE",  # noqa: S608
                gone_seconds, name)
            if row is None:
                return "unknown"
            if row[0]:
                return "live"
            await tx.execute("DELETE FROM nodes WHERE name=$1", name)
            return "forgotten"
        return await self._db.transaction(run)


def _account(r: Any, networks: list[str]) -> AccountRecord:
    return AccountRecord(int(r[0]), r[1], int(r[2]), r[3], r[4], r[5], float(r[6]),
                         None if r[7] is None else float(r[7]), int(r[8]), r[9], r[10], r[11],
                         networks=networks, old_password_hash=r[12],
                         old_password_expires=None if r[13] is None else float(r[13]),
                         label=r[14])


async def _bindings(tx: Tx, exclude_account: int | None) -> list[NetworkBinding]:
    """The networks bound to accounts that are not deleted, but ``exclude_account``'s."""
    rows = await tx.fetch(
        "SELECT n.cidr, a.username, d.name FROM account_networks n"
        " JOIN accounts a ON a.id = n.account_id JOIN domains d ON d.id = a.domain_id"
        " WHERE a.status != 'deleted' AND n.account_id IS DISTINCT FROM $1", exclude_account)
    return [NetworkBinding(str(r[0]), r[1], r[2]) for r in rows]
