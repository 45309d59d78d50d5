"""Connection pools: many messages share a few connections to a next hop, a
connection carries at most ``messages_per_connection``, idle ones are closed."""

from __future__ import annotations

import pytest

from tests.conftest import RelayFactory, Sink
from tests.delivery_fake import InProcessTransport
from tests.test_queue_support import eventually, submit

# In the delivery agent process (relayd), and in this process (the test fake).
IN_PROCESS = pytest.mark.parametrize("in_process", [False, True], ids=["agent", "in-process"])


@IN_PROCESS
async def test_hundred_messages_use_few_connections(relay_factory: RelayFactory, sink: Sink,
                                                    in_process: bool) -> None:
    """100 messages to one next hop arrive over far fewer than 100 connections."""
    relay = await relay_factory(in_process=in_process)
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@dest.test"], count=100)
    await sink.wait_for(100)
    assert sink.connections <= 20  # connections_per_host
    assert relay.relay.deliverer.connections_opened == sink.connections


@IN_PROCESS
async def test_messages_per_connection_cap(relay_factory: RelayFactory, sink: Sink,
                                           in_process: bool) -> None:
    """After ``messages_per_connection`` messages a connection is closed and a new one opened."""
    relay = await relay_factory({"delivery": {"connections_per_host": 1,
                                              "messages_per_connection": 10}},
                                in_process=in_process)
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@dest.test"], count=30)
    await sink.wait_for(30)
    assert sink.connections == 3


async def test_idle_connections_are_closed(relay_factory: RelayFactory, sink: Sink) -> None:
    """A pooled connection unused for ``idle_connection_seconds`` is closed with QUIT."""
    relay = await relay_factory({"delivery": {"idle_connection_seconds": 0.2}},
                                in_process=True)  # reads the pool
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@dest.test"])
    await sink.wait_for(1)
    transport = relay.relay.agents
    assert isinstance(transport, InProcessTransport)
    [pool] = transport.pools._pools.values()

    async def closed() -> bool:
        return not pool._idle and not pool._closing

    await eventually(closed, timeout=3)
    await submit(relay, account, ["s@dest.test"])
    await sink.wait_for(2)
    assert sink.connections == 2
