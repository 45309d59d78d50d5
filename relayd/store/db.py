"""The SQLite library's one adapter: connections on their own thread, start-up checks, errors.

Owns: :class:`Conn` (one stdlib ``sqlite3`` connection used only by one
dedicated thread, so the event loop never waits on the disk), the checks made
before the spool is opened (a 0-byte file, files relayd cannot write), the
translation of database errors into a :class:`SpoolError` that says what is
wrong and what to do (:func:`unusable`), and the statement helpers of the
group commit (multi-row inserts and ``IN`` lists in chunks, blob reads).

Only this module imports ``sqlite3`` (tests/test_import_rules.py): the other
store modules name its types through :data:`SqlConn`, :data:`DbError` and
:data:`IntegrityError`.
See also: relayd.store.spool (the writer and its group commit), relayd.store.schema.
"""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")

#: A connection, as the functions run on its thread receive it.
SqlConn: TypeAlias = sqlite3.Connection
#: Any error the database raises (sqlite3.Error).
DbError = sqlite3.Error
#: A constraint (UNIQUE, FOREIGN KEY, CHECK) refused a write (sqlite3.IntegrityError).
IntegrityError = sqlite3.IntegrityError
#: The database is damaged, among others (sqlite3.DatabaseError).
DatabaseError = sqlite3.DatabaseError


class SpoolError(Exception):
    """The spool could not be opened or written."""


class Conn:
    """One SQLite connection and the one thread that uses it.

    Every use of ``raw`` happens on that thread, through :meth:`run`: one
    round trip per call, however many statements the function runs. The
    thread takes jobs from a queue and hands each result back to the job's
    loop (what aiosqlite did, without its per-statement API): no executor
    bookkeeping on the group commit's path. It is a daemon thread: after
    :meth:`close` it has ended; without one, it never holds the process open.
    """

    def __init__(self, name: str = "relayd-sqlite") -> None:
        self.raw: sqlite3.Connection
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    @classmethod
    async def open(cls, path: str, *, busy_timeout: float = 5.0, name: str = "relayd-sqlite",
                   create_mode: int | None = None) -> Conn:
        """Connect on a new thread (called ``name``), in autocommit mode (transactions are
        explicit); with ``create_mode``, a missing file is first created with that mode."""
        conn = cls(name)
        conn._thread.start()
        try:
            conn.raw = await conn.run(_connect, path, busy_timeout, create_mode)
        except BaseException:
            conn._jobs.put(None)
            raise
        return conn

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, fut, loop = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, whatever it is
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the connection's thread."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, args, fut, loop))
        return await fut

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """The rows of one statement (tuples)."""
        return await self.run(_fetchall, self.raw, sql, tuple(params))

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        """One statement whose rows (if any) are not wanted."""
        await self.run(_fetchall, self.raw, sql, tuple(params))

    async def close(self) -> None:
        """Close the connection, then let its thread end."""
        try:
            await self.run(self.raw.close)
        finally:
            self._jobs.put(None)


_Job: TypeAlias = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]",
                        asyncio.AbstractEventLoop]


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():  # not cancelled meanwhile
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _connect(path: str, busy_timeout: float, create_mode: int | None) -> sqlite3.Connection:
    if create_mode is not None and not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, create_mode))
    return sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)


def _fetchall(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def check_files(path: str) -> None:
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


def read_blob(conn: sqlite3.Connection, table: str, column: str, rowid: int) -> bytes | None:
    """A column's value through blob I/O (one copy, into the result), or None if the row is
    gone."""
    try:
        with conn.blobopen(table, column, rowid, readonly=True) as blob:
            return blob.read()
    except sqlite3.OperationalError:
        return None


#: Rows per multi-row statement, at most: 64 rows of 10 columns stay within the
#: 999 parameters of older SQLite builds.
CHUNK_MAX = 64


def chunks(n: int) -> Iterator[tuple[int, int]]:
    """``(start, size)`` pieces of ``range(n)``, each size a power of two (<= CHUNK_MAX).

    So a handful of statement texts serve any batch, each prepared once and
    kept in sqlite3's statement cache.
    """
    start = 0
    while start < n:
        size = min(CHUNK_MAX, 1 << ((n - start).bit_length() - 1))
        yield start, size
        start += size


@functools.lru_cache(maxsize=256)
def _rows_sql(head: str, row: str, n: int) -> str:
    return f"{head} VALUES {','.join([row] * n)}"


@functools.lru_cache(maxsize=256)
def in_sql(head: str, n: int) -> str:
    """``head IN (?,?,...)`` with ``n`` marks."""
    return f"{head} IN ({','.join('?' * n)})"


def insert_rows(conn: sqlite3.Connection, head: str, row: str,
                rows: Sequence[tuple[Any, ...]]) -> None:
    """``head VALUES row, row, ...``: one statement per chunk instead of one step per row.

    Why: the sqlite3 module releases the GIL around every step and must take
    it back after. While the event loop is busy, taking it back waits, so
    fewer steps mean fewer waits.
    """
    for start, size in chunks(len(rows)):
        conn.execute(_rows_sql(head, row, size),
                     [value for r in rows[start:start + size] for value in r])


def delete_in(conn: sqlite3.Connection, head: str, ids: Sequence[int]) -> int:
    """``head IN (ids)`` in chunks (see insert_rows); the number of rows deleted."""
    return sum(conn.execute(in_sql(head, size), ids[start:start + size]).rowcount
               for start, size in chunks(len(ids)))
