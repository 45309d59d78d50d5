"""Issue 12 item 6: address literals and MX answers cannot aim mail at internal hosts.

Over real sockets: a relay in-process, a DNS server on loopback (tests/dnsserver.py)
whose MX hosts are the sink's loopback address, and the sink listening there to
prove that nothing arrives. Plus pure tests of the address classification
(relayd.smtp.policy.DestinationPolicy) and of the literal parser (relayd.smtp.address).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relayd import config
from relayd.app import Relay
from relayd.delivery.mx import MxResolver, NextHop, RefusedRouteError, TemporaryRouteError
from relayd.smtp import policy, replies
from relayd.smtp.address import is_address_literal, literal_ip, parse_rcpt_to
from tests.conftest import Ctl, RelayFactory, RelayHandle, Sink, _merge, make_config
from tests.dnsserver import DnsServer
from tests.rawsmtp import Raw
from tests.test_ops_support import scrape, value
from tests.test_queue_support import eventually, log_entries, submit

LITERALS = ["a@[127.0.0.1]", "a@[169.254.169.254]", "a@[10.0.0.1]", "a@[IPv6:::1]"]

ZONE = {
    "loop.test": {"MX": ["10 mx.loop.test."]},
    "mx.loop.test": {"A": ["127.0.0.1"]},
    "meta.test": {"MX": ["10 mx.meta.test."]},
    "mx.meta.test": {"A": ["169.254.169.254"]},
    "internal.test": {"MX": ["10 mx.internal.test."]},
    "mx.internal.test": {"A": ["10.0.0.1"]},
}


# --- pure: classification and the RCPT decision ----------------------------------
@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::7f00:1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "private"), ("fd00::1", "private"), ("::ffff:10.0.0.1", "private"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"),
    ("2001:db8::1", "reserved"),
    ("8.8.8.8", "global"), ("2606:4700::1", "global"), ("64:ff9b::808:808", "global"),
    ("not-an-ip", "invalid"),
])
def test_destination_class(address: str, kind: str) -> None:
    """Each address falls in the class the stdlib ipaddress properties give it."""
    assert policy.destination_class(address) == kind


def test_default_destination_policy_allows_only_global_addresses() -> None:
    """By default every non-global address is refused with its class as the reason."""
    p = policy.DestinationPolicy()
    assert p.refusal("8.8.8.8") is None
    assert [p.refusal(a) for a in ("127.0.0.1", "169.254.169.254", "10.0.0.1", "::1")] == [
        "loopback", "link-local", "private", "loopback"]


def test_allow_private_opens_private_addresses_only() -> None:
    """mx_allow_private lets RFC 1918 / CGNAT / ULA through, never loopback or link-local."""
    p = policy.DestinationPolicy(allow_private=True)
    assert [p.refusal(a) for a in ("10.0.0.1", "100.64.0.1", "fd00::1")] == [None] * 3
    assert p.refusal("127.0.0.1") == "loopback"
    assert p.refusal("169.254.169.254") == "link-local"


def test_allowed_networks_open_exactly_the_listed_networks() -> None:
    """A listed network is allowed, even loopback; others stay refused."""
    p = policy.DestinationPolicy(allowed_networks=["127.0.0.0/8", "10.1.2.0/24"])
    assert [p.refusal(a) for a in ("127.0.0.2", "::ffff:127.0.0.1", "10.1.2.3")] == [None] * 3
    assert p.refusal("10.1.3.1") == "private"
    assert p.refusal("::1") == "loopback"


def test_unspecified_and_multicast_are_never_allowed() -> None:
    """0.0.0.0 (which reaches the local host) and multicast stay refused whatever is listed."""
    p = policy.DestinationPolicy(allow_private=True, allowed_networks=["0.0.0.0/0", "::/0"])
    assert [p.refusal(a) for a in ("0.0.0.0", "::", "224.0.0.1")] == [
        "unspecified", "unspecified", "multicast"]
    assert p.refusal("127.0.0.1") is None


def test_literal_ip_parses_both_literal_forms() -> None:
    """literal_ip gives the address of [IPv4] and [IPv6:...], None for a domain name."""
    assert str(literal_ip("[127.0.0.1]")) == "127.0.0.1"
    assert str(literal_ip("[IPv6:::1]")) == "::1"
    assert literal_ip("example.com") is None
    for bad in ("[IPv6:1.2.3.4]", "[::1]", "[300.1.1.1]", "[127.0.0.1"):
        with pytest.raises(ValueError):
            literal_ip(bad)


def test_recipient_domain_allowed_refuses_literals_unless_allowed() -> None:
    """A parsed literal recipient gets ADDRESS_LITERAL unless literals are allowed."""
    domain = parse_rcpt_to("TO:<a@[IPv6:::1]>", smtputf8=False).domain
    assert is_address_literal(domain) and not is_address_literal("example.com")
    assert policy.recipient_domain_allowed(domain, allow_literals=False) \
        is replies.ADDRESS_LITERAL
    assert replies.ADDRESS_LITERAL.text.startswith("550 5.7.1 ")
    assert replies.ADDRESS_LITERAL.reason == "address_literal"
    assert policy.recipient_domain_allowed(domain, allow_literals=True) is None
    assert policy.recipient_domain_allowed("example.com", allow_literals=False) is None


def test_settings_default_to_refusing_and_bad_networks_name_the_key() -> None:
    """Literals and private MX addresses are off by default; a bad network names its key."""
    cfg = config.Config()
    assert cfg.smtp.allow_address_literals is False
    assert (cfg.delivery.mx_allow_private, cfg.delivery.mx_allowed_networks) == (False, ())
    for bad in ("10.0.0.1/8", "not-a-net"):
        with pytest.raises(config.ConfigError, match="mx_allowed_networks"):
            config.loads(f'[delivery]\nmx_allowed_networks = ["{bad}"]\n')


# --- the resolver against a real DNS server --------------------------------------
@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    """A DNS server on loopback answering from ZONE."""
    async with DnsServer(dict(ZONE)) as server:
        yield server


def _resolver(dns: DnsServer, destinations: policy.DestinationPolicy | None = None
              ) -> MxResolver:
    return MxResolver([dns.host], port=dns.port, timeout=0.5, rand=random.Random(1),
                      destinations=destinations)


@pytest.mark.parametrize("domain", ["loop.test", "meta.test", "internal.test"])
async def test_resolver_refuses_internal_mx_addresses(dns: DnsServer, domain: str) -> None:
    """An MX whose only address is loopback, link-local or private gives a refusal naming it."""
    with pytest.raises(RefusedRouteError, match=rf"\(\w[\w-]+\) of mx\.{domain}"):
        await _resolver(dns).resolve(domain)


async def test_resolver_skips_refused_addresses_keeps_usable_ones(dns: DnsServer) -> None:
    """Refused addresses (A and AAAA) are dropped; the MX host's global address remains."""
    dns.zone = {"mixed.test": {"MX": ["10 mx.mixed.test.", "20 b.mixed.test."]},
                "mx.mixed.test": {"A": ["127.0.0.1", "8.8.8.8"],
                                  "AAAA": ["::1", "::ffff:10.0.0.1"]},
                "b.mixed.test": {"A": ["169.254.169.254"]}}
    hops = await _resolver(dns).resolve("mixed.test")
    assert hops == [NextHop("8.8.8.8", 25, "mx.mixed.test")]


async def test_refused_and_temporary_failure_is_temporary(dns: DnsServer) -> None:
    """When another MX host's lookup failed temporarily, a refusal only defers."""
    dns.zone = {"t.test": {"MX": ["10 mx.t.test.", "20 b.t.test."]},
                "mx.t.test": {"A": ["127.0.0.1"]}}
    dns.servfail.add("b.t.test")
    with pytest.raises(TemporaryRouteError, match=r"refused addresses: 127\.0\.0\.1"):
        await _resolver(dns).resolve("t.test")


async def test_resolver_uses_listed_and_private_networks(dns: DnsServer) -> None:
    """With the network listed (or private allowed) the MX address is returned."""
    listed = policy.DestinationPolicy(allowed_networks=["127.0.0.0/8", "169.254.0.0/16"])
    assert [h.host for h in await _resolver(dns, listed).resolve("loop.test")] == ["127.0.0.1"]
    assert [h.host for h in await _resolver(dns, listed).resolve("meta.test")] == [
        "169.254.169.254"]
    private = policy.DestinationPolicy(allow_private=True)
    assert [h.host for h in await _resolver(dns, private).resolve("internal.test")] == [
        "10.0.0.1"]


async def test_resolver_refuses_an_internal_address_literal(dns: DnsServer) -> None:
    """A literal is judged like a DNS answer: [127.0.0.1] gives a refusal, no hop."""
    with pytest.raises(RefusedRouteError, match="loopback"):
        await _resolver(dns).resolve("[127.0.0.1]")
    with pytest.raises(RefusedRouteError, match="loopback"):
        await _resolver(dns).resolve("[IPv6:::ffff:127.0.0.1]")


# --- a relay over real sockets ---------------------------------------------------
MxRelay = Callable[..., Awaitable[RelayHandle]]


@pytest.fixture
async def mx_relay(tmp_path: Path, sink: Sink, dns: DnsServer) -> AsyncIterator[MxRelay]:
    """Start a relay in MX mode whose MX hosts' SMTP port is the sink's; no bounces."""
    started: list[Relay] = []

    async def start(extra: dict[str, Any] | None = None) -> RelayHandle:
        cfg = make_config(tmp_path, sink.address,
                          _merge({"delivery": {"bounces": False}}, extra or {}))
        delivery = msgspec.structs.replace(
            cfg.delivery, mode="mx", dns_nameservers=(f"{dns.host}:{dns.port}",),
            mx_port=sink.port)
        relay = Relay(msgspec.structs.replace(cfg, delivery=delivery))
        await relay.start()
        started.append(relay)
        smtp = next(x for x in relay.listeners if x.kind == "smtp").address
        host, _, port = smtp.rpartition(":")
        handle = RelayHandle(relay, host, int(port), Ctl(cfg.control_socket),
                             Path(cfg.server.data_dir),
                             f"http://{relay.control.metrics_address}/metrics")
        await handle.ctl.add_domain("example.com")
        return handle

    yield start
    for r in started:
        await r.stop()


async def _rcpt(relay: RelayHandle, rcpt: str) -> str:
    """The reply to ``RCPT TO:<rcpt>`` in an authenticated transaction."""
    user, password = await relay.ctl.add_user("example.com")
    c = await Raw.open(relay.host, relay.port)
    try:
        assert (await c.login(user, password)).startswith("235 ")
        assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
        return await c.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        await c.quit()


async def _rejections(relay: RelayHandle) -> float:
    return value(await scrape(relay.metrics_url), "relayd_smtp_rejections_total",
                 reason="address_literal")


@pytest.mark.parametrize("rcpt", LITERALS)
async def test_literal_recipient_refused_by_default(relay_factory: RelayFactory,
                                                    rcpt: str) -> None:
    """An address-literal recipient gets 550 5.7.1, counted under reason address_literal."""
    relay = await relay_factory()
    await relay.ctl.add_domain("example.com")
    reply = await _rcpt(relay, rcpt)
    assert reply.startswith("550 5.7.1 "), reply
    assert await _rejections(relay) == 1


async def test_literal_recipient_refused_in_mx_mode(mx_relay: MxRelay, sink: Sink) -> None:
    """In MX mode too, RCPT TO:<a@[127.0.0.1]> is refused and nothing reaches 127.0.0.1."""
    relay = await mx_relay()
    reply = await _rcpt(relay, "a@[127.0.0.1]")
    assert reply.startswith("550 5.7.1 "), reply
    assert await _rejections(relay) == 1
    assert sink.connections == 0


async def test_allowed_literal_is_still_not_delivered_to_loopback(mx_relay: MxRelay,
                                                                  sink: Sink) -> None:
    """With literals allowed, a@[127.0.0.1] is accepted but fails without any connection
    to 127.0.0.1, and the delivery log says why."""
    relay = await mx_relay({"smtp": {"allow_address_literals": True}})
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["a@[127.0.0.1]"])
    [entry] = await eventually(lambda: log_entries(relay))
    assert (entry["outcome"], entry["code"], entry["next_hop"]) == ("failed", 550, "-")
    assert "5.4.4" in entry["text"] and "loopback" in entry["text"], entry["text"]
    assert sink.connections == 0 and sink.messages == []


@pytest.mark.parametrize(("domain", "kind"), [
    ("loop.test", "loopback"), ("meta.test", "link-local"), ("internal.test", "private")])
async def test_internal_mx_address_is_not_delivered_to(mx_relay: MxRelay, sink: Sink,
                                                       domain: str, kind: str) -> None:
    """An MX resolving to loopback, link-local or private fails at once with the reason
    in the delivery log; no connection is made."""
    relay = await mx_relay()
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, [f"r@{domain}"])
    [entry] = await eventually(lambda: log_entries(relay))
    assert (entry["outcome"], entry["code"], entry["next_hop"]) == ("failed", 550, "-")
    assert f"({kind}) of mx.{domain}" in entry["text"], entry["text"]
    assert sink.connections == 0


async def test_mx_on_a_listed_network_is_delivered_to(mx_relay: MxRelay, sink: Sink) -> None:
    """With 127.0.0.0/8 in mx_allowed_networks, the loopback MX receives the message."""
    relay = await mx_relay({"delivery": {"mx_allowed_networks": ["127.0.0.0/8"]}})
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@loop.test"])
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["r@loop.test"]
    [entry] = await eventually(lambda: log_entries(relay))
    assert (entry["outcome"], entry["next_hop"]) == ("delivered",
                                                  f"mx.loop.test[127.0.0.1]:{sink.port}")


async def test_private_mx_is_tried_with_private_allowed(mx_relay: MxRelay, sink: Sink) -> None:
    """With mx_allow_private, the 10.x MX is connected to (a connection failure defers)."""
    relay = await mx_relay({"delivery": {"mx_allow_private": True,
                                         "connect_timeout_seconds": 0.5}})
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@internal.test"])
    [entry] = await eventually(lambda: log_entries(relay))
    assert (entry["outcome"], entry["next_hop"]) == ("deferred",
                                                  f"mx.internal.test[10.0.0.1]:{sink.port}")
