"""The PostgreSQL test infrastructure of cluster mode (issue 15): the throwaway server of
tests/pgserver.py behind the ``pg_server``/``pg_dsn`` fixtures, and the TCP proxy of
tests/tcpproxy.py that cuts a node off from it. Real server, real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from tests.pgserver import PgServer, database_name
from tests.tcpproxy import TcpProxy

#: Seconds a query through a cut proxy may wait before the test calls it lost.
CUT_TIMEOUT = 1.0
#: What asyncpg raises on a session whose connection was closed under it (it may notice
#: on the query, or already have noticed and then refuse the closed connection).
LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError)


async def test_server_answers_select_1(pg_server: PgServer, pg_dsn: str) -> None:
    """The fixture's server answers through asyncpg, on loopback, in the test's own database."""
    assert pg_dsn.startswith(f"postgresql://postgres@127.0.0.1:{pg_server.port}/")
    conn = await asyncpg.connect(pg_dsn, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == database_name(pg_dsn)
        assert await conn.fetchval("SHOW fsync") == "off"
    finally:
        await conn.close()


async def test_databases_are_distinct(pg_server: PgServer, pg_dsn: str) -> None:
    """Two databases from the server are separate: a table in one is not in the other;
    a dropped database is gone."""
    other = pg_server.create_database()
    assert other != pg_dsn
    first = await asyncpg.connect(pg_dsn, timeout=5)
    try:
        await first.execute("CREATE TABLE mark (n int); INSERT INTO mark VALUES (1)")
        second = await asyncpg.connect(other, timeout=5)
        try:
            with pytest.raises(asyncpg.UndefinedTableError):
                await second.fetchval("SELECT n FROM mark")
        finally:
            await second.close()
    finally:
        await first.close()
    pg_server.drop_database(database_name(other))
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(other, timeout=5)


async def test_restart_keeps_data(pg_server: PgServer, pg_dsn: str) -> None:
    """restart() cuts open sessions and comes back on the same port with the data."""
    port = pg_server.port
    conn = await asyncpg.connect(pg_dsn, timeout=5)
    await conn.execute("CREATE TABLE kept (word text); INSERT INTO kept VALUES ('still here')")
    await asyncio.to_thread(pg_server.restart)
    assert pg_server.port == port
    with pytest.raises(LOST):
        await conn.fetchval("SELECT 1", timeout=5)
    conn.terminate()
    conn = await asyncpg.connect(pg_dsn, timeout=5)
    try:
        assert await conn.fetchval("SELECT word FROM kept") == "still here"
    finally:
        await conn.close()


async def test_proxy_forwards_cuts_and_restores(pg_server: PgServer, pg_dsn: str) -> None:
    """Through the proxy a query works; after cut() the open session is reset and a new
    connection hangs (no reply, so it times out); after restore() a new one works."""
    async with TcpProxy("127.0.0.1", pg_server.port) as proxy:
        via = pg_dsn.replace(f":{pg_server.port}/", f":{proxy.port}/")
        conn = await asyncpg.connect(via, timeout=5)
        assert await conn.fetchval("SELECT 41 + 1") == 42
        assert proxy.forwarded == 1

        proxy.cut()
        with pytest.raises(LOST):
            await conn.fetchval("SELECT 1", timeout=CUT_TIMEOUT)
        conn.terminate()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncpg.connect(via, timeout=CUT_TIMEOUT)
        assert time.monotonic() - started >= CUT_TIMEOUT * 0.9
        assert proxy.held == 1 and proxy.forwarded == 1

        proxy.restore()
        assert proxy.held == 0
        conn = await asyncpg.connect(via, timeout=5)
        try:
            assert await conn.fetchval("SELECT 2") == 2
        finally:
            await conn.close()
        assert proxy.forwarded == 2


async def test_proxy_close_ends_connections(pg_server: PgServer, pg_dsn: str) -> None:
    """close() stops listening and ends forwarded sessions: nothing outlives the proxy."""
    proxy = TcpProxy("127.0.0.1", pg_server.port)
    await proxy.start()
    via = pg_dsn.replace(f":{pg_server.port}/", f":{proxy.port}/")
    conn = await asyncpg.connect(via, timeout=5)
    await asyncio.wait_for(proxy.close(), 5)
    with pytest.raises(LOST):
        await conn.fetchval("SELECT 1", timeout=CUT_TIMEOUT)
    conn.terminate()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(via, timeout=CUT_TIMEOUT)


def test_missing_server_names_make_debs(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    """With no PostgreSQL where $PG_BINDIR says, the test fails naming ``make debs``."""
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="make debs"):
        PgServer()
