"""Routing: MX mode against a real DNS server on loopback, null MX, implicit MX,
fallback to the next MX, and static routes overriding the smarthost."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relayd.app import Relay
from tests.conftest import (
    RelayFactory,
    RelayHandle,
    Sink,
    make_config,
    start_relay,
    start_sink,
)
from tests.dnsserver import DnsServer
from tests.test_queue_support import eventually, log_entries, message_log, submit

ZONE = {
    "example.com": {"MX": ["10 mx.example.com."]},  # where bounces to the sender go
    "mx.example.com": {"A": ["127.0.0.1"]},
    "dest.test": {"MX": ["10 mx1.dest.test."]},
    "mx1.dest.test": {"A": ["127.0.0.1"]},
    "bare.test": {"A": ["127.0.0.1"]},  # no MX: the implicit MX is the domain itself
    "null.test": {"MX": ["0 ."]},
    "two.test": {"MX": ["10 down.two.test.", "20 up.two.test."]},
    "down.two.test": {"A": ["127.0.0.2"]},  # loopback, nothing listens there
    "up.two.test": {"A": ["127.0.0.1"]},
}


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    """A DNS server on loopback answering from ZONE."""
    async with DnsServer(dict(ZONE)) as server:
        yield server


MxRelay = Callable[..., Awaitable[RelayHandle]]


@pytest.fixture
async def mx_relay(tmp_path: Path, sink: Sink, dns: DnsServer) -> AsyncIterator[MxRelay]:
    """Start a relay in MX mode whose MX hosts listen on the sink's port."""
    started: list[Relay] = []

    async def start(extra: dict[str, Any] | None = None) -> RelayHandle:
        cfg = make_config(tmp_path, sink.address, extra)
        delivery = msgspec.structs.replace(
            cfg.delivery, mode="mx", dns_nameservers=(f"{dns.host}:{dns.port}",),
            mx_port=sink.port, mx_allowed_networks=("127.0.0.0/8",))  # the zone's MX hosts
        cfg = msgspec.structs.replace(cfg, delivery=delivery)
        handle = await start_relay(cfg, started)
        await handle.ctl.add_domain("example.com")
        return handle

    yield start
    for r in started:
        await r.stop()


async def test_mx_mode_delivers_to_the_mx_host(mx_relay: MxRelay, sink: Sink,
                                               dns: DnsServer) -> None:
    """In MX mode the recipient domain's MX is looked up and its address receives the mail."""
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@dest.test"])
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["r@dest.test"]
    assert dns.count("dest.test", "MX") == 1 and dns.count("mx1.dest.test", "A") == 1
    [entry] = await eventually(lambda: log_entries(relay))
    assert entry["next_hop"] == f"mx1.dest.test[127.0.0.1]:{sink.port}"


async def test_domain_without_mx_uses_its_address(mx_relay: MxRelay, sink: Sink) -> None:
    """A domain with no MX record is delivered to its own A record (implicit MX)."""
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@bare.test"])
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["r@bare.test"]


async def test_unreachable_mx_falls_back_to_the_next(mx_relay: MxRelay, sink: Sink) -> None:
    """When the best MX refuses the connection, the next MX gets the message."""
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@two.test"])
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["r@two.test"]
    [entry] = await eventually(lambda: log_entries(relay))
    assert entry["outcome"] == "delivered"


async def test_null_mx_fails_permanently_and_bounces(mx_relay: MxRelay, sink: Sink) -> None:
    """A null MX fails the recipient at once, and the sender gets a DSN through its own MX."""
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    [mid] = await submit(relay, account, ["r@null.test"], sender="app@example.com")
    [dsn] = await sink.wait_for(1)
    assert dsn.rcpt_tos == ["app@example.com"] and b"r@null.test" in dsn.data
    assert b"null MX" in dsn.data
    assert b"Status: 5.1.10" in dsn.data  # RFC 7505
    entries = await message_log(relay, mid, 1)
    assert [(e["outcome"], e["next_hop"], e["code"]) for e in entries] == [("failed", "-", 556)]
    assert "null MX" in entries[0]["text"]


async def test_dns_failure_defers(mx_relay: MxRelay, sink: Sink, dns: DnsServer) -> None:
    """A SERVFAIL on the MX lookup defers the recipient (it may pass)."""
    dns.servfail.add("dest.test")
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@dest.test"])
    [entry] = await eventually(lambda: log_entries(relay))
    assert entry["outcome"] == "deferred" and entry["code"] is None


async def test_static_route_overrides_smarthost(relay_factory: RelayFactory, sink: Sink) -> None:
    """Recipients of a routed domain go to the route; the others of the message to the
    smarthost, one transaction per next hop."""
    other = await start_sink()
    try:
        relay = await relay_factory({"delivery": {"routes": {"special.test": other.address}}})
        await relay.ctl.add_domain("example.com")
        account = await relay.ctl.add_user("example.com")
        await submit(relay, account, ["a@special.test", "b@dest.test", "c@sub.special.test",
                                      "d@dest.test"])
        [routed] = await other.wait_for(1)
        [smart] = await sink.wait_for(1)
        assert sorted(routed.rcpt_tos) == ["a@special.test", "c@sub.special.test"]
        assert sorted(smart.rcpt_tos) == ["b@dest.test", "d@dest.test"]
        hops = {e["recipient"]: e["next_hop"] for e in
                await eventually(lambda: _n_entries(relay, 4))}
        assert hops["a@special.test"] == other.address and hops["b@dest.test"] == sink.address
    finally:
        assert other.server is not None
        other.server.close()


async def test_static_route_overrides_mx(mx_relay: MxRelay, sink: Sink, dns: DnsServer) -> None:
    """In MX mode a static route is used without any DNS lookup."""
    other = await start_sink()
    try:
        relay = await mx_relay({"delivery": {"routes": {"dest.test": other.address}}})
        account = await relay.ctl.add_user("example.com")
        await submit(relay, account, ["r@dest.test"])
        [got] = await other.wait_for(1)
        assert got.rcpt_tos == ["r@dest.test"] and sink.messages == []
        assert dns.count("dest.test") == 0
    finally:
        assert other.server is not None
        other.server.close()


async def _n_entries(relay: RelayHandle, n: int) -> list[dict[str, Any]] | None:
    entries = await log_entries(relay)
    return entries if len(entries) >= n else None
