"""Sending limits across the nodes of a cluster (SEMANTICS §7): quota leased from one
PostgreSQL database, so "N per minute" holds for the account whichever nodes its mail
was submitted to. Three real nodes in this process, one injected clock standing still."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relayd.cluster.node import open_database
from relayd.store.pgdirectory import PgDirectory, Window
from tests.cluster_support import three_nodes
from tests.conftest import RelayFactory, Sink
from tests.test_queue_support import FakeClock, eventually, install_clock, queue_items, submit

pytestmark = pytest.mark.timeout(90)


async def test_per_minute_limit_holds_across_three_nodes(
        relay_factory: RelayFactory, pg_dsn: str, tmp_path: Path, sink: Sink) -> None:
    """A limit of 100 per minute, 50 messages submitted to each of three nodes within one
    minute: exactly 100 are delivered and 50 wait for the limit, with the minute's end as
    reset time; once the clock passes it, the other 50 go."""
    nodes = await three_nodes(relay_factory, pg_dsn, tmp_path)
    clock = FakeClock()
    for node in nodes:
        install_clock(node, clock)
    a = nodes[0]
    await a.ctl.add_domain("example.com")
    account = await a.ctl.add_user("example.com")
    await a.ctl.ok("POST", f"/v1/users/{account[0]}/limits", {"per_minute": 100})

    await asyncio.gather(*(submit(node, account, ["r@dest.test"], count=50,
                                  subject=node.host) for node in nodes))
    reset = clock.now - clock.now % 60 + 60

    async def fifty_waiting() -> list[dict[str, object]] | None:
        items = [i for node in nodes for i in await queue_items(node)]
        waiting = [i for i in items if i["state"] == "waiting_limit"]
        return waiting if len(items) == 50 and len(waiting) == 50 else None

    waiting = await eventually(fifty_waiting, timeout=30)
    assert all(w["reset_at"] == reset for w in waiting)
    await sink.wait_for(100)
    await asyncio.sleep(0.3)
    assert len(sink.messages) == 100

    clock.advance(reset - clock.now)
    for node in nodes:
        node.relay.scheduler.wake()
    await sink.wait_for(150, timeout=30)
    for node in nodes:
        assert await queue_items(node) == []
    assert len(sink.messages) == 150


async def test_concurrent_leases_never_pass_the_limit(pg_dsn: str) -> None:
    """Thirty leases racing from three connections' pools for one account's minute and
    hour: the units granted add up to the tighter limit exactly, never more."""
    dbs = [await open_database(pg_dsn, None, 5.0, 5.0) for _ in range(3)]
    try:
        stores = [PgDirectory(db, f"n{i}", seal=bytes, unseal=bytes)
                  for i, db in enumerate(dbs)]
        await stores[0].ensure_schema()
        windows = [Window(60, 1_700_000_040, 100), Window(3600, 1_699_999_200, 90)]
        answers = await asyncio.gather(*(stores[i % 3].lease(7, windows, 7)
                                          for i in range(30)))
        minute = sum(g.granted for grants in answers for g in grants if g.period == 60)
        hour = sum(g.granted for grants in answers for g in grants if g.period == 3600)
        assert minute == hour == 90
        [again] = [await stores[1].lease(7, windows, 5)]
        assert [(g.granted, g.remaining) for g in again] == [(0, 10), (0, 0)]
        await stores[2].prune_quota(1_700_000_040 + 3600 + 1)
        fresh = await stores[2].lease(7, windows, 5)
        assert [g.granted for g in fresh] == [5, 5]  # both windows' rows were pruned
    finally:
        for db in dbs:
            await db.close()
