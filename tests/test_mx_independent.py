"""Independent destinations (issue 17 item 5): the recipients of one message to different
domains are routed, sent, committed and retried each on their own, so a slow DNS answer
or a slow MX for one never delays another. Over loopback: the tests' DNS server, a sink
for the fast domain, a silent name server entry or a silent MX for the slow one; and the
dispatcher built directly (tests/test_dispatch_unit.py's rig) for the per-group commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relayd.delivery.client import Hop
from relayd.delivery.routing import NullMxRouteError
from tests import test_delivery_routing as routing
from tests import test_dispatch_unit as dispatch_unit
from tests.conftest import Sink
from tests.dnsserver import DnsServer
from tests.fake_sender import FakeSender
from tests.test_delivery_routing import ZONE, MxRelay
from tests.test_dispatch_unit import Rig
from tests.test_queue_support import eventually, message_log, submit

mx_relay = routing.mx_relay  # the routing tests' relay in MX mode (uses ``dns`` below)
rig, spool, dlog = dispatch_unit.rig, dispatch_unit.spool, dispatch_unit.dlog  # its fixtures

SLOW_ZONE = {
    **ZONE,
    "slow.test": {"MX": ["10 mx.slow.test."]},  # silent while the test wants it slow
    "mx.slow.test": {"A": ["127.0.0.1"]},
    "hang.test": {"MX": ["10 mx.hang.test."]},
    "mx.hang.test": {"A": ["127.0.0.3"]},  # accepts TCP, never greets
}


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    """A DNS server on loopback answering from SLOW_ZONE (overrides the routing tests')."""
    async with DnsServer(dict(SLOW_ZONE)) as server:
        yield server


@pytest.fixture
async def hanging_mx(sink: Sink) -> AsyncIterator[list[float]]:
    """An MX on 127.0.0.3 (the sink's port) that accepts connections and never greets;
    yields the times connections arrived."""
    arrived: list[float] = []
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(time.time())
        writers.append(writer)
        await reader.read()  # until the relay gives up and closes

    server = await asyncio.start_server(hold, "127.0.0.3", sink.port)
    yield arrived
    server.close()
    for w in writers:
        w.close()
    await server.wait_closed()


def by_rcpt(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest log entry of each recipient."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:  # newest first
        out.setdefault(e["recipient"], e)
    return out


async def test_a_timing_out_mx_lookup_does_not_delay_another_domain(
        mx_relay: MxRelay, sink: Sink, dns: DnsServer) -> None:
    """The fast domain is delivered, and its result committed, while the other domain's
    MX lookup is still waiting for an answer; that one is deferred when it gives up."""
    dns.silent.add("slow.test")
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    [mid] = await submit(relay, account, ["r@slow.test", "r@dest.test"])
    [got] = await sink.wait_for(1, timeout=20)
    got_at = time.time()
    assert got.rcpt_tos == ["r@dest.test"]
    entries = by_rcpt(await message_log(relay, mid, 2))
    fast, slow = entries["r@dest.test"], entries["r@slow.test"]
    assert fast["outcome"] == "delivered"
    assert slow["outcome"] == "deferred" and "MX lookup failed" in slow["text"]
    # The lookup gives up after its 5 s timeout; the other domain did not wait for it:
    # neither its delivery nor the commit of its result.
    assert got_at < slow["ts"] - 2, (got_at, slow["ts"])
    assert fast["ts"] < slow["ts"] - 2, (fast["ts"], slow["ts"])
    assert dns.count("slow.test", "MX") >= 1


async def test_a_hanging_mx_does_not_hold_another_domain(
        mx_relay: MxRelay, sink: Sink, hanging_mx: list[float]) -> None:
    """An MX that accepts the connection and never greets holds only its own recipient:
    the other domain's is delivered meanwhile; the hanging one is deferred at the
    connect timeout."""
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    [mid] = await submit(relay, account, ["r@hang.test", "r@dest.test"])
    [got] = await sink.wait_for(1, timeout=20)
    got_at = time.time()
    assert got.rcpt_tos == ["r@dest.test"]
    entries = by_rcpt(await message_log(relay, mid, 2))
    hung = entries["r@hang.test"]
    assert hanging_mx, "the hanging MX was never connected to"
    assert hung["outcome"] == "deferred" and hung["code"] is None
    assert hung["next_hop"].startswith("mx.hang.test[127.0.0.3]:")
    # connect_timeout_seconds is 3 in the tests' configuration
    assert got_at < hung["ts"] - 1.5, (got_at, hung["ts"])
    assert entries["r@dest.test"]["ts"] < hung["ts"] - 1.5


async def test_each_recipient_is_retried_on_its_own(mx_relay: MxRelay, sink: Sink,
                                                   dns: DnsServer) -> None:
    """After one domain's lookup failed and another's delivery succeeded, a retry goes
    to the deferred recipient only: the delivered one never gets a second copy."""
    dns.servfail.add("slow.test")
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    [mid] = await submit(relay, account, ["r@slow.test", "r@dest.test", "s@slow.test"])
    entries = by_rcpt(await message_log(relay, mid, 3))
    assert {r: e["outcome"] for r, e in entries.items()} == {
        "r@dest.test": "delivered", "r@slow.test": "deferred", "s@slow.test": "deferred"}
    assert [m.rcpt_tos for m in sink.messages] == [["r@dest.test"]]
    dns.servfail.discard("slow.test")
    await relay.ctl.ok("POST", "/v1/queue/retry", {})
    await sink.wait_for(2, timeout=20)
    assert sorted(sink.messages[1].rcpt_tos) == ["r@slow.test", "s@slow.test"]

    async def all_final() -> dict[str, dict[str, Any]] | None:
        now = by_rcpt(await message_log(relay, mid, 5))
        return now if all(e["outcome"] == "delivered" for e in now.values()) else None

    await eventually(all_final)
    await asyncio.sleep(0.3)
    assert len(sink.messages) == 2  # the first domain's recipient was not sent again


# -- the dispatcher built directly (tests/test_dispatch_unit.py's rig) ----------------------
class GatedSender(FakeSender):
    """A FakeSender whose route for ``gated`` domains waits until the test opens the gate."""

    def __init__(self, gated: set[str]) -> None:
        super().__init__()
        self.gated = gated
        self.gate = asyncio.Event()

    async def route(self, domain: str) -> list[Hop]:
        if domain in self.gated:
            await self.gate.wait()
        return await super().route(domain)


def gated_rig(rig: Rig, gated: set[str]) -> GatedSender:
    sender = GatedSender(gated)
    rig.sender = sender
    rig.dispatcher.sender = sender
    return sender


async def _spool_rows(rig: Rig) -> dict[str, str]:
    return {r.rcpt: r.status for m in await rig.spool.pending_messages() for r in m.recipients}


async def test_a_destination_that_ends_first_is_committed_while_another_waits(rig: Rig) -> None:
    """The fast domain's result reaches the spool while the slow domain's route is still
    pending; the attempt's own commit then ends the message."""
    sender = gated_rig(rig, {"slow.test"})
    q = await rig.commit(["a@slow.test", "b@fast.test"])
    task = asyncio.ensure_future(rig.dispatcher.run(q))
    await eventually(lambda: _fast_committed(rig))
    assert not task.done() and [s.rcpts for s in sender.sent] == [["b@fast.test"]]
    sender.gate.set()
    await task
    await rig.settled()
    assert sorted(await rig.log()) == [("a@slow.test", "delivered"), ("b@fast.test", "delivered")]
    assert await rig.spool.pending_messages() == []
    led = rig.dispatcher.ledger
    assert not led.holds(q.id) and not led.is_live(q) and rig.lost == 0
    assert (led.at_sender, led.recording, led.running) == (0, 0, 0)
    assert rig.account.total_sent == 2 and not rig.dispatcher._parts


async def _fast_committed(rig: Rig) -> bool:
    return ("b@fast.test", "delivered") in await rig.log()


async def test_a_failed_destination_waits_for_the_one_dsn(rig: Rig) -> None:
    """A destination whose recipient failed is not committed on its own: the attempt's
    one DSN names every failure, and comes before their commit."""
    sender = gated_rig(rig, {"slow.test"})
    sender.no_route["null.test"] = NullMxRouteError()
    sender.replies["c@fast.test"] = (550, "5.1.1 no such user")
    q = await rig.commit(["a@slow.test", "b@null.test", "c@fast.test", "d@fast.test"])
    task = asyncio.ensure_future(rig.dispatcher.run(q))
    await eventually(lambda: _sent_to(sender, "c@fast.test"))
    await asyncio.sleep(0.05)
    assert await rig.log() == []  # nothing failed is committed before the DSN
    sender.gate.set()
    await task
    await rig.settled()
    assert rig.bounced == [(q.id, ["b@null.test", "c@fast.test"], True)]
    assert sorted(await rig.log()) == [("a@slow.test", "delivered"), ("b@null.test", "failed"),
                                       ("c@fast.test", "failed"), ("d@fast.test", "delivered")]
    assert await rig.spool.pending_messages() == [] and rig.lost == 0


async def _sent_to(sender: FakeSender, rcpt: str) -> bool:
    return any(rcpt in s.rcpts for s in sender.sent)
