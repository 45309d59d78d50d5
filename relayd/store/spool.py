"""Durable storage: messages, recipients, domains and accounts.

Owns: the SQLite database (WAL, ``synchronous=FULL``), its schema and
migrations, and *group commit*: every write — accepted messages, delivery
results, lifecycle changes — goes through one writer task that takes all the
operations waiting at that moment, applies them in one transaction and commits
once. A session's ``accept`` returns only after the commit that contains its
message, so a ``250`` is never sent for mail that is not on disk; the
message's hand-over to the scheduler (``then``) runs at that commit, whatever
became of the session meanwhile. The never-attempted recipients have an index
of their own (``recipients_queued``) for the scheduler's reconciliation with
the database and for ``status`` and ``queue list``.

Two aiosqlite connections: the writer (one transaction at a time) and a
reader for queries (WAL lets it read while the writer commits).

Large message data (over ``EXTERNAL_MIN``) lives in files beside the database
(``<name>.bodies/<id>``, see :class:`_Bodies`), the way an MTA keeps queue
files: SQLite would write it twice (WAL, then checkpoint), walk its overflow
pages again to free them, and fsync it twice. The file is written and fsynced
(and its directory) before the commit of its row, so a committed message
always has its data; a file whose row never committed or is gone is removed
after the commit that deleted the row, or at the next start.

Message ids are 64-bit integers made from the clock in microseconds and a
counter (unique across restarts while the clock does not go back by more than
the restart takes); on the wire and in the CLI they are 16 hex digits (relayd.ids).

The delivery log has a file of its own (relayd.store.deliverylog): the
results of each committed batch are handed to ``on_results``.

Untrusted input: message data and addresses (stored as given, always through
bound parameters). Settings read: [spool], the database path.
See also: relayd.queue.scheduler (reads and updates the queues), relayd.controlplane.lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar, cast

import aiosqlite

T = TypeVar("T")

#: The writer connection a :meth:`Spool.write` function receives. Callers name
#: its type (and the errors below) from here, so that only this module imports
#: the database library (issue 14: one adapter per library).
Db: TypeAlias = aiosqlite.Connection
#: Any error the database raises (sqlite3.Error).
DbError = sqlite3.Error
#: A constraint (UNIQUE, FOREIGN KEY, CHECK) refused a write (sqlite3.IntegrityError).
IntegrityError = sqlite3.IntegrityError
#: A plain (synchronous) connection, for a store module that runs it on a thread of its own.
PlainDb: TypeAlias = sqlite3.Connection


def connect_plain(path: str) -> PlainDb:
    """A plain connection to ``path`` (autocommit: transactions are explicit)."""
    return sqlite3.connect(path, isolation_level=None, timeout=5.0)


SCHEMA_VERSION = 5

#: Messages larger than this were written and read with blob I/O (see _insert_large);
#: rows stored that way by an earlier version are still read so.
BLOB_STREAM_MIN = 256 * 1024
BLOB_CHUNK = 1024 * 1024
#: Messages larger than this are stored in a file of their own (see _Bodies).
EXTERNAL_MIN = BLOB_STREAM_MIN

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
    # (Spool(move_log=...), see _migrate).
    5: """
    DROP INDEX delivery_log_user_ts;
    DROP INDEX delivery_log_ts;
    DROP TABLE delivery_log;
    """,
}


class SpoolError(Exception):
    """The spool could not be opened or written."""


def _check_files(path: str) -> None:
    """Before SQLite opens ``path``: refuse a 0-byte file and files relayd cannot write.

    SQLite would take a 0-byte file for a new database and relayd would start
    on an empty spool: a truncated spool's mail would be silently forgotten.
    A file it can only read (permissions, ``chattr +i``, a read-only mount)
    opens read-only and fails at the first write, later in the start.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # a new spool
    except OSError as exc:
        raise SpoolError(f"cannot open spool {path} ({exc.strerror or exc}); check that relayd"
                         " may read its directory") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpoolError(f"spool {path} is not a regular file; move it away")
    if st.st_size == 0:
        raise SpoolError(
            f"spool {path} is an empty (0-byte) file, perhaps a truncated spool, so relayd"
            " will not start a new spool over it; restore it from a backup, or remove the"
            " file to start with an empty spool")
    # access(2), not an open and close: closing any descriptor of the file would
    # drop the POSIX locks another SQLite connection of this process holds on it.
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name) and not os.access(name, os.W_OK):
            why = ("read-only file system" if os.statvfs(name).f_flag & os.ST_RDONLY
                   else "permission denied")
            raise SpoolError(_read_only(name, why))


def _read_only(path: str, why: str) -> str:
    return (f"spool {path} cannot be written ({why}); make the spool files and their"
            " directory writable by relayd (check the owner and mode, lsattr for the"
            " immutable flag, and that the filesystem is mounted read-write)")


def unusable(path: str, exc: BaseException) -> SpoolError:
    """A SpoolError for an error met opening or reading the spool: what is wrong, what to do.

    Classified by the SQLite error code where the exception carries one, else
    by its text (a SpoolError from a failed commit carries only the text).
    """
    text = " ".join(str(exc).split()) or type(exc).__name__  # quick_check's has newlines
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    low = text.lower()
    base = os.path.basename(path)
    bodies = os.path.basename(os.path.splitext(path)[0] + ".bodies")
    if code in (11, 26) or any(w in low for w in ("malformed", "not a database", "quick_check",
                                                  "corrupt")):  # SQLITE_CORRUPT, _NOTADB
        return SpoolError(
            f"spool {path} is damaged ({text}); restore it from a backup, or move {base}*"
            f" and {bodies} out of the data directory to start with an empty spool")
    if code in (3, 8) or "readonly" in low or "read-only" in low:  # SQLITE_PERM, _READONLY
        return SpoolError(_read_only(path, text))
    if code in (5, 6) or "locked" in low:  # SQLITE_BUSY, SQLITE_LOCKED
        return SpoolError(f"spool {path} is locked by another process ({text}); stop the"
                          " other relayd, or whatever holds the file, first")
    if code == 13 or "disk is full" in low:  # SQLITE_FULL
        return SpoolError(f"spool {path}: the disk is full ({text}); free space on it")
    if code == 10 or "i/o error" in low:  # SQLITE_IOERR
        return SpoolError(f"spool {path} cannot be read or written ({text}); check the disk"
                          " and the kernel log")
    if code == 14:  # SQLITE_CANTOPEN
        return SpoolError(f"cannot open spool {path} ({text}); check that relayd may read and"
                          " write it and its directory")
    return SpoolError(f"cannot use spool {path} ({type(exc).__name__}: {text}); restore it"
                      " from a backup, or move it away to start with an empty spool")


class IdAllocator:
    """Monotonic 64-bit message ids from the clock and a counter."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last = 0

    def seed(self, floor: int) -> None:
        """Never hand out an id at or below ``floor`` (the largest one stored)."""
        self._last = max(self._last, floor)

    def next(self) -> int:
        """A new id, larger than every id handed out before."""
        candidate = int(self._clock() * 1_000_000) << 8
        self._last = candidate if candidate > self._last else self._last + 1
        return self._last


@dataclass(slots=True)
class NewMessage:
    """A message ready to be committed at acceptance."""

    id: int
    account_id: int
    username: str
    domain: str
    sender: str
    recipients: list[str]
    data: bytes
    received_at: float
    is_bounce: bool = False


@dataclass(slots=True)
class AttemptResult:
    """The outcome of one delivery attempt for one recipient."""

    message_id: int
    idx: int
    recipient: str
    username: str
    domain: str
    next_hop: str
    code: int | None
    text: str
    outcome: str  # delivered | deferred | failed
    ts: float
    next_attempt: float | None = None
    account_id: int | None = None


@dataclass(slots=True)
class _Op:
    kind: str
    payload: Any
    future: asyncio.Future[Any]
    then: Callable[[Any], None] | None = None  # an accept's hand-over, run at its commit


@dataclass(slots=True)
class PendingRecipient:
    """A recipient not yet in a final state, as stored."""

    idx: int
    rcpt: str
    status: str
    attempts: int
    next_attempt: float | None
    last_code: int | None
    last_error: str | None


@dataclass(slots=True)
class StoredMessage:
    """A message with its not-yet-final recipients (data loaded separately)."""

    id: int
    account_id: int
    username: str
    domain: str
    sender: str
    received_at: float
    size: int
    is_bounce: bool
    recipients: list[PendingRecipient] = field(default_factory=list)


#: Never-attempted recipients with their message's columns (``queued_messages``),
#: through the index ``recipients_queued``; followed by ``IN (...)``.
_QUEUED_ROWS = ("SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id, m.username,"
                " m.domain, m.sender, m.received_at, m.size, m.is_bounce"
                " FROM recipients r JOIN messages m ON m.id = r.message_id"
                " WHERE r.status='queued' AND r.message_id")
_QUEUED_ALL = ("SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id, m.username,"
               " m.domain, m.sender, m.received_at, m.size, m.is_bounce"
               " FROM recipients r JOIN messages m ON m.id = r.message_id"
               " WHERE r.status='queued' AND r.message_id IN (SELECT DISTINCT message_id"
               " FROM recipients WHERE status='queued' ORDER BY message_id LIMIT ?)"
               " ORDER BY r.message_id, r.idx")
_QUEUED_OF_ACCOUNT = ("SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id,"
                      " m.username, m.domain, m.sender, m.received_at, m.size, m.is_bounce"
                      " FROM recipients r JOIN messages m ON m.id = r.message_id"
                      " WHERE r.status='queued' AND r.message_id IN (SELECT DISTINCT"
                      " q.message_id FROM recipients q JOIN messages a ON a.id = q.message_id"
                      " WHERE q.status='queued' AND a.account_id=? ORDER BY q.message_id"
                      " LIMIT ?) ORDER BY r.message_id, r.idx")


class Spool:
    """The SQLite spool with a group-committing writer."""

    def __init__(self, path: str, *, batch_max: int = 256,
                 on_batch: Callable[[int], None] | None = None,
                 move_log: Callable[[str], Awaitable[int]] | None = None) -> None:
        self.path = path
        self._move_log = move_log
        self._batch_max = batch_max
        self._on_batch = on_batch
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self.ids = IdAllocator()
        self.bodies = _Bodies(os.path.splitext(path)[0] + ".bodies")
        #: Called on the loop after a group commit failed (the scheduler reconciles).
        self.on_commit_failed: Callable[[], None] | None = None
        #: Called on the loop with the delivery results of each commit (the delivery log).
        self.on_results: Callable[[list[AttemptResult]], None] | None = None

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
            _check_files(self.path)
            self._w = await aiosqlite.connect(self.path, isolation_level=None, timeout=5.0)
            await self._w.execute("PRAGMA journal_mode=WAL")
            await self._w.execute("PRAGMA synchronous=FULL")
            await self._w.execute("PRAGMA foreign_keys=ON")
            async with self._w.execute("PRAGMA quick_check(1)") as cur:
                row = await cur.fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(
                    f"quick_check: {row[0] if row else 'no answer'}")
            await self._migrate()
            try:
                await _in_thread(self._w, self.bodies.open, _raw(self._w))
            except OSError as exc:
                raise SpoolError(f"cannot use {self.bodies.dir}: {exc.strerror or exc}") from None
            self._r = await aiosqlite.connect(self.path, isolation_level=None, timeout=5.0)
            await self._r.execute("PRAGMA query_only=ON")
            async with self._w.execute("SELECT COALESCE(MAX(id), 0) FROM messages") as cur:
                row = await cur.fetchone()
            self.ids.seed(int(row[0]) if row else 0)
            async with self._w.execute("SELECT value FROM meta WHERE key='max_message_id'") as cur:
                row = await cur.fetchone()
            if row:
                self.ids.seed(int(row[0]))
        except sqlite3.Error as exc:
            await self._close_connections()
            raise unusable(self.path, exc) from None
        except SpoolError:
            await self._close_connections()  # else aiosqlite's threads outlive the loop
            raise
        self._writer_task = asyncio.get_running_loop().create_task(self._writer())

    async def _migrate(self) -> None:
        assert self._w is not None
        async with self._w.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool schema version {version} is newer than this relayd ({SCHEMA_VERSION});"
                " run the relayd version that wrote it, or restore a backup made by this one"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            if target == 5:
                await self._move_old_log()
            await self._w.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _split_sql(MIGRATIONS[target]):
                    await self._w.execute(stmt)
                await self._w.execute(f"PRAGMA user_version={target}")
                await self._w.execute("COMMIT")
            except Exception:
                await self._w.execute("ROLLBACK")
                raise

    async def _move_old_log(self) -> None:
        """Before migration 5 drops it: the old delivery_log table's rows to the log file."""
        assert self._w is not None
        async with self._w.execute("SELECT EXISTS (SELECT 1 FROM delivery_log)") as cur:
            row = await cur.fetchone()
        if row and row[0]:
            if self._move_log is None:
                raise SpoolError(f"spool {self.path} holds a delivery log to move to its own"
                                 " file: open it with relayd")
            await self._move_log(self.path)

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
                await self._w.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('max_message_id', ?)",
                    (str(self.ids.next()),),
                )
                await self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
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

    async def write(self, fn: Callable[[Db], Awaitable[T]], *,
                    deletes_messages: bool = False) -> T:
        """Run ``fn`` inside the next group transaction (own savepoint); return its value.

        ``deletes_messages``: ``fn`` may delete message rows (a purge); after
        the commit, the files of large messages whose rows are gone are removed.
        """
        result: T = await self._submit("purge" if deletes_messages else "call", fn)
        return result

    async def _writer(self) -> None:
        assert self._w is not None
        db = self._w
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
            await self._apply(db, batch)

    async def _apply(self, db: aiosqlite.Connection, batch: list[_Op]) -> None:
        """Apply one batch in one transaction, in queue order; resolve each op's future.

        Accepted messages and delivery results are plain SQL: they run as one
        synchronous function on the database thread (one thread round trip for
        BEGIN, every insert and update, and COMMIT), each delivery result in its
        own savepoint. Only ``write`` callbacks, which are coroutines using the
        aiosqlite connection, are awaited one statement at a time; a run of
        plain ops before one is sent to the thread first, so the order holds.
        """
        accepts = [op.payload for op in batch if op.kind == "accept"]
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        records: list[tuple[int, Any]] = []
        begun = False
        purged = False
        try:
            for n, op in enumerate(batch):
                if op.kind == "record":
                    records.append((n, op.payload))
                elif op.kind in ("call", "purge"):
                    purged = purged or op.kind == "purge"
                    await _in_thread(db, _apply_plain, _raw(db), accepts, records, results,
                                     errors, not begun, False, self.bodies)
                    begun, accepts, records = True, [], []
                    await db.execute("SAVEPOINT op")
                    try:
                        results[n] = await op.payload(db)
                        await db.execute("RELEASE op")
                    except Exception as exc:
                        await db.execute("ROLLBACK TO op")
                        await db.execute("RELEASE op")
                        errors[n] = exc
            # Without a purge, the sessions get their answers from the database thread's
            # own wake-up of the loop: one loop turn before this task would hand them out.
            settle = None if purged else functools.partial(self._settle, batch, results, errors)
            await _in_thread(db, _apply_then, asyncio.get_running_loop(), settle, _raw(db),
                             accepts, records, results, errors, not begun, True, self.bodies)
            if settle is not None:
                return
            if self.bodies.ids:  # a purge deleted rows: their files go too
                await _in_thread(db, self.bodies.reconcile, _raw(db))
        except Exception as exc:
            try:
                await db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            await _in_thread(db, self.bodies.rolled_back)
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(SpoolError(f"commit failed: {exc}"))
            if self.on_commit_failed is not None:
                self.on_commit_failed()
            return
        self._settle(batch, results, errors)

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
    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only query on the reader connection."""
        assert self._r is not None
        async with self._r.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Any:
        """Run a read-only query and return its first row (or None)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    def body_path(self, message_id: int) -> str | None:
        """The file holding a committed message's data, if it has one (see _Bodies)."""
        return self.bodies.path(message_id) if message_id in self.bodies.ids else None

    async def load_data(self, message_id: int) -> bytes | None:
        """The stored data of a message, or None if it is gone (one copy: blob I/O)."""
        assert self._r is not None
        return await _in_thread(self._r, _read_data_of, _raw(self._r), message_id,
                                self.bodies.dir)

    async def pending_messages(self) -> list[StoredMessage]:
        """Every stored message with its recipients that are not final (for start-up)."""
        msgs: dict[int, StoredMessage] = {}
        for row in await self.fetchall(
            "SELECT id, account_id, username, domain, sender, received_at, size, is_bounce"
            " FROM messages ORDER BY id"
        ):
            msgs[row[0]] = StoredMessage(row[0], row[1], row[2], row[3], row[4], row[5],
                                         row[6], bool(row[7]))
        for row in await self.fetchall(
            "SELECT message_id, idx, rcpt, status, attempts, next_attempt, last_code, last_error"
            " FROM recipients WHERE status IN ('queued','deferred') ORDER BY message_id, idx"
        ):
            m = msgs.get(row[0])
            if m is not None:
                m.recipients.append(PendingRecipient(row[1], row[2], row[3], row[4], row[5],
                                                     row[6], row[7]))
        return list(msgs.values())

    async def queued_count(self) -> int:
        """Messages with a recipient never attempted yet (index ``recipients_queued``)."""
        row = await self.fetchone(
            "SELECT COUNT(DISTINCT message_id) FROM recipients WHERE status='queued'")
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
            for start, size in _chunks(len(ids)):
                rows.extend(await self.fetchall(_in_sql(_QUEUED_ROWS, size),
                                                ids[start:start + size]))
            rows.sort(key=lambda r: (r[0], r[1]))
        elif account_id is None:
            rows = await self.fetchall(_QUEUED_ALL, (limit,))
        else:
            rows = await self.fetchall(_QUEUED_OF_ACCOUNT, (account_id, limit))
        msgs: dict[int, StoredMessage] = {}
        for r in rows:
            m = msgs.get(r[0])
            if m is None:
                m = msgs[r[0]] = StoredMessage(r[0], r[4], r[5], r[6], r[7], r[8], r[9],
                                               bool(r[10]))
            m.recipients.append(PendingRecipient(r[1], r[2], "queued", r[3], None, None, None))
        return list(msgs.values())

    async def reconcile_ids(self, release: Sequence[int], now: float,
                            probe: bool) -> list[int]:
        """The ids of the messages with a recipient never attempted yet, read in the next
        group transaction (so every message committed before has been handed over).

        Before that, in the same transaction: the leased recipients of ``release``
        (retries whose result could not be committed) are made due at ``now``;
        with ``probe``, one small write shows the spool can be written again
        (raises SpoolError if not, like any failed commit).
        """
        async def op(db: aiosqlite.Connection) -> list[int]:
            if release:
                await db.executemany(
                    "UPDATE recipients SET next_attempt=?, leased=0 WHERE message_id=?"
                    " AND status='deferred' AND leased=1", [(now, m) for m in release])
            if probe:
                await db.execute("INSERT OR REPLACE INTO meta(key, value)"
                                 " VALUES ('reconciled_at', ?)", (repr(now),))
            async with db.execute("SELECT DISTINCT message_id FROM recipients"
                                  " WHERE status='queued'") as cur:
                return [int(r[0]) for r in await cur.fetchall()]

        return await self.write(op)

    async def orphan_messages(self) -> list[int]:
        """Messages whose recipients are all final (left by a crash before cleanup)."""
        rows = await self.fetchall(
            "SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
            " WHERE r.message_id = m.id AND r.status IN ('queued','deferred'))"
        )
        return [r[0] for r in rows]


def _raw(db: aiosqlite.Connection) -> Callable[[], sqlite3.Connection]:
    """The sqlite3 connection under an aiosqlite one (for use on its own thread only)."""
    return lambda: db._conn  # private: aiosqlite has no public accessor (>= 0.20)


async def _in_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on the aiosqlite connection's thread (one round trip)."""
    return cast(T, await db._execute(fn, *args))  # private, see _raw


def _apply_plain(conn_of: Callable[[], sqlite3.Connection], msgs: list[NewMessage],
                 records: list[tuple[int, Any]], results: dict[int, Any],
                 errors: dict[int, BaseException], begin: bool, commit: bool,
                 bodies: _Bodies) -> None:
    """On the database thread: BEGIN, insert accepted messages, store delivery results, COMMIT."""
    conn = conn_of()
    if begin:
        conn.execute("BEGIN IMMEDIATE")
    if msgs:
        large = [m for m in msgs if len(m.data) > EXTERNAL_MIN]
        if large:
            bodies.write(large)  # files and directory on disk before the rows commit
        _insert_rows(
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
        _insert_rows(
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
        if bodies.ids:
            bodies.deleted([m for n, _p in records for m in results.get(n) or ()])
    if commit:
        conn.execute("COMMIT")
        bodies.committed()


def _apply_then(loop: asyncio.AbstractEventLoop, then: Callable[[], None] | None,
                *args: Any) -> None:
    """On the database thread: ``_apply_plain(*args)``; once it committed, ``then`` on the loop."""
    _apply_plain(*args)
    if then is not None:
        loop.call_soon_threadsafe(then)


def _apply_one_by_one(conn: sqlite3.Connection, records: list[tuple[int, Any]],
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


def _read_data_of(conn_of: Callable[[], sqlite3.Connection], message_id: int,
                  bodies_dir: str) -> bytes | None:
    """On the reader's thread: the data from its file, or with blob I/O (_read_large)."""
    conn = conn_of()
    row = conn.execute("SELECT external FROM messages WHERE id=?", (message_id,)).fetchone()
    if row is None:
        return None
    if row[0]:
        try:
            with open(os.path.join(bodies_dir, str(message_id)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None  # deleted after our read of the row: purged or delivered meanwhile
    return _read_large(conn, message_id)


class _Bodies:
    """The files of large messages: ``<dir>/<message id>``, used only on the writer's thread.

    ``ids`` are the committed messages that have a file. Written files join
    them at the commit of their rows; a rollback removes them. A file is
    removed after the commit that deleted its row: delivery results say which
    rows they deleted; after a purge (``write(..., deletes_messages=True)``),
    ``reconcile`` checks the known files against the table.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.ids: set[int] = set()
        self._written: list[int] = []  # files of rows not committed yet
        self._gone: list[int] = []  # files of rows deleted, not committed yet

    def path(self, message_id: int) -> str:
        return os.path.join(self.dir, str(message_id))

    def open(self, conn_of: Callable[[], sqlite3.Connection]) -> None:
        """At start: the directory (0750), the ids with a file, and no file left over."""
        os.makedirs(self.dir, mode=0o750, exist_ok=True)
        rows = conn_of().execute("SELECT id FROM messages WHERE external=1").fetchall()
        self.ids = {int(r[0]) for r in rows}
        for name in os.listdir(self.dir):
            if not (name.isdigit() and int(name) in self.ids):
                _unlink(os.path.join(self.dir, name))  # a crash before its row committed

    def write(self, msgs: list[NewMessage]) -> None:
        """Write, fsync and close each file, then fsync the directory (new entries)."""
        for m in msgs:
            fd = os.open(self.path(m.id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o640)
            self._written.append(m.id)
            try:
                view = memoryview(m.data)
                while view:
                    view = view[os.write(fd, view[:BLOB_CHUNK]):]
                os.fdatasync(fd)
            finally:
                os.close(fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def deleted(self, message_ids: Iterable[int]) -> None:
        """Rows deleted in the open transaction (files go after its commit)."""
        self._gone.extend(m for m in message_ids if m in self.ids)

    def committed(self) -> None:
        self.ids.update(self._written)
        self._written.clear()
        for m in self._gone:
            self.ids.discard(m)
            _unlink(self.path(m))
        self._gone.clear()

    def rolled_back(self) -> None:
        for m in self._written:
            _unlink(self.path(m))
        self._written.clear()
        self._gone.clear()

    def reconcile(self, conn_of: Callable[[], sqlite3.Connection]) -> None:
        """After a commit with lifecycle calls: remove the files whose rows are gone."""
        known = sorted(self.ids)
        kept: set[int] = set()
        conn = conn_of()
        for start in range(0, len(known), 500):
            part = known[start:start + 500]
            marks = ",".join("?" * len(part))
            kept.update(int(r[0]) for r in conn.execute(
                f"SELECT id FROM messages WHERE id IN ({marks})", part))  # noqa: S608
        for m in self.ids - kept:
            _unlink(self.path(m))
        self.ids = kept


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_large(conn: sqlite3.Connection, message_id: int) -> bytes | None:
    """A message's data through blob I/O (one copy, into the result), or None if gone."""
    try:
        with conn.blobopen("messages", "data", message_id, readonly=True) as blob:
            return blob.read()
    except sqlite3.OperationalError:
        return None  # no such row: purged or delivered meanwhile


#: Rows per multi-row statement, at most: 64 rows of 10 columns stay within the
#: 999 parameters of older SQLite builds.
_CHUNK_MAX = 64


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    """``(start, size)`` pieces of ``range(n)``, each size a power of two (<= _CHUNK_MAX).

    So a handful of statement texts serve any batch, each prepared once and
    kept in sqlite3's statement cache.
    """
    start = 0
    while start < n:
        size = min(_CHUNK_MAX, 1 << ((n - start).bit_length() - 1))
        yield start, size
        start += size


@functools.lru_cache(maxsize=256)
def _rows_sql(head: str, row: str, n: int) -> str:
    return f"{head} VALUES {','.join([row] * n)}"


@functools.lru_cache(maxsize=256)
def _in_sql(head: str, n: int) -> str:
    return f"{head} IN ({','.join('?' * n)})"


def _insert_rows(conn: sqlite3.Connection, head: str, row: str,
                 rows: Sequence[tuple[Any, ...]]) -> None:
    """``head VALUES row, row, ...``: one statement per chunk instead of one step per row.

    Why: the sqlite3 module releases the GIL around every step and must take
    it back after. While the event loop is busy, taking it back waits, so
    fewer steps mean fewer waits.
    """
    for start, size in _chunks(len(rows)):
        conn.execute(_rows_sql(head, row, size),
                     [value for r in rows[start:start + size] for value in r])


def _delete_in(conn: sqlite3.Connection, head: str, ids: Sequence[int]) -> int:
    """``head IN (ids)`` in chunks (see _insert_rows); the number of rows deleted."""
    return sum(conn.execute(_in_sql(head, size), ids[start:start + size]).rowcount
               for start, size in _chunks(len(ids)))


def _apply_records(conn: sqlite3.Connection,
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
        _delete_in(conn, "DELETE FROM recipients WHERE message_id", bulk)
        conn.execute("SAVEPOINT bulk")
        if len(set(bulk)) == len(bulk) and \
                _delete_in(conn, "DELETE FROM messages WHERE id", bulk) == len(bulk):
            removed = set(bulk)
        else:  # a row already gone (purged meanwhile): find out which, one by one
            conn.execute("ROLLBACK TO bulk")
            removed = {m for m in bulk
                       if conn.execute("DELETE FROM messages WHERE id=?", (m,)).rowcount}
        conn.execute("RELEASE bulk")
    return [done if done is not None else [m for m in payload[1] if m in removed]
            for done, payload in zip(out, payloads, strict=True)]


def _count_sent(conn: sqlite3.Connection, results: Sequence[AttemptResult]) -> None:
    """The delivered ``results`` counted per account (their log rows: on_results)."""
    sent: dict[int, int] = {}
    for r in results:
        if r.outcome == "delivered" and r.account_id is not None:
            sent[r.account_id] = sent.get(r.account_id, 0) + 1
    if sent:
        conn.executemany(
            "UPDATE accounts SET total_sent = total_sent + ? WHERE id=?",
            [(k, a) for a, k in sent.items()],
        )


def _apply_record(conn: sqlite3.Connection, results: list[AttemptResult],
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


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
