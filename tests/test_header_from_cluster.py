"""The header From switch in cluster mode: set through one node, in force on the others
when the call returns; an existing cluster database gains the column (PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster_support import start_node
from tests.conftest import RelayFactory, message
from tests.rawsmtp import Raw

pytestmark = pytest.mark.timeout(90)

FOREIGN = "550 5.7.1 From header address not allowed for this account"


async def test_switch_through_a_applies_on_b(pg_dsn: str, relay_factory: RelayFactory,
                                            tmp_path: Path) -> None:
    """Off through node a: node b accepts a foreign From at once; on again through b:
    node a refuses it again. Both nodes show the setting."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    await a.ctl.add_domain("example.com")
    user, password = await a.ctl.add_user("example.com")
    brand = message("brand", sender="news@brand.example")
    raw_b = await Raw.open(b.host, b.port)
    assert (await raw_b.login(user, password)).startswith("235 ")
    assert await raw_b.transaction("app@example.com", ["r@dest.test"], brand) == FOREIGN

    info = await a.ctl.ok("POST", "/v1/domains/example.com/settings",
                          {"check_header_from": False})
    assert info["check_header_from"] is False
    assert (await b.ctl.ok("GET", "/v1/domains/example.com"))["check_header_from"] is False
    assert (await raw_b.transaction("app@example.com", ["r@dest.test"], brand)).startswith(
        "250 2.0.0 ")

    await b.ctl.ok("POST", "/v1/domains/example.com/settings", {"check_header_from": True})
    raw_a = await Raw.open(a.host, a.port)
    assert (await raw_a.login(user, password)).startswith("235 ")
    assert await raw_a.transaction("app@example.com", ["r@dest.test"], brand) == FOREIGN
    assert await raw_b.transaction("app@example.com", ["r@dest.test"], brand) == FOREIGN
    raw_a.close()
    raw_b.close()


async def test_a_node_started_later_reads_the_switch(pg_dsn: str, relay_factory: RelayFactory,
                                                     tmp_path: Path) -> None:
    """A node that joins after the switch was turned off loads it with the domain."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    await a.ctl.add_domain("example.com")
    await a.ctl.ok("POST", "/v1/domains/example.com/settings", {"check_header_from": False})
    c = await start_node(relay_factory, pg_dsn, "c", tmp_path, "127.0.0.3")
    assert (await c.ctl.ok("GET", "/v1/domains"))["domains"][0]["check_header_from"] is False


async def test_an_older_cluster_database_gains_the_column(
        pg_dsn: str, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """A database made before the switch existed (no column): the next node to start adds
    it, with the check on for the domains already there."""
    import asyncpg  # the tests' own connection, as an operator's psql would be

    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    await a.ctl.add_domain("example.com")
    await a.stop()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("ALTER TABLE domains DROP COLUMN check_header_from")
    finally:
        await conn.close()
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    assert (await b.ctl.ok("GET", "/v1/domains/example.com"))["check_header_from"] is True
