"""The PostgreSQL client of cluster mode: the one module that imports asyncpg.

Owns: opening a pool of connections to the cluster's database (the DSN and the
password are passed in; neither is ever logged here), running a function inside
one transaction, single statements, a dedicated LISTEN connection with its
notification and loss callbacks, and translating asyncpg's exceptions into the
three this package's callers handle: :class:`Unavailable` (the database cannot be
reached, the connection broke or a call timed out: try again later),
:class:`UniqueViolation` (a unique constraint refused a row, with its name) and
:class:`PgError` (anything else the server refused).

Why asyncpg: it runs on the event loop (uvloop's authors wrote both), delivers
LISTEN notifications as callbacks on that loop without a thread, and prepares
and caches statements by itself.

Untrusted input: none (SQL comes from relayd.store; values are always bound).
See also: relayd.store.pgdirectory (the SQL), relayd.cluster.node (its user).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

Row = Sequence[Any]


class PgError(Exception):
    """PostgreSQL refused a statement."""


class Unavailable(PgError):
    """The database could not be reached, the connection broke, or a call timed out."""


class UniqueViolation(PgError):
    """A unique constraint (``constraint``) refused a row."""

    def __init__(self, constraint: str) -> None:
        super().__init__(f"unique constraint {constraint} violated")
        self.constraint = constraint


@functools.cache
def _asyncpg() -> ModuleType:
    """asyncpg, imported at the first use: a single node never loads it (~14 MiB of RSS)."""
    import asyncpg

    return asyncpg


@functools.cache
def _lost() -> tuple[type[BaseException], ...]:
    pg = _asyncpg()
    return (OSError, asyncio.TimeoutError, TimeoutError, pg.InterfaceError,
            pg.PostgresConnectionError, pg.exceptions.ConnectionDoesNotExistError,
            pg.exceptions.CannotConnectNowError, pg.exceptions.AdminShutdownError,
            pg.exceptions.TooManyConnectionsError)


@contextlib.asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    pg = _asyncpg()
    try:
        yield
    except pg.UniqueViolationError as exc:
        raise UniqueViolation(exc.constraint_name or "?") from None
    except _lost() as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}") from None
    except pg.PostgresError as exc:
        raise PgError(f"{type(exc).__name__}: {exc}") from None


async def _keep_session(conn: Any) -> None:
    """A pooled connection handed back as it is (relayd leaves no session state)."""
    return None


class Tx(Protocol):
    """The statements a transaction function may run (``$1``-style placeholders)."""

    async def execute(self, sql: str, *args: Any) -> str: ...
    async def executemany(self, sql: str, args: Any) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Any: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...


class Listener:
    """A connection that LISTENs on channels until closed or lost."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @property
    def lost(self) -> bool:
        return bool(self._conn.is_closed())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._conn.close(), 2.0)
        if not self._conn.is_closed():
            self._conn.terminate()


class Database:
    """A pool of connections to one PostgreSQL database."""

    def __init__(self, dsn: str, password: str | None, *, connect_timeout: float,
                 command_timeout: float) -> None:
        self._dsn = dsn
        self._password = password
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None
        self._light: Any = None  # bookkeeping writes, committed without waiting for fsync

    async def open(self, *, min_size: int = 1, max_size: int = 4) -> None:
        """Connect (Unavailable if the database does not answer within the timeout).

        Two pools: one for everything that must be durable when it returns, and one
        connection whose commits do not wait for the disk (``synchronous_commit=off``)
        for writes a crash may lose without harm (:meth:`execute_light`). Neither resets
        a connection's session state when it is handed back (relayd leaves none: no
        session locks, settings or LISTEN on pooled connections), which saves four
        statements per use."""
        async with _translated():
            self._pool = await asyncio.wait_for(self._new_pool(min_size, max_size, {}),
                                                self._connect_timeout * 2)
            self._light = await asyncio.wait_for(
                self._new_pool(1, 1, {"synchronous_commit": "off"}), self._connect_timeout * 2)

    def _new_pool(self, min_size: int, max_size: int, settings: dict[str, str]) -> Any:
        return _asyncpg().create_pool(
            self._dsn, password=self._password, min_size=min_size, max_size=max_size,
            timeout=self._connect_timeout, command_timeout=self._command_timeout,
            server_settings=settings, reset=_keep_session)

    async def close(self) -> None:
        for pool in (self._pool, self._light):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 2.0)
                except Exception:
                    pool.terminate()
        self._pool = self._light = None

    async def transaction(self, fn: Callable[[Tx], Awaitable[T]], *,
                          within: float | None = None) -> T:
        """Run ``fn`` in one transaction (committed if it returns, rolled back if it raises)."""
        limit = within or self._command_timeout

        async def run() -> T:
            async with self._pool.acquire() as conn, conn.transaction():
                return await fn(conn)

        async with _translated():
            return await asyncio.wait_for(run(), limit)

    async def fetch(self, sql: str, *args: Any, within: float | None = None) -> list[Any]:
        async with _translated():
            return list(await self._pool.fetch(sql, *args, timeout=within))

    async def fetchrow(self, sql: str, *args: Any, within: float | None = None) -> Any:
        async with _translated():
            return await self._pool.fetchrow(sql, *args, timeout=within)

    async def fetchval(self, sql: str, *args: Any, within: float | None = None) -> Any:
        async with _translated():
            return await self._pool.fetchval(sql, *args, timeout=within)

    async def execute(self, sql: str, *args: Any, within: float | None = None) -> str:
        async with _translated():
            return str(await self._pool.execute(sql, *args, timeout=within))

    async def execute_light(self, sql: str, *args: Any, within: float | None = None) -> str:
        """One statement whose commit does not wait for the disk: after a crash of the
        database it may be lost (for records that are safe to lose: this node's applied
        version, its heartbeat)."""
        async with _translated():
            return str(await self._light.execute(sql, *args, timeout=within))

    async def fetchval_light(self, sql: str, *args: Any, within: float | None = None) -> Any:
        """:meth:`execute_light` returning the first value."""
        async with _translated():
            return await self._light.fetchval(sql, *args, timeout=within)

    async def listen(self, channels: Sequence[str], on_notify: Callable[[str, str], None],
                     on_lost: Callable[[], None]) -> Listener:
        """A new connection LISTENing on ``channels``: ``on_notify(channel, payload)`` per
        notification, ``on_lost()`` once if the connection ends by itself."""
        async with _translated():
            conn = await _asyncpg().connect(self._dsn, password=self._password,
                                         timeout=self._connect_timeout,
                                         command_timeout=self._command_timeout)
            try:
                for channel in channels:
                    await conn.add_listener(
                        channel, lambda _c, _pid, ch, payload: on_notify(ch, payload))
                conn.add_termination_listener(lambda _c: on_lost())
            except BaseException:
                conn.terminate()
                raise
        return Listener(conn)
