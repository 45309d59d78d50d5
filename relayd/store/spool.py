"""The message spool: accepted mail, its recipients and delivery results, group-committed.

Owns: :class:`Spool`, the facade the rest of relayd uses for messages — open
(checks, migrations, id seeding), close, *group commit* and the named queue
methods (start-up loading, retries and their leases, reconciliation, counts,
purges, whose removed recipients are logged ``purged``, the operator's hold,
release and delete of one message). Every write — accepted messages, delivery results, lifecycle
changes — goes through one writer task that takes all the operations waiting
at that moment, applies them in one transaction on the writer's thread and
commits once. A session's ``accept`` returns only after the commit that
contains its message, so a ``250`` is never sent for mail that is not on
disk; the message's hand-over to the scheduler (``then``) runs at that
commit, whatever became of the session meanwhile. The never-attempted
recipients have an index of their own (``recipients_queued``) for the
scheduler's reconciliation with the database and for ``status`` and ``queue list``.

Two connections (relayd.store.db.Conn, each on its own thread): the writer
(one transaction at a time, WAL, ``synchronous=FULL``) and a reader for
queries (WAL lets it read while the writer commits). Large message data lives
in files beside the database (relayd.store.bodies).

The delivery log has a file of its own (relayd.store.deliverylog): the
results of each committed batch are handed to ``on_results``.

Untrusted input: message data and addresses (stored as given, always through
bound parameters). Settings read: [spool], the database path.
See also: relayd.store.messages (the queue statements), relayd.store.directory,
relayd.queue.scheduler, relayd.controlplane.lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from relayd.store import messages as q
from relayd.store import schema
from relayd.store.bodies import EXTERNAL_MIN, Bodies, read_data
from relayd.store.db import (
    Conn,
    DatabaseError,
    DbError,
    SpoolError,
    SqlConn,
    check_files,
    chunks,
    delete_in,
    in_sql,
    insert_rows,
    unusable,
)
from relayd.store.hookevents import EventSink
from relayd.store.records import (
    AttemptResult,
    DeferredMessage,
    IdAllocator,
    NewMessage,
    StoredMessage,
)

T = TypeVar("T")

__all__ = ["EXTERNAL_MIN", "AttemptResult", "DbError", "IdAllocator", "NewMessage", "Spool",
           "SpoolError", "StoredMessage", "unusable"]


@dataclass(slots=True)
class _Op:
    kind: str  # accept | record | call | purge
    payload: Any
    future: asyncio.Future[Any]
    then: Callable[[Any], None] | None = None  # an accept's hand-over, run at its commit


class Spool:
    """The SQLite spool with a group-committing writer."""

    def __init__(self, path: str, *, batch_max: int = 256,
                 on_batch: Callable[[int], None] | None = None,
                 move_log: Callable[[str], Awaitable[int]] | None = None) -> None:
        self.path = path
        self._move_log = move_log
        self._batch_max = batch_max
        self._on_batch = on_batch
        self._w: Conn | None = None
        self._r: Conn | None = None
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self.ids = IdAllocator()
        self.bodies = Bodies(os.path.splitext(path)[0] + ".bodies")
        #: Called on the loop after a group commit failed (the scheduler reconciles).
        self.on_commit_failed: Callable[[], None] | None = None
        #: Called on the loop with the delivery results of each commit (the delivery log),
        #: and with the ``purged`` rows of recipients an operator removed.
        self.on_results: Callable[[list[AttemptResult]], None] | None = None
        #: Called on the loop with how many recipients a purge removed (a metric).
        self.on_purged: Callable[[int], None] | None = None
        #: Webhook events written with the results they report (relayd.store.hookevents).
        self.hooks = EventSink()

    # -- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        """Open (creating or migrating) the database, check it, and start the writer.

        Refused with a :class:`SpoolError` that says what is wrong and what to
        do (see :func:`unusable`): a 0-byte database file (a truncated spool is
        never silently replaced by an empty one), a file relayd cannot write,
        damaged pages (``PRAGMA quick_check`` reads every page at start: about
        0.1 s per 100 MB), a newer schema, a lock held by another process.
        """
        try:
            check_files(self.path)
            self._w = await Conn.open(self.path, busy_timeout=5.0)
            await self._w.run(_prepare_writer, self._w.raw)
            await self._migrate()
            try:
                await self._w.run(self.bodies.open, self._w.raw)
            except OSError as exc:
                raise SpoolError(f"cannot use {self.bodies.dir}: {exc.strerror or exc}") from None
            self._r = await Conn.open(self.path, busy_timeout=5.0)
            await self._r.execute("PRAGMA query_only=ON")
            for floor in await self._w.run(_stored_id_floors, self._w.raw):
                self.ids.seed(floor)
        except DbError as exc:
            await self._close_connections()
            raise unusable(self.path, exc) from None
        except SpoolError:
            await self._close_connections()  # else the connections' threads outlive the loop
            raise
        self._writer_task = asyncio.get_running_loop().create_task(self._writer())

    async def _migrate(self) -> None:
        """Every migration above the stored schema version, each in its own transaction;
        before the one that drops it (5), the old delivery_log table's rows go to the log
        file (``move_log``)."""
        assert self._w is not None
        for target in await self._w.run(schema.pending, self._w.raw):
            if target == schema.LOG_MOVED and await self._w.run(schema.holds_old_log,
                                                                  self._w.raw):
                if self._move_log is None:
                    raise SpoolError(f"spool {self.path} holds a delivery log to move to its"
                                     " own file: open it with relayd")
                await self._move_log(self.path)
            await self._w.run(schema.apply, self._w.raw, target)

    async def close(self) -> None:
        """Finish pending writes, stop the writer and close the database."""
        if self._writer_task is not None:
            await self._queue.put(None)
            try:
                await self._writer_task
            finally:
                self._writer_task = None
        if self._w is not None:
            try:
                await self._w.run(_save_id_floor, self._w.raw, self.ids.next())
            except DbError:
                pass
        await self._close_connections()

    async def abandon(self) -> None:
        """After a failed start: stop the writer and close, writing nothing more."""
        if self._writer_task is not None:
            await self._queue.put(None)
            try:
                await self._writer_task
            except Exception:  # noqa: S110 - the start already failed; nothing to save
                pass
            finally:
                self._writer_task = None
        await self._close_connections()

    async def _close_connections(self) -> None:
        for conn in (self._r, self._w):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:  # noqa: S110 - closing after a failure; nothing to save
                    pass
        self._r = self._w = None

    # -- the writer ---------------------------------------------------------------
    def _submit(self, kind: str, payload: Any,
                then: Callable[[Any], None] | None = None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(kind, payload, fut, then))
        return fut

    async def accept(self, msg: NewMessage,
                     then: Callable[[NewMessage], None] | None = None) -> None:
        """Commit one accepted message with its recipients; return after the commit.

        ``then(msg)`` runs on the loop as soon as the commit that contains the
        message is done, before this returns, and also if the caller was
        cancelled while it waited (a client gone right after the final dot):
        a committed message always reaches whoever ``then`` hands it to.
        """
        await self._submit("accept", msg, then)

    def record(self, results: Sequence[AttemptResult], finished: Sequence[int] = (),
               complete: bool = False) -> asyncio.Future[Any]:
        """Queue delivery results for the next commit; resolves to the message ids removed.

        ``finished`` are candidates: a message is removed only if none of its
        recipients is still queued or deferred. ``complete`` is the caller's
        word that ``results`` answer every pending recipient of the finished
        messages, all finally (a first attempt that ended them all): their
        rows are then deleted without being updated and checked first.
        """
        return self._submit("record", (list(results), list(finished), complete))

    async def barrier(self) -> None:
        """Return when every write queued before this call is committed (or failed)."""
        await self._submit("call", _nothing)

    async def _transact(self, fn: Callable[[SqlConn], T], *,
                        deletes_messages: bool = False) -> T:
        """Run ``fn(conn)`` on the writer's thread inside the next group transaction (own
        savepoint); return its value. For the store's modules only: callers outside
        relayd/store use named methods.

        ``deletes_messages``: ``fn`` may delete message rows (a purge); after
        the commit, the files of large messages whose rows are gone are removed.
        """
        result: T = await self._submit("purge" if deletes_messages else "call", fn)
        return result

    async def _writer(self) -> None:
        assert self._w is not None
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._batch_max:
                try:
                    op = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
            await self._apply(self._w, batch)

    async def _apply(self, db: Conn, batch: list[_Op]) -> None:
        """Apply one batch in one transaction, in queue order; resolve each op's future.

        The whole batch runs as one function on the writer's thread (one round
        trip for BEGIN, every insert, update and callback, and COMMIT); each
        delivery result and each callback in its own savepoint. The sessions get
        their answers from that thread's own wake-up of the loop, at the commit.
        """
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        settle = functools.partial(self._settle, batch, results, errors)
        try:
            await db.run(_apply_batch, db.raw, asyncio.get_running_loop(), settle,
                         [(op.kind, op.payload) for op in batch], results, errors, self.bodies,
                         self.hooks)
        except Exception as exc:
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(SpoolError(f"commit failed: {exc}"))
            if self.on_commit_failed is not None:
                self.on_commit_failed()

    def _settle(self, batch: list[_Op], results: dict[int, Any],
                errors: dict[int, BaseException]) -> None:
        """After the commit of ``batch``: each op's result (or error) to whoever waits."""
        n_accepts = sum(1 for op in batch if op.kind == "accept")
        if self._on_batch is not None and n_accepts:
            self._on_batch(n_accepts)
        if self.on_results is not None:
            committed = [r for n, op in enumerate(batch) if op.kind == "record"
                         and n not in errors for r in op.payload[0]]
            if committed:
                self.on_results(committed)
        for n, op in enumerate(batch):
            if op.then is not None and n not in errors:
                try:
                    op.then(op.payload)  # committed: whether or not anyone still waits
                except Exception:  # noqa: S110 - the scheduler's reconciliation finds it
                    pass
            if op.future.done():
                continue
            if n in errors:
                op.future.set_exception(errors[n])
            else:
                op.future.set_result(results.get(n))

    # -- reads --------------------------------------------------------------------
    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """Run a read-only query on the reader connection (the store's modules, and
        tests)."""
        assert self._r is not None
        return await self._r.fetchall(sql, params)

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Any:
        """Run a read-only query and return its first row (or None)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    def body_path(self, message_id: int) -> str | None:
        """The file holding a committed message's data, if it has one (see relayd.store.bodies)."""
        return self.bodies.path(message_id) if message_id in self.bodies.ids else None

    async def load_data(self, message_id: int) -> bytes | None:
        """The stored data of a message, or None if it is gone (one copy: blob I/O)."""
        assert self._r is not None
        return await self._r.run(read_data, self._r.raw, message_id, self.bodies.dir)

    async def pending_messages(self) -> list[StoredMessage]:
        """Every stored message with its recipients that are not final (for start-up)."""
        return q.pending(await self.fetchall(q.PENDING_MESSAGES_SQL),
                         await self.fetchall(q.PENDING_RECIPIENTS_SQL))

    async def queued_count(self) -> int:
        """Messages with a recipient never attempted yet (index ``recipients_queued``)."""
        row = await self.fetchone(q.QUEUED_COUNT_SQL)
        return int(row[0]) if row else 0

    async def deferred_count(self) -> int:
        """Messages with a recipient in the retry queue."""
        row = await self.fetchone(q.DEFERRED_COUNT_SQL)
        return int(row[0]) if row else 0

    async def message_count(self, account_id: int) -> int:
        """The messages an account has stored (any state)."""
        row = await self.fetchone(q.MESSAGE_COUNT_SQL, (account_id,))
        return int(row[0]) if row else 0

    async def queued_messages(self, ids: Sequence[int] | None = None,
                              account_id: int | None = None,
                              limit: int = 10000) -> list[StoredMessage]:
        """Messages with recipients never attempted yet, with those recipients, by id.

        All of them (at most ``limit``), those of one account, or those among
        ``ids``; read through the index ``recipients_queued``.
        """
        rows: list[Any] = []
        if ids is not None:
            for start, size in chunks(len(ids)):
                rows.extend(await self.fetchall(in_sql(q.QUEUED_ROWS_SQL, size),
                                                ids[start:start + size]))
            rows.sort(key=lambda r: (r[0], r[1]))
        elif account_id is None:
            rows = await self.fetchall(q.QUEUED_ALL_SQL, (limit,))
        else:
            rows = await self.fetchall(q.QUEUED_OF_ACCOUNT_SQL, (account_id, limit))
        return q.grouped(rows, "queued")

    async def deferred_messages(self, account_id: int | None = None) -> list[DeferredMessage]:
        """The retry queue (all, or one account's), one record per message, by id."""
        if account_id is None:
            rows = await self.fetchall(q.DEFERRED_LIST_SQL)
        else:
            rows = await self.fetchall(q.DEFERRED_LIST_OF_ACCOUNT_SQL, (account_id,))
        return q.deferred(rows)

    async def next_retry_at(self) -> float | None:
        """When the earliest deferred recipient is due (None: the retry queue is empty)."""
        row = await self.fetchone(q.NEXT_RETRY_SQL)
        return row[0] if row else None

    async def due_retries(self, now: float, limit: int = 500) -> list[StoredMessage]:
        """Deferred recipients due at ``now`` (at most ``limit``, earliest due first),
        grouped by message in the order first seen."""
        return q.grouped(await self.fetchall(q.DUE_SQL, (now, limit)), "deferred")

    async def queued_entries(self, user: str | None, since: float | None, limit: int,
                             message_id: int | None = None,
                             kinds: bool = False) -> list[tuple[Any, ...]]:
        """Recipients never attempted yet, newest message first, as delivery-log rows
        ``(received_at, message_id, username, domain, recipient, '', None, '', 'queued')``
        (plus the kind, ``message`` or ``bounce``, with ``kinds``): those of account
        ``user``, received since ``since`` and of one message, when given."""
        by_user, by_time, by_id = bool(user), since is not None, message_id is not None
        params = [v for v, given in ((user, by_user), (since, by_time), (message_id, by_id))
                  if given]
        rows = await self.fetchall(q.queued_entries_sql(by_user, by_time, by_id, kinds),
                                   [*params, limit])
        return [tuple(r) for r in rows]

    async def orphan_messages(self) -> list[int]:
        """Messages whose recipients are all final (left by a crash before cleanup)."""
        return [r[0] for r in await self.fetchall(q.ORPHANS_SQL)]

    # -- queue writes (each in the next group transaction) -------------------------
    async def release_leases(self, now: float) -> None:
        """Every leased recipient (a retry a crash interrupted) due ``now`` (at start)."""
        await self._transact(functools.partial(q.release_all_leases, now=now))

    async def defer_queued(self, message_ids: Sequence[int], now: float) -> None:
        """The never-attempted recipients of ``message_ids`` join the retry queue, due now."""
        await self._transact(functools.partial(q.defer_queued, message_ids=message_ids,
                                               now=now))

    async def lease(self, recipients: Sequence[tuple[int, int]], until: float) -> None:
        """Lease deferred recipients ``(message id, idx)`` until ``until`` (not fetched
        again meanwhile; a restart makes them due at once)."""
        await self._transact(functools.partial(q.lease, recipients=recipients, until=until))

    async def reconcile_ids(self, release: Sequence[int], now: float,
                            probe: bool) -> list[int]:
        """The ids of the messages with a recipient never attempted yet, read in the next
        group transaction (so every message committed before has been handed over).

        Before that, in the same transaction: the leased recipients of ``release``
        (retries whose result could not be committed) are made due at ``now``;
        with ``probe``, one small write shows the spool can be written again
        (raises SpoolError if not, like any failed commit).
        """
        return await self._transact(functools.partial(q.reconcile, release=release, now=now,
                                                      probe=probe))

    async def retry_now(self, now: float, account_id: int | None = None) -> int:
        """Deferred recipients (all, or one account's) due ``now``; how many."""
        return await self._transact(functools.partial(q.retry_now, now=now,
                                                      account_id=account_id))


# -- on the writer's thread ----------------------------------------------------------------
def _nothing(conn: SqlConn) -> None:
    return None


def _prepare_writer(conn: SqlConn) -> None:
    """WAL, ``synchronous=FULL``, foreign keys; every page checked (before migrations)."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    row = conn.execute("PRAGMA quick_check(1)").fetchone()
    if row is None or row[0] != "ok":
        raise DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")


def _stored_id_floors(conn: SqlConn) -> list[int]:
    """The largest message id stored, and the one saved at the last clean stop."""
    row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()
    floors = [int(row[0]) if row else 0]
    row = conn.execute("SELECT value FROM meta WHERE key='max_message_id'").fetchone()
    if row:
        floors.append(int(row[0]))
    return floors


def _save_id_floor(conn: SqlConn, floor: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('max_message_id', ?)",
                 (str(floor),))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _apply_batch(conn: SqlConn, loop: asyncio.AbstractEventLoop, settle: Callable[[], None],
                 ops: list[tuple[str, Any]], results: dict[int, Any],
                 errors: dict[int, BaseException], bodies: Bodies, hooks: EventSink) -> None:
    """BEGIN, every op in order, COMMIT; then ``settle`` on the loop.

    Accepted messages and delivery results gather until a callback (``call``,
    ``purge``) or the end: a callback runs after those before it, in its own
    savepoint. On any other failure the transaction is rolled back (with the
    files it wrote) and the error raised.
    """
    try:
        accepts: list[NewMessage] = []
        records: list[tuple[int, Any]] = []
        begun = purged = False
        for n, (kind, payload) in enumerate(ops):
            if kind == "accept":
                accepts.append(payload)
            elif kind == "record":
                records.append((n, payload))
            else:
                purged = purged or kind == "purge"
                _apply_plain(conn, accepts, records, results, errors, not begun, False, bodies,
                             hooks)
                begun, accepts, records = True, [], []
                conn.execute("SAVEPOINT op")
                try:
                    results[n] = payload(conn)
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    errors[n] = exc
        _apply_plain(conn, accepts, records, results, errors, not begun, True, bodies, hooks)
        if purged and bodies.ids:  # a purge deleted rows: their files go too
            bodies.reconcile(conn)
    except Exception:
        try:
            conn.execute("ROLLBACK")
        except DbError:
            pass
        bodies.rolled_back()
        raise
    loop.call_soon_threadsafe(settle)


def _apply_plain(conn: SqlConn, msgs: list[NewMessage], records: list[tuple[int, Any]],
                 results: dict[int, Any], errors: dict[int, BaseException], begin: bool,
                 commit: bool, bodies: Bodies, hooks: EventSink) -> None:
    """BEGIN (if ``begin``), insert accepted messages, store delivery results and their
    webhook events (only if a domain has a webhook), COMMIT (if ``commit``)."""
    if begin:
        conn.execute("BEGIN IMMEDIATE")
    if msgs:
        large = [m for m in msgs if len(m.data) > EXTERNAL_MIN]
        if large:
            bodies.write(large)  # files and directory on disk before the rows commit
        insert_rows(
            conn,
            "INSERT INTO messages(id, account_id, username, domain, sender, received_at,"
            " size, is_bounce, data, external)", "(?,?,?,?,?,?,?,?,?,?)",
            [
                (m.id, m.account_id, m.username, m.domain, m.sender, m.received_at,
                 len(m.data), int(m.is_bounce), m.data if len(m.data) <= EXTERNAL_MIN else b"",
                 int(len(m.data) > EXTERNAL_MIN))
                for m in msgs
            ],
        )
        insert_rows(
            conn, "INSERT INTO recipients(message_id, idx, rcpt, status)", "(?,?,?,'queued')",
            [(m.id, i, r) for m in msgs for i, r in enumerate(m.recipients)],
        )
    if records:
        # One savepoint for all of them; only if one fails, again one by one,
        # so that a failing record does not take the others down with it.
        conn.execute("SAVEPOINT ops")
        try:
            done = _apply_records(conn, [payload for _n, payload in records])
        except Exception:
            conn.execute("ROLLBACK TO ops")
            conn.execute("RELEASE ops")
            _apply_one_by_one(conn, records, results, errors)
        else:
            conn.execute("RELEASE ops")
            for (n, _payload), removed in zip(records, done, strict=True):
                results[n] = removed
        if hooks.domains:
            hooks.store_apart(conn, [r for n, payload in records if n not in errors
                                     for r in payload[0]])
        if bodies.ids:
            bodies.deleted([m for n, _p in records for m in results.get(n) or ()])
    if commit:
        conn.execute("COMMIT")
        bodies.committed()


def _apply_one_by_one(conn: SqlConn, records: list[tuple[int, Any]],
                      results: dict[int, Any], errors: dict[int, BaseException]) -> None:
    for n, payload in records:
        conn.execute("SAVEPOINT op")
        try:
            results[n] = _apply_records(conn, [payload])[0]
            conn.execute("RELEASE op")
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            errors[n] = exc


# -- delivery results (their delivery-log rows: ``on_results``) ---------------------------
def _apply_records(conn: SqlConn,
                   payloads: Sequence[tuple[list[AttemptResult], list[int], bool]]
                   ) -> list[list[int]]:
    """What ``_apply_record`` does for each payload, with the complete ones in bulk.

    A complete payload (a first attempt that ended every recipient of its
    messages) only adds sent counts and deletions, so all of them
    go together: one multi-row insert, one delete per table. Its messages are
    its own (no other payload names them), so applying them after the others
    changes no outcome. The others are applied one by one, in order.
    """
    out: list[list[int] | None] = []
    bulk: list[int] = []
    logs: list[AttemptResult] = []
    for results, finished, complete in payloads:
        if complete:
            out.append(None)
            bulk.extend(finished)
            logs.extend(results)
        else:
            out.append(_apply_record(conn, results, finished))
    if logs:
        _count_sent(conn, logs)
    removed: set[int] = set()
    if bulk:
        delete_in(conn, "DELETE FROM recipients WHERE message_id", bulk)
        conn.execute("SAVEPOINT bulk")
        if len(set(bulk)) == len(bulk) and \
                delete_in(conn, "DELETE FROM messages WHERE id", bulk) == len(bulk):
            removed = set(bulk)
        else:  # a row already gone (purged meanwhile): find out which, one by one
            conn.execute("ROLLBACK TO bulk")
            removed = {m for m in bulk
                       if conn.execute("DELETE FROM messages WHERE id=?", (m,)).rowcount}
        conn.execute("RELEASE bulk")
    return [done if done is not None else [m for m in payload[1] if m in removed]
            for done, payload in zip(out, payloads, strict=True)]


def _count_sent(conn: SqlConn, results: Sequence[AttemptResult]) -> None:
    """The delivered ``results`` counted per account, bounces not (their log rows:
    on_results)."""
    sent: dict[int, int] = {}
    for r in results:  # a DSN relayd generated is not mail the account sent
        if r.outcome == "delivered" and r.account_id is not None and not r.is_bounce:
            sent[r.account_id] = sent.get(r.account_id, 0) + 1
    if sent:
        conn.executemany(
            "UPDATE accounts SET total_sent = total_sent + ? WHERE id=?",
            [(k, a) for a, k in sent.items()],
        )


def _apply_record(conn: SqlConn, results: list[AttemptResult],
                  finished: list[int]) -> list[int]:
    """Store attempts; delete the candidate messages that have no pending recipient.

    For results that are not ``complete`` (see ``_apply_records``, which does those).
    """
    if results:
        conn.executemany(
            "UPDATE recipients SET status=?, attempts=attempts+1, next_attempt=?,"
            " last_code=?, last_error=?, leased=0 WHERE message_id=? AND idx=?",
            [(r.outcome, r.next_attempt, r.code, r.text, r.message_id, r.idx)
             for r in results],
        )
        _count_sent(conn, results)
    done: list[int] = []
    for m in finished:
        cur = conn.execute(
            "DELETE FROM messages WHERE id=? AND NOT EXISTS (SELECT 1 FROM recipients"
            " WHERE message_id=? AND status IN ('queued','deferred'))", (m, m))
        if cur.rowcount:
            done.append(m)
    if done:
        conn.executemany("DELETE FROM recipients WHERE message_id=?", [(m,) for m in done])
    return done

