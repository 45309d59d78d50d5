"""The spool database's schema: its migrations, applied in order at start.

Owns: :data:`MIGRATIONS` (one SQL script per schema version) and
:data:`SCHEMA_VERSION`; :func:`pending` says which steps a database needs (and
refuses one newer than this relayd), :func:`apply` runs one step in its own
transaction. Step 5 drops the old delivery log table, whose rows the spool
has moved to the log file first (:func:`holds_old_log`, relayd.store.deliverylog);
step 7 adds the operator's hold of one message (``messages.held``); step 8 the
password kept by ``reset-password --keep-old`` (``accounts.old_password_*``); step 9
the webhooks of domains and the events waiting to be posted; step 10 the DKIM
selectors of a key rotation (pending, retired, cancelled); step 11 the suppression
list; step 12 the audit trail (``audit``) and the account's ``label``.
See also: relayd.store.spool (opens the database and runs the steps).
"""

from __future__ import annotations

from relayd.store.db import SpoolError, SqlConn

SCHEMA_VERSION = 12
#: The step that drops the old delivery_log table (its rows are moved out first).
LOG_MOVED = 5

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE domains (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        selector TEXT NOT NULL UNIQUE,
        algorithm TEXT NOT NULL,
        private_key BLOB,
        ed25519_selector TEXT,
        ed25519_key BLOB,
        created_at REAL NOT NULL,
        deleted_at REAL
    );
    CREATE UNIQUE INDEX domains_live_name ON domains(name) WHERE deleted_at IS NULL;
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        domain_id INTEGER NOT NULL REFERENCES domains(id),
        password_hash TEXT,
        status TEXT NOT NULL,
        disabled_reason TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        last_connection REAL,
        total_sent INTEGER NOT NULL DEFAULT 0,
        per_minute INTEGER,
        per_hour INTEGER,
        per_day INTEGER,
        deleted_at REAL
    );
    CREATE TABLE account_networks (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        cidr TEXT NOT NULL,
        PRIMARY KEY (account_id, cidr)
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL,
        username TEXT NOT NULL,
        domain TEXT NOT NULL,
        sender TEXT NOT NULL,
        received_at REAL NOT NULL,
        size INTEGER NOT NULL,
        is_bounce INTEGER NOT NULL DEFAULT 0,
        data BLOB NOT NULL
    );
    CREATE INDEX messages_account ON messages(account_id);
    CREATE TABLE recipients (
        message_id INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        rcpt TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL,
        last_code INTEGER,
        last_error TEXT,
        PRIMARY KEY (message_id, idx)
    ) WITHOUT ROWID;
    CREATE INDEX recipients_due ON recipients(next_attempt) WHERE status = 'deferred';
    CREATE TABLE delivery_log (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        message_id INTEGER NOT NULL,
        username TEXT NOT NULL,
        domain TEXT NOT NULL,
        recipient TEXT NOT NULL,
        next_hop TEXT NOT NULL,
        code INTEGER,
        text TEXT NOT NULL,
        outcome TEXT NOT NULL
    );
    CREATE INDEX delivery_log_user_ts ON delivery_log(username, ts);
    CREATE INDEX delivery_log_ts ON delivery_log(ts);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    """,
    # A deferred recipient handed to a delivery worker by the retry loop is
    # *leased*: its next_attempt is pushed ahead so it is not fetched twice.
    # The marker tells a lease from real backoff, so a restart after a crash
    # makes leased recipients due at once (Scheduler.start).
    2: """
    ALTER TABLE recipients ADD COLUMN leased INTEGER NOT NULL DEFAULT 0;
    """,
    # Data in a file of its own (``data`` is empty): see _Bodies.
    3: """
    ALTER TABLE messages ADD COLUMN external INTEGER NOT NULL DEFAULT 0;
    """,
    # Recipients never attempted yet (the send queue as the database sees it):
    # what the scheduler's reconciliation, ``status`` and ``queue list`` read.
    4: """
    CREATE INDEX recipients_queued ON recipients(message_id) WHERE status = 'queued';
    """,
    # The delivery log moved to a file of its own; its rows are copied there first
    # (Spool(move_log=...), see Spool._migrate).
    5: """
    DROP INDEX delivery_log_user_ts;
    DROP INDEX delivery_log_ts;
    DROP TABLE delivery_log;
    """,
    # Per domain: is the header From (and Sender) checked against it (on for every
    # domain, old ones included).
    6: """
    ALTER TABLE domains ADD COLUMN check_header_from INTEGER NOT NULL DEFAULT 1;
    """,
    # ``relayctl queue hold ID``: a message the operator held is not attempted (first
    # attempt or retry) until ``queue release``; NULL: not held, else who held it
    # ('operator'). A held message stays held across restarts.
    7: """
    ALTER TABLE messages ADD COLUMN held TEXT;
    """,
    # ``reset-password --keep-old``: the previous password's hash keeps working until
    # its expiry (POSIX seconds); NULL: no old password kept.
    8: """
    ALTER TABLE accounts ADD COLUMN old_password_hash TEXT;
    ALTER TABLE accounts ADD COLUMN old_password_expires REAL;
    """,
    # Delivery events for applications (relayd.store.hookevents): a domain's webhook
    # (single node: the directory is here; a cluster keeps it in PostgreSQL) and the
    # events waiting to be posted, written with the outcome they report. Every node
    # keeps its own events, in its own spool.
    9: """
    CREATE TABLE domain_webhooks (
        domain_id INTEGER PRIMARY KEY,
        url TEXT NOT NULL,
        secret TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE webhook_events (
        id INTEGER PRIMARY KEY,
        domain TEXT NOT NULL,
        body BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_error TEXT
    );
    CREATE INDEX webhook_events_due ON webhook_events(next_attempt);
    CREATE INDEX webhook_events_domain ON webhook_events(domain);
    """,
    # DKIM key rotation: a domain's pending key(s) (``relayctl domain rotate-key``) and the
    # selectors it no longer uses (retired by --activate, or dropped by --cancel: never
    # drawn again). The active keys stay in ``domains``.
    10: """
    CREATE TABLE dkim_selectors (
        selector TEXT PRIMARY KEY,
        domain_id INTEGER NOT NULL REFERENCES domains(id),
        slot TEXT NOT NULL,
        state TEXT NOT NULL,
        private_key BLOB,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX dkim_selectors_domain ON dkim_selectors(domain_id);
    """,
    # The suppression list: per domain, recipients a next hop refused for good as not
    # existing (``address``: domain part lower-cased), the reply and its time (``since``).
    11: """
    CREATE TABLE suppressions (
        domain_id INTEGER NOT NULL,
        address TEXT NOT NULL,
        reason TEXT NOT NULL,
        since REAL NOT NULL,
        PRIMARY KEY (domain_id, address)
    ) WITHOUT ROWID;
    """,
    # The audit trail of accounts and domains (who changed what, when; kept after the
    # account or domain is deleted: no foreign key, by name) and the account's label.
    12: """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        domain TEXT NOT NULL DEFAULT '',
        action TEXT NOT NULL,
        uid INTEGER,
        node TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        details TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_subject ON audit(kind, subject, at);
    CREATE INDEX audit_domain ON audit(domain, at);
    CREATE INDEX audit_at ON audit(at);
    ALTER TABLE accounts ADD COLUMN label TEXT NOT NULL DEFAULT '';
    """,
}


def pending(conn: SqlConn) -> list[int]:
    """On the writer's thread: the migrations above the stored ``user_version``, in order."""
    row = conn.execute("PRAGMA user_version").fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise SpoolError(
            f"spool schema version {version} is newer than this relayd ({SCHEMA_VERSION});"
            " run the relayd version that wrote it, or restore a backup made by this one"
        )
    return list(range(version + 1, SCHEMA_VERSION + 1))


def apply(conn: SqlConn, target: int) -> None:
    """On the writer's thread: migration ``target`` in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in _split_sql(MIGRATIONS[target]):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={target}")
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise


def holds_old_log(conn: SqlConn) -> bool:
    """Whether the old delivery_log table (schema 1 to 4) has rows (to move before step 5)."""
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM delivery_log)").fetchone()
    return bool(row and row[0])


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
