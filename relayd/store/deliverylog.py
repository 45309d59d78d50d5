"""The delivery log: one row per recipient attempt, in a database file of its own.

Owns: ``relayd-log.sqlite3`` beside the spool (WAL, ``synchronous=NORMAL``,
incremental auto-vacuum), its schema (version 2: the ``kind`` of each row, ``message``
or ``bounce``, and an index by message id), its writer, its queries (``relayctl
log``, the seed of the sending-limit windows), its bounds (age and size) and
the upgrade that moves the rows of the spool's old ``delivery_log`` table here.

The spool's result commit no longer writes log rows: the results of each
committed batch are handed over (:meth:`DeliveryLog.append`) and the writer
coalesces whatever is waiting into one transaction. So a crash between the
two can lose log rows, never a message state. The log has one connection on
one thread of its own (a relayd.store.db.Conn): its writes, its queries
and its prune never hold the spool's writer. The prune deletes at most
``batch_rows`` rows per transaction and lets the loop (and the log's writer)
run between two of them.

Untrusted input: addresses and reply texts (stored as given, bound parameters).
Settings read: none (the caller passes ``[spool] delivery_log_retention_days``
and ``delivery_log_max_bytes`` to :meth:`DeliveryLog.prune`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from relayd.store.db import Conn, SqlConn
from relayd.store.records import AttemptResult

T = TypeVar("T")

SCHEMA_VERSION = 2

_SCHEMA = """
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
CREATE INDEX delivery_log_ts ON delivery_log(ts)
"""
#: Version 2: the kind of message (``message``, or ``bounce``: a DSN relayd generated)
#: and the index of ``relayctl log --message ID``.
_STEP_2 = """
ALTER TABLE delivery_log ADD COLUMN kind TEXT NOT NULL DEFAULT 'message';
CREATE INDEX delivery_log_message ON delivery_log(message_id)
"""

_OLD_COLUMNS = "ts, message_id, username, domain, recipient, next_hop, code, text, outcome"
_COLUMNS = _OLD_COLUMNS + ", kind"
_ROW = "(?,?,?,?,?,?,?,?,?,?)"
#: Rows per multi-row insert: 64 rows of 10 columns stay within 999 parameters.
_CHUNK = 64
#: Free pages given back to the file system after each prune batch, at most.
_VACUUM_PAGES = 1000
#: Rows copied per transaction by the upgrade from the spool's old table.
_MOVE_ROWS = 50_000

Row = tuple[Any, ...]


class DeliveryLog:
    """The delivery log file: a coalescing writer, queries and a batched prune."""

    def __init__(self, path: str, *, batch_rows: int = 2000, pause: float = 0.002,
                 rest: float = 1.0, on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._batch_rows = batch_rows
        self._pause = pause
        self._rest = rest
        self._on_error = on_error
        self._conn: Conn | None = None
        self._pending: list[Row] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one user of the connection at a time: writer or prune
        self._writer_task: asyncio.Task[None] | None = None
        #: Transactions the prune has committed, in total (each at most ``batch_rows`` rows).
        self.prune_batches = 0

    # -- lifecycle ----------------------------------------------------------------
    async def open(self) -> None:
        """Open (creating) the file on a thread of its own and start the writer."""
        self._conn = await Conn.open(self.path, busy_timeout=5.0, name="relayd-log",
                                     create_mode=0o640)  # private, like the spool
        try:
            await self._run(_open, self.path)
        except BaseException:
            await self._conn.close()
            self._conn = None
            raise
        self._writer_task = asyncio.get_running_loop().create_task(self._writer())

    async def close(self) -> None:
        """Write what is waiting, stop the writer, checkpoint and close."""
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        if self._conn is None:
            return
        with contextlib.suppress(Exception):
            await self.flush()
        with contextlib.suppress(Exception):
            await self._run(_checkpoint)
        await self._conn.close()
        self._conn = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on the log's thread."""
        assert self._conn is not None
        return await self._conn.run(fn, self._conn.raw, *args)

    # -- the writer ---------------------------------------------------------------
    def append(self, results: Sequence[AttemptResult]) -> None:
        """Rows for ``results`` (committed in the spool): written at the writer's next turn."""
        self._pending.extend(
            (r.ts, r.message_id, r.username, r.domain, r.recipient, r.next_hop, r.code,
             r.text, r.outcome, "bounce" if r.is_bounce else "message") for r in results)
        self._wake.set()

    async def flush(self) -> None:
        """Until every row appended so far is committed in the log file."""
        async with self._lock:
            while self._pending:
                rows, self._pending = self._pending, []
                await self._run(_insert, rows)

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the rows are lost; message states are not
                if self._on_error is not None:
                    self._on_error(f"{type(exc).__name__}: {exc}")

    # -- reads --------------------------------------------------------------------
    async def entries(self, user: str | None, status: str | None, since: float | None,
                      limit: int, message_id: int | None = None) -> list[Row]:
        """Attempts, newest first: ``(ts, message_id, username, domain, recipient,
        next_hop, code, text, outcome, kind)``, filtered by account, outcome, time and
        message; those of one message (``message_id``) oldest first, its history."""
        await self.flush()
        where = ""
        params: list[Any] = []
        for clause, value in (("username=?", user), ("outcome=?", status), ("ts>=?", since),
                              ("message_id=?", message_id)):
            if value is not None and value != "":
                where += f" AND {clause}"  # literals of this module, never input
                params.append(value)
        order = "ASC" if message_id is not None else "DESC"
        sql = (f"SELECT {_COLUMNS} FROM delivery_log WHERE 1=1{where}"  # noqa: S608
               f" ORDER BY ts {order}, id {order} LIMIT ?")
        return await self._run(_fetchall, sql, [*params, limit])

    async def first_attempts(self, username: str, minute: float, hour: float,
                             day: float) -> tuple[int, int, int]:
        """Messages of ``username`` first attempted since each of the three times
        (``minute >= hour >= day``): what a sending-limit window starts from (a
        recipient removed by the operator, ``purged``, was not attempted)."""
        await self.flush()
        rows = await self._run(
            _fetchall,
            "SELECT COALESCE(SUM(t >= ?), 0), COALESCE(SUM(t >= ?), 0), COUNT(*) FROM"
            " (SELECT MIN(ts) AS t FROM delivery_log WHERE username=? AND ts >= ?"
            " AND outcome != 'purged' GROUP BY message_id)", (minute, hour, username, day))
        row = rows[0] if rows else (0, 0, 0)
        return int(row[0]), int(row[1]), int(row[2])

    async def size_bytes(self) -> int:
        """Bytes the rows and indexes use in the file (free pages not counted)."""
        return await self._run(_used_bytes)

    # -- bounds -------------------------------------------------------------------
    async def prune(self, cutoff: float, max_bytes: int) -> int:
        """Delete the rows older than ``cutoff``, then the oldest ones while the log
        uses more than ``max_bytes``; return how many. At most ``batch_rows`` rows
        per transaction, with the loop and the log's writer let in between; after
        each, a rest of ``rest`` times what it took (at least ``pause``), so that
        the prune takes at most about half a core and of the disk from the relay."""
        deleted = 0
        loop = asyncio.get_running_loop()
        for by_size in (False, True):
            while True:
                started = loop.time()
                async with self._lock:
                    n = await self._run(_prune_batch, cutoff, max_bytes, by_size,
                                        self._batch_rows)
                if n == 0:
                    break
                deleted += n
                self.prune_batches += 1
                await asyncio.sleep(max(self._pause, (loop.time() - started) * self._rest))
        return deleted

    # -- upgrade ------------------------------------------------------------------
    async def move_from_spool(self, spool_path: str) -> int:
        """Copy the rows of the spool's old ``delivery_log`` table here, in batches.

        Run before the spool's migration drops that table. Resumable: a copy cut
        short by a crash goes on after the last row copied (the ids are kept).
        Returns the number of rows copied.
        """
        moved = 0
        async with self._lock:
            while True:
                n = await self._run(_move_batch, spool_path, _MOVE_ROWS)
                if n == 0:
                    return moved
                moved += n
                await asyncio.sleep(0)


# -- on the log's thread (each function gets the log's one connection) ---------------------
def _open(conn: SqlConn, path: str) -> None:
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise ValueError(f"delivery log {path} has schema version {version}, newer than"
                         f" this relayd's ({SCHEMA_VERSION})")
    for target, script in ((1, _SCHEMA), (2, _STEP_2)):
        if version < target:
            conn.execute("BEGIN IMMEDIATE")
            for stmt in script.split(";"):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={target}")
            conn.execute("COMMIT")


def _checkpoint(conn: SqlConn) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _insert(conn: SqlConn, rows: list[Row]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        full = len(rows) - len(rows) % _CHUNK
        many = f"INSERT INTO delivery_log({_COLUMNS}) VALUES {','.join([_ROW] * _CHUNK)}"  # noqa: S608
        for start in range(0, full, _CHUNK):
            conn.execute(many, [v for r in rows[start:start + _CHUNK] for v in r])
        conn.executemany(f"INSERT INTO delivery_log({_COLUMNS}) VALUES {_ROW}",  # noqa: S608
                         rows[full:])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _fetchall(conn: SqlConn, sql: str, params: Sequence[Any]) -> list[Row]:
    return [tuple(r) for r in conn.execute(sql, params).fetchall()]


def _used_bytes(conn: SqlConn) -> int:
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return (pages - free) * int(conn.execute("PRAGMA page_size").fetchone()[0])


def _prune_batch(conn: SqlConn, cutoff: float, max_bytes: int, by_size: bool,
                 limit: int) -> int:
    """One transaction: at most ``limit`` rows, the oldest; 0 when nothing is to go."""
    if by_size and _used_bytes(conn) <= max_bytes:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        if by_size:
            n = conn.execute("DELETE FROM delivery_log WHERE id IN (SELECT id FROM"
                             " delivery_log ORDER BY ts LIMIT ?)", (limit,)).rowcount
        else:
            n = conn.execute("DELETE FROM delivery_log WHERE id IN (SELECT id FROM"
                             " delivery_log WHERE ts < ? ORDER BY ts LIMIT ?)",
                             (cutoff, limit)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    # The freed pages back to the file system, a bounded number at a time. It frees one
    # page per step: executescript steps it to the end (execute would step it once).
    conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_PAGES})")
    return int(n)


def _move_batch(conn: SqlConn, spool_path: str, limit: int) -> int:
    """Copy the next ``limit`` rows of the spool's old table (by id); 0 when done."""
    conn.execute("ATTACH DATABASE ? AS old", (spool_path,))
    try:
        exists = conn.execute("SELECT 1 FROM old.sqlite_master WHERE type='table'"
                              " AND name='delivery_log'").fetchone()
        if not exists:
            return 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = conn.execute(
                f"INSERT OR IGNORE INTO main.delivery_log(id, {_OLD_COLUMNS}) SELECT id,"  # noqa: S608
                f" {_OLD_COLUMNS} FROM old.delivery_log WHERE id > (SELECT COALESCE(MAX(id), 0)"
                " FROM main.delivery_log) ORDER BY id LIMIT ?", (limit,)).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(n)
    finally:
        conn.execute("DETACH DATABASE old")
