"""The message queue tables as statements: what the spool's named queue methods run.

Owns: the SQL of the send and retry queues outside the group commit's hot
path — start-up loading, the leases of retries, reconciliation, ``queue
list``/``status`` counts, ``log --status queued``, purges (with the recipients they
remove, for their ``purged`` log rows), the operator's hold and release of one message
(``messages.held``: a held message is neither fetched as due nor put back by the
reconciliation) and ``queue retry``
— as the statements the reader runs (``*_SQL`` and the like, with the
function that turns their rows into records)
and the functions the writer's thread runs inside a group transaction (each
takes the connection first). Callers outside relayd/store use
:class:`relayd.store.spool.Spool`'s methods, never these.
See also: relayd.store.spool, relayd.store.records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from relayd.store.db import SqlConn
from relayd.store.records import DeferredMessage, PendingRecipient, StoredMessage

PENDING_MESSAGES_SQL = ("SELECT id, account_id, username, domain, sender, received_at, size,"
                        " is_bounce, held FROM messages ORDER BY id")
PENDING_RECIPIENTS_SQL = ("SELECT message_id, idx, rcpt, status, attempts, next_attempt,"
                          " last_code, last_error FROM recipients"
                          " WHERE status IN ('queued','deferred') ORDER BY message_id, idx")
QUEUED_COUNT_SQL = "SELECT COUNT(DISTINCT message_id) FROM recipients WHERE status='queued'"
DEFERRED_COUNT_SQL = ("SELECT COUNT(DISTINCT message_id) FROM recipients"
                      " WHERE status='deferred'")
MESSAGE_COUNT_SQL = "SELECT COUNT(*) FROM messages WHERE account_id=?"
OWNER_SQL = "SELECT account_id, held FROM messages WHERE id=?"
HELD_OF_ACCOUNT_SQL = "SELECT id FROM messages WHERE account_id=? AND held IS NOT NULL"
ORPHANS_SQL = ("SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
               " WHERE r.message_id = m.id AND r.status IN ('queued','deferred'))")
#: The earliest retry of a message not held, through the index ``recipients_due`` (held
#: ones, rare, are stepped over).
NEXT_RETRY_SQL = ("SELECT r.next_attempt FROM recipients r JOIN messages m ON m.id=r.message_id"
                  " WHERE r.status='deferred' AND r.next_attempt IS NOT NULL AND m.held IS NULL"
                  " ORDER BY r.next_attempt LIMIT 1")
#: Due retries, oldest due first; read through the index ``recipients_due``.
DUE_SQL = ("SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id, m.username,"
           " m.domain, m.sender, m.received_at, m.size, m.is_bounce FROM recipients r"
           " JOIN messages m ON m.id = r.message_id"
           " WHERE r.status='deferred' AND r.next_attempt <= ? AND m.held IS NULL"
           " ORDER BY r.next_attempt LIMIT ?")
_DEFERRED_LIST = ("SELECT m.id, m.username, m.sender, m.received_at, MAX(r.attempts),"
                  " MIN(r.next_attempt), group_concat(r.rcpt, char(10)),"
                  " MAX(r.last_error), m.size, m.held FROM recipients r JOIN messages m"
                  " ON m.id = r.message_id WHERE r.status='deferred'")
DEFERRED_LIST_SQL = _DEFERRED_LIST + " GROUP BY m.id ORDER BY m.id LIMIT 10000"
DEFERRED_LIST_OF_ACCOUNT_SQL = (_DEFERRED_LIST + " AND m.account_id=?"
                                " GROUP BY m.id ORDER BY m.id LIMIT 10000")

#: Never-attempted recipients with their message's columns (``queued_messages``),
#: through the index ``recipients_queued``; followed by ``IN (...)``.
QUEUED_ROWS_SQL = ("SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id, m.username,"
                   " m.domain, m.sender, m.received_at, m.size, m.is_bounce, m.held"
                   " FROM recipients r JOIN messages m ON m.id = r.message_id"
                   " WHERE r.status='queued' AND r.message_id")
QUEUED_ALL_SQL = ("SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id, m.username,"
                  " m.domain, m.sender, m.received_at, m.size, m.is_bounce, m.held"
                  " FROM recipients r JOIN messages m ON m.id = r.message_id"
                  " WHERE r.status='queued' AND r.message_id IN (SELECT DISTINCT message_id"
                  " FROM recipients WHERE status='queued' ORDER BY message_id LIMIT ?)"
                  " ORDER BY r.message_id, r.idx")
QUEUED_OF_ACCOUNT_SQL = ("SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id,"
                         " m.username, m.domain, m.sender, m.received_at, m.size, m.is_bounce,"
                         " m.held FROM recipients r JOIN messages m ON m.id = r.message_id"
                         " WHERE r.status='queued' AND r.message_id IN (SELECT DISTINCT"
                         " q.message_id FROM recipients q JOIN messages a ON a.id = q.message_id"
                         " WHERE q.status='queued' AND a.account_id=? ORDER BY q.message_id"
                         " LIMIT ?) ORDER BY r.message_id, r.idx")


# -- rows into records -----------------------------------------------------------------
def queued_entries_sql(by_user: bool, since: bool, by_message: bool = False,
                       kinds: bool = False) -> str:
    """``relayctl log --status queued``: each recipient never attempted yet as a row
    shaped like a delivery-log entry, newest first (with its kind, if ``kinds``); bound
    values: the username (if ``by_user``), the earliest reception time (if ``since``),
    the message id (if ``by_message``), the limit."""
    where = (" AND m.username=?" if by_user else "") + (" AND m.received_at>=?" if since else "")
    where += " AND m.id=?" if by_message else ""
    kind = ", CASE WHEN m.is_bounce THEN 'bounce' ELSE 'message' END" if kinds else ""
    return ("SELECT m.received_at, m.id, m.username, m.domain, r.rcpt, '', NULL, '',"  # noqa: S608
            f" 'queued'{kind} FROM recipients r JOIN messages m ON m.id=r.message_id"
            f" WHERE r.status='queued'{where} ORDER BY m.received_at DESC LIMIT ?")


def pending(messages: Iterable[Any], recipients: Iterable[Any]) -> list[StoredMessage]:
    """The rows of PENDING_MESSAGES_SQL and PENDING_RECIPIENTS_SQL, joined."""
    msgs: dict[int, StoredMessage] = {}
    for row in messages:
        msgs[row[0]] = StoredMessage(row[0], row[1], row[2], row[3], row[4], row[5],
                                     row[6], bool(row[7]), held=row[8])
    for row in recipients:
        m = msgs.get(row[0])
        if m is not None:
            m.recipients.append(PendingRecipient(row[1], row[2], row[3], row[4], row[5],
                                                 row[6], row[7]))
    return list(msgs.values())


def grouped(rows: Iterable[Any], status: str) -> list[StoredMessage]:
    """Rows of the QUEUED_* and DUE statements: one record per message, in first-seen order."""
    msgs: dict[int, StoredMessage] = {}
    for r in rows:
        m = msgs.get(r[0])
        if m is None:
            m = msgs[r[0]] = StoredMessage(r[0], r[4], r[5], r[6], r[7], r[8], r[9],
                                           bool(r[10]), held=r[11] if len(r) > 11 else None)
        m.recipients.append(PendingRecipient(r[1], r[2], status, r[3], None, None, None))
    return list(msgs.values())


def deferred(rows: Iterable[Any]) -> list[DeferredMessage]:
    """Rows of DEFERRED_LIST_SQL."""
    return [DeferredMessage(id=r[0], username=r[1], sender=r[2], received_at=r[3],
                            attempts=r[4], next_attempt=r[5],
                            recipients=(r[6] or "").split("\n"), last_error=r[7], size=r[8],
                            held=r[9])
            for r in rows]


# -- writes, on the writer's thread inside a group transaction ---------------------------
def release_all_leases(conn: SqlConn, now: float) -> None:
    """Recipients leased by a retry that a crash interrupted: due now, not at lease end."""
    conn.execute("UPDATE recipients SET next_attempt=?, leased=0"
                 " WHERE leased=1 AND status='deferred'", (now,))


def defer_queued(conn: SqlConn, message_ids: Sequence[int], now: float) -> None:
    """The never-attempted recipients of ``message_ids`` join the retry queue, due ``now``."""
    conn.executemany(
        "UPDATE recipients SET status='deferred', next_attempt=? WHERE message_id=?"
        " AND status='queued'", [(now, m) for m in message_ids])


def lease(conn: SqlConn, recipients: Sequence[tuple[int, int]], until: float) -> None:
    """Lease deferred recipients ``(message id, idx)`` to a worker until ``until``."""
    conn.executemany(
        "UPDATE recipients SET next_attempt=?, leased=1 WHERE message_id=? AND"
        " idx=? AND status='deferred'", [(until, m, i) for m, i in recipients])


def reconcile(conn: SqlConn, release: Sequence[int], now: float, probe: bool) -> list[int]:
    """See Spool.reconcile_ids."""
    if release:
        conn.executemany(
            "UPDATE recipients SET next_attempt=?, leased=0 WHERE message_id=?"
            " AND status='deferred' AND leased=1", [(now, m) for m in release])
    if probe:
        conn.execute("INSERT OR REPLACE INTO meta(key, value)"
                     " VALUES ('reconciled_at', ?)", (repr(now),))
    rows = conn.execute("SELECT DISTINCT r.message_id FROM recipients r JOIN messages m"
                        " ON m.id=r.message_id WHERE r.status='queued' AND m.held IS NULL"
                        ).fetchall()
    return [int(r[0]) for r in rows]


def count_of_account(conn: SqlConn, account_id: int) -> int:
    """The messages an account has stored (in the open transaction)."""
    row = conn.execute(MESSAGE_COUNT_SQL, (account_id,)).fetchone()
    return int(row[0]) if row else 0


#: A recipient removed before it was final: ``(message id, idx, recipient, account id,
#: username, domain, is_bounce)``, what its ``purged`` delivery-log row is made from.
PurgedRow = tuple[int, int, str, int, str, str, int]


def purge_account(conn: SqlConn, account_id: int, status: str | None,
                  purged: list[PurgedRow] | None = None) -> list[int]:
    """Delete an account's messages (all, or those with a recipient in ``status``, not
    held by the operator); their pending recipients are added to ``purged``."""
    if status is None:
        rows = conn.execute("SELECT id FROM messages WHERE account_id=?",
                            (account_id,)).fetchall()
    else:
        rows = conn.execute(
            "SELECT DISTINCT m.id FROM messages m JOIN recipients r ON r.message_id=m.id"
            " WHERE m.account_id=? AND r.status=? AND m.held IS NULL",
            (account_id, status)).fetchall()
    ids = [int(r[0]) for r in rows]
    purge_ids(conn, ids, purged)
    return ids


def purge_ids(conn: SqlConn, ids: Sequence[int], purged: list[PurgedRow] | None = None) -> int:
    """Delete these messages with their recipients; how many existed. Their recipients
    not yet final are added to ``purged`` (when given)."""
    if not ids:
        return 0
    if purged is not None:
        for i in ids:
            purged.extend(conn.execute(
                "SELECT r.message_id, r.idx, r.rcpt, m.account_id, m.username, m.domain,"
                " m.is_bounce FROM recipients r JOIN messages m ON m.id=r.message_id"
                " WHERE r.message_id=? AND r.status IN ('queued','deferred') ORDER BY r.idx",
                (i,)).fetchall())
    conn.executemany("DELETE FROM recipients WHERE message_id=?", [(i,) for i in ids])
    cur = conn.executemany("DELETE FROM messages WHERE id=?", [(i,) for i in ids])
    return int(cur.rowcount)


def message_owner(conn: SqlConn, message_id: int) -> tuple[int, str | None] | None:
    """``(account id, held)`` of a stored message, None if there is none."""
    row = conn.execute(OWNER_SQL, (message_id,)).fetchone()
    return (int(row[0]), row[1]) if row else None


def hold(conn: SqlConn, message_id: int, by: str) -> tuple[int, str | None] | None:
    """Hold a message (``held`` = ``by``, unless held already); ``(account id, held
    before)``, None if no such message."""
    owner = message_owner(conn, message_id)
    if owner is not None and owner[1] is None:
        conn.execute("UPDATE messages SET held=? WHERE id=?", (by, message_id))
    return owner


def release(conn: SqlConn, message_id: int, now: float,
            retrying: bool) -> tuple[int, str | None] | None:
    """Release a held message; its deferred recipients are due ``now`` (unless a retry of
    it is running: ``retrying``, whose results set them); ``(account id, held before)``,
    None if no such message."""
    owner = message_owner(conn, message_id)
    if owner is not None and owner[1] is not None:
        conn.execute("UPDATE messages SET held=NULL WHERE id=?", (message_id,))
        if not retrying:
            conn.execute("UPDATE recipients SET next_attempt=?, leased=0 WHERE message_id=?"
                         " AND status='deferred'", (now, message_id))
    return owner


def retry_now(conn: SqlConn, now: float, account_id: int | None) -> int:
    """Deferred recipients (all, or one account's) due ``now``, those of held messages
    not; how many."""
    if account_id is None:
        cur = conn.execute("UPDATE recipients SET next_attempt=? WHERE status='deferred' AND"
                           " message_id NOT IN (SELECT id FROM messages WHERE held IS NOT NULL)",
                           (now,))
    else:
        cur = conn.execute(
            "UPDATE recipients SET next_attempt=? WHERE status='deferred' AND"
            " message_id IN (SELECT id FROM messages WHERE account_id=? AND held IS NULL)",
            (now, account_id))
    return int(cur.rowcount)
