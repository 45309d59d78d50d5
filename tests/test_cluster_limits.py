"""Sending limits across the nodes of a cluster (SEMANTICS §7): quota leased from one
PostgreSQL database, so "N per minute" holds for the account whichever nodes its mail
was submitted to. Three real nodes in this process, one injected clock standing still."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

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
