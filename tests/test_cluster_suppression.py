"""The suppression list in cluster mode: learnt on node a, in force on node b (through the
PostgreSQL table and the change log); removed through b, sent again from a; loaded by a
node that joins later."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.cluster_support import start_node
from tests.conftest import RelayFactory, RelayHandle, Sink
from tests.test_suppression import GONE, LIST, Asked, listed, outcome, send

pytestmark = pytest.mark.timeout(120)


async def applied(node: RelayHandle, domain: str, present: bool) -> None:
    """Wait until ``node`` has (or no longer has) GONE suppressed in memory."""
    relay = node.relay
    dom = relay.directory.active_domain(domain)
    assert dom is not None
    deadline = time.monotonic() + 10
    while (relay.directory.suppressions.find(dom.id, GONE, time.time()) is not None) != present:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_suppressed_on_a_not_sent_from_b(pg_dsn: str, relay_factory: RelayFactory,
                                               sink: Sink, tmp_path: Path) -> None:
    sink.rcpt_script = asked = Asked({GONE: "550 5.1.1 No such user"})
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    await a.ctl.add_domain("example.com")
    account = await a.ctl.add_user("example.com")

    e = await outcome(a, await send(a, account, GONE))
    assert e["outcome"] == "failed" and asked.count[GONE] == 1
    await applied(b, "example.com", True)
    assert await listed(b) == [GONE]  # the shared table, read through b

    e = await outcome(b, await send(b, account, GONE))
    assert e["outcome"] == "suppressed" and "No such user" in e["text"]
    assert asked.count[GONE] == 1  # node b never offered it to the next hop

    c = await start_node(relay_factory, pg_dsn, "c", tmp_path, "127.0.0.3")
    await applied(c, "example.com", True)  # loaded at start

    removed = await b.ctl.ok("POST", LIST + "/remove", {"address": GONE})
    assert sorted(removed["propagation"]["acknowledged"]) == ["a", "b", "c"]
    await applied(a, "example.com", False)  # already applied when the call returned
    del asked[GONE]
    e = await outcome(a, await send(a, account, GONE))
    assert e["outcome"] == "delivered" and asked.count[GONE] == 2
