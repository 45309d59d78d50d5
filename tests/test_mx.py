"""MX routing against a real DNS server on loopback (tests/dnsserver.py).

The zones use documentation addresses (192.0.2.0/24, 2001:db8::/32), which the
resolver refuses by default: every resolver here allows them explicitly (the
refusals themselves are tested in tests/test_holes_literals.py)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relayd.delivery.mx import (
    NULL_MX_MESSAGE,
    MxResolver,
    NextHop,
    PermanentRouteError,
    TemporaryRouteError,
)
from relayd.smtp.policy import DestinationPolicy
from tests.dnsserver import DnsServer

#: The documentation networks the zones below use, allowed for these tests.
DOCUMENTATION = DestinationPolicy(allowed_networks=("192.0.2.0/24", "2001:db8::/32"))


def make_resolver(dns_server: DnsServer, clock: FakeClock, **kw: Any) -> MxResolver:
    """A resolver asking ``dns_server``, on ``clock``, allowed the documentation networks."""
    return MxResolver(["127.0.0.1"], port=dns_server.port, clock=clock,
                      destinations=DOCUMENTATION, **kw)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dns_server: DnsServer, clock: FakeClock) -> MxResolver:
    return make_resolver(dns_server, clock, timeout=0.5, rand=random.Random(7))


def hosts(hops: list[NextHop]) -> list[str]:
    return [hop.host for hop in hops]


async def test_mx_hosts_come_in_preference_order(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """Addresses of lower-preference MX hosts come before those of higher ones."""
    dns_server.zone = {
        "example.test": {"MX": ["30 c.example.test.", "10 a.example.test.", "20 b.example.test."]},
        "a.example.test": {"A": ["192.0.2.1"]},
        "b.example.test": {"A": ["192.0.2.2"]},
        "c.example.test": {"A": ["192.0.2.3"]},
    }
    hops = await resolver.resolve("example.test")
    assert hops == [
        NextHop("192.0.2.1", 25, "a.example.test"),
        NextHop("192.0.2.2", 25, "b.example.test"),
        NextHop("192.0.2.3", 25, "c.example.test"),
    ]


async def test_equal_preference_hosts_are_shuffled_by_the_injected_random(
    dns_server: DnsServer, clock: FakeClock
) -> None:
    """Hosts of equal preference appear in every order across seeds, after better ones."""
    dns_server.zone = {
        "example.test": {
            "MX": ["5 first.example.test.", "10 a.example.test.", "10 b.example.test."]
        },
        "first.example.test": {"A": ["192.0.2.9"]},
        "a.example.test": {"A": ["192.0.2.1"]},
        "b.example.test": {"A": ["192.0.2.2"]},
    }
    orders = set()
    for seed in range(12):
        r = make_resolver(dns_server, clock, rand=random.Random(seed))
        hops = hosts(await r.resolve("example.test"))
        assert hops[0] == "192.0.2.9"
        orders.add(tuple(hops[1:]))
    assert orders == {("192.0.2.1", "192.0.2.2"), ("192.0.2.2", "192.0.2.1")}


async def test_ipv4_then_ipv6_addresses_of_each_host(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """Each MX host contributes its A then its AAAA addresses, tagged with the MX name."""
    dns_server.zone = {
        "example.test": {"MX": ["10 mx.example.test."]},
        "mx.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    }
    assert await resolver.resolve("example.test") == [
        NextHop("192.0.2.1", 25, "mx.example.test"),
        NextHop("2001:db8::1", 25, "mx.example.test"),
    ]


async def test_ipv6_can_be_turned_off(dns_server: DnsServer, clock: FakeClock) -> None:
    """With ipv6=False no AAAA query is made and only IPv4 hops are returned."""
    dns_server.zone = {
        "example.test": {"MX": ["10 mx.example.test."]},
        "mx.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    }
    r = make_resolver(dns_server, clock, ipv6=False)
    assert hosts(await r.resolve("example.test")) == ["192.0.2.1"]
    assert dns_server.count(rdtype="AAAA") == 0


async def test_no_mx_falls_back_to_the_domains_own_address(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """A domain without MX records is its own mail host (implicit MX)."""
    dns_server.zone = {"example.test": {"A": ["192.0.2.7"]}}
    assert await resolver.resolve("example.test") == [NextHop("192.0.2.7", 25, "example.test")]


async def test_no_mx_and_no_address_is_permanent(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """A domain that exists but has neither MX nor addresses cannot receive mail."""
    dns_server.zone = {"example.test": {"TXT": ['"hello"']}}
    with pytest.raises(PermanentRouteError):
        await resolver.resolve("example.test")


async def test_null_mx_is_permanent(dns_server: DnsServer, resolver: MxResolver) -> None:
    """A null MX (preference 0, exchange ".") says the domain accepts no mail."""
    dns_server.zone = {"example.test": {"MX": ["0 ."], "A": ["192.0.2.1"]}}
    with pytest.raises(PermanentRouteError, match=r"^domain does not accept mail \(null MX\)$"):
        await resolver.resolve("example.test")
    assert NULL_MX_MESSAGE == "domain does not accept mail (null MX)"


async def test_nxdomain_is_permanent(dns_server: DnsServer, resolver: MxResolver) -> None:
    """A domain that does not exist is a permanent routing error."""
    with pytest.raises(PermanentRouteError, match="NXDOMAIN"):
        await resolver.resolve("nosuch.test")


async def test_servfail_is_temporary(dns_server: DnsServer, resolver: MxResolver) -> None:
    """SERVFAIL for the MX question is a temporary routing error."""
    dns_server.zone = {"example.test": {"MX": ["10 mx.example.test."]}}
    dns_server.servfail.add("example.test")
    with pytest.raises(TemporaryRouteError):
        await resolver.resolve("example.test")


async def test_silence_is_temporary(dns_server: DnsServer, clock: FakeClock) -> None:
    """A server that never answers makes the lookup time out as a temporary error."""
    dns_server.silent.add("example.test")
    r = make_resolver(dns_server, clock, timeout=0.2)
    with pytest.raises(TemporaryRouteError, match="timed out"):
        await r.resolve("example.test")


async def test_mx_hosts_without_addresses_is_permanent(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """MX hosts that do not exist leave no next hop, which is permanent."""
    dns_server.zone = {"example.test": {"MX": ["10 gone.example.test."]}}
    with pytest.raises(PermanentRouteError, match="no address"):
        await resolver.resolve("example.test")


async def test_failing_primary_mx_still_yields_the_backup(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """A temporary failure for one MX host's addresses skips it in favour of the others."""
    dns_server.zone = {
        "example.test": {"MX": ["10 a.example.test.", "20 b.example.test."]},
        "b.example.test": {"A": ["192.0.2.2"]},
    }
    dns_server.servfail.add("a.example.test")
    assert hosts(await resolver.resolve("example.test")) == ["192.0.2.2"]


async def test_all_mx_hosts_failing_temporarily_is_temporary(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """When every MX host's lookup fails temporarily the error is temporary."""
    dns_server.zone = {"example.test": {"MX": ["10 a.example.test."]}}
    dns_server.servfail.add("a.example.test")
    with pytest.raises(TemporaryRouteError):
        await resolver.resolve("example.test")


async def test_answers_are_cached_for_their_ttl(
    dns_server: DnsServer, resolver: MxResolver, clock: FakeClock
) -> None:
    """A second resolve within the TTL sends no query; after the TTL it asks again."""
    dns_server.ttl = 300
    dns_server.zone = {
        "example.test": {"MX": ["10 mx.example.test."]},
        "mx.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    }
    first = await resolver.resolve("example.test")
    queries = dns_server.count()
    clock.now += 299
    assert await resolver.resolve("example.test") == first
    assert dns_server.count() == queries
    clock.now += 2
    await resolver.resolve("example.test")
    assert dns_server.count() == 2 * queries


async def test_nxdomain_is_cached_for_the_soa_minimum(
    dns_server: DnsServer, resolver: MxResolver, clock: FakeClock
) -> None:
    """A negative answer is cached for the SOA minimum TTL, not longer."""
    dns_server.negative_ttl = 60
    for _ in range(2):
        with pytest.raises(PermanentRouteError):
            await resolver.resolve("nosuch.test")
    assert dns_server.count("nosuch.test") == 1
    clock.now += 61
    with pytest.raises(PermanentRouteError):
        await resolver.resolve("nosuch.test")
    assert dns_server.count("nosuch.test") == 2


async def test_temporary_failures_are_not_cached(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """After a SERVFAIL clears, the next resolve asks again and succeeds."""
    dns_server.zone = {"example.test": {"A": ["192.0.2.1"]}}
    dns_server.servfail.add("example.test")
    with pytest.raises(TemporaryRouteError):
        await resolver.resolve("example.test")
    dns_server.servfail.clear()
    assert hosts(await resolver.resolve("example.test")) == ["192.0.2.1"]


async def test_cache_is_bounded(dns_server: DnsServer, clock: FakeClock) -> None:
    """The cache keeps at most cache_size answers, evicting the least recently used."""
    dns_server.zone = {f"d{i}.test": {"A": [f"192.0.2.{i}"]} for i in range(1, 4)}
    r = make_resolver(dns_server, clock, cache_size=2, ipv6=False)
    for i in (1, 2, 3):
        await r.resolve(f"d{i}.test")
    before = dns_server.count("d1.test")
    await r.resolve("d1.test")
    assert dns_server.count("d1.test") > before


async def test_truncated_udp_answer_is_retried_over_tcp(
    dns_server: DnsServer, resolver: MxResolver
) -> None:
    """A UDP reply with the TC bit makes the resolver ask again over TCP."""
    dns_server.zone = {
        "example.test": {"MX": ["10 mx.example.test."]},
        "mx.example.test": {"A": ["192.0.2.1"]},
    }
    dns_server.truncate.add("example.test")
    assert hosts(await resolver.resolve("example.test")) == ["192.0.2.1"]
    assert ("example.test.", "MX", "tcp") in dns_server.queries


async def test_cname_to_mx_host_is_followed(dns_server: DnsServer, resolver: MxResolver) -> None:
    """An MX host name that is a CNAME resolves through it."""
    dns_server.zone = {
        "example.test": {"MX": ["10 alias.example.test."]},
        "alias.example.test": {"CNAME": ["real.example.test."]},
        "real.example.test": {"A": ["192.0.2.5"]},
    }
    assert hosts(await resolver.resolve("example.test")) == ["192.0.2.5"]


async def test_addresses_are_capped(dns_server: DnsServer, clock: FakeClock) -> None:
    """No more than max_addresses next hops are returned, however big the zone."""
    dns_server.zone = {
        "example.test": {"MX": [f"{i} mx{i}.example.test." for i in range(20)]},
        **{f"mx{i}.example.test": {"A": [f"192.0.2.{i + 1}"]} for i in range(20)},
    }
    r = make_resolver(dns_server, clock, max_addresses=3)
    assert hosts(await r.resolve("example.test")) == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


async def test_address_literal_needs_no_dns(dns_server: DnsServer, resolver: MxResolver) -> None:
    """An RFC 5321 address literal routes to that address without a query."""
    assert hosts(await resolver.resolve("[192.0.2.1]")) == ["192.0.2.1"]
    assert hosts(await resolver.resolve("[IPv6:2001:db8::1]")) == ["2001:db8::1"]
    assert dns_server.count() == 0


async def test_invalid_domain_is_permanent(resolver: MxResolver) -> None:
    """A name DNS cannot express (an over-long label) is a permanent error."""
    with pytest.raises(PermanentRouteError):
        await resolver.resolve("a" * 64 + ".test")
