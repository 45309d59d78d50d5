"""Failover you can see (issue 17 item 6): a primary MX that refuses, greets 421 or hangs
while the secondary takes the mail leaves one ``mx_hop_failed`` line (MX name, address,
port, reason) and a count by destination and reason; hops are named
``mx.example[IP]:PORT``; DNS failures are counted by kind. Over loopback: the tests'
DNS server, the sink on 127.0.0.1 as the secondary MX, a primary on 127.0.0.2."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relayd.app import Relay
from relayd.delivery import hopfailures
from relayd.delivery.client import Hop
from relayd.delivery.mx import MxResolver, NotFoundRouteError, NullMxRouteError, TemporaryRouteError
from relayd.observe.hops import BURST, HopWatch
from relayd.observe.metrics import Metrics, new_registry
from relayd.smtp.policy import DestinationPolicy
from tests.conftest import RelayHandle, Sink, make_config, start_relay
from tests.dnsserver import DnsServer
from tests.test_delivery_routing import ZONE
from tests.test_mx import FakeClock
from tests.test_queue_support import eventually, message_log, submit

FAIL_ZONE = {
    **ZONE,
    "fail.test": {"MX": ["10 mx1.fail.test.", "20 mx2.fail.test."]},
    "mx1.fail.test": {"A": ["127.0.0.2"]},  # the primary: refuses, greets 421 or hangs
    "mx2.fail.test": {"A": ["127.0.0.1"]},  # the sink
    "null.test": {"MX": ["0 ."]},
    "noaddr.test": {"MX": ["10 gone.noaddr.test."]},
    "flaky.test": {"MX": ["10 mx2.fail.test."]},
    "slow.test": {"MX": ["10 mx2.fail.test."]},
}


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    async with DnsServer(dict(FAIL_ZONE)) as server:
        yield server


@pytest.fixture
async def relay_at(tmp_path: Path, sink: Sink, dns: DnsServer
                   ) -> AsyncIterator[Callable[..., Any]]:
    """Start a relay in MX mode (MX hosts on the sink's port), with ``extra`` settings."""
    started: list[Relay] = []

    async def start(extra: dict[str, Any] | None = None) -> RelayHandle:
        cfg = make_config(tmp_path, sink.address, extra)
        delivery = msgspec.structs.replace(
            cfg.delivery, mode="mx", dns_nameservers=(f"{dns.host}:{dns.port}",),
            mx_port=sink.port, mx_allowed_networks=("127.0.0.0/8",))
        handle = await start_relay(msgspec.structs.replace(cfg, delivery=delivery), started)
        await handle.ctl.add_domain("example.com")
        return handle

    yield start
    for r in started:
        await r.stop()


async def primary(kind: str, port: int) -> asyncio.Server | None:
    """The primary MX on 127.0.0.2: nothing (refused), a 421 or 554 greeting, a close
    before the greeting (lost), or silence (timeout)."""
    if kind == "refused":
        return None
    greeting = {"greeting_4xx": b"421 4.3.2 mx1 busy, try later\r\n",
                "greeting_5xx": b"554 5.7.1 mx1 says no\r\n"}.get(kind)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greeting is not None:
            writer.write(greeting)
            await writer.drain()
        if kind != "lost":
            await reader.read()  # until the relay closes
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.2", port)


class Lines:
    """A log stand-in recording (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))

    def of(self, event: str) -> list[dict[str, Any]]:
        return [kw for _level, name, kw in self.lines if name == event]


def watched(relay: RelayHandle) -> Lines:
    """The relay's hop watch now logs to a recorder (the fields it writes, as written)."""
    assert relay.relay.hops is not None
    lines = Lines()
    relay.relay.hops.log = lines
    return lines


def counter(relay: RelayHandle, family: str, dest: str, value: str) -> float:
    got: float = relay.relay.metrics.by_destination(family, dest, value)._value.get()
    return got


@pytest.mark.parametrize("kind", ["refused", "greeting_4xx", "greeting_5xx", "lost",
                                  "timeout"])
async def test_a_failed_primary_is_logged_and_counted_when_the_secondary_takes_the_mail(
        relay_at: Callable[..., Any], sink: Sink, kind: str) -> None:
    server = await primary(kind, sink.port)
    try:
        relay = await relay_at()
        log = watched(relay)
        account = await relay.ctl.add_user("example.com")
        [mid] = await submit(relay, account, ["r@fail.test"])
        [got] = await sink.wait_for(1, timeout=20)
        assert got.rcpt_tos == ["r@fail.test"]
        [entry] = await message_log(relay, mid, 1)
    finally:
        if server is not None:
            server.close()
    assert entry["outcome"] == "delivered"
    assert entry["next_hop"] == f"mx2.fail.test[127.0.0.1]:{sink.port}"
    [line] = log.of("mx_hop_failed")
    assert (line["mx"], line["address"], line["port"], line["reason"]) == (
        "mx1.fail.test", "127.0.0.2", sink.port, kind), line
    assert line["hop"] == f"mx1.fail.test[127.0.0.2]:{sink.port}"
    assert line["domain"] == "fail.test" and line["id"] and line["rcpts"] == 1
    assert counter(relay, "mx_hop_failures", "other", kind) == 1
    assert counter(relay, "destination_attempts", "other", "delivered") == 1
    assert counter(relay, "destination_attempts", "other", "deferred") == 0


async def test_a_configured_destination_is_its_own_label(
        relay_at: Callable[..., Any], sink: Sink) -> None:
    """A destination of the shaping table is counted under its name (else ``other``)."""
    relay = await relay_at({"delivery": {"shaping": {"destination": [
        {"name": "failing", "domains": ["fail.test"]}]}}})
    log = watched(relay)
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@fail.test", "r@dest.test"])
    await sink.wait_for(2, timeout=20)
    async def counted() -> bool | None:
        return counter(relay, "destination_attempts", "failing", "delivered") == 1 or None

    await eventually(counted)
    assert counter(relay, "mx_hop_failures", "failing", "refused") == 1
    assert counter(relay, "mx_hop_failures", "other", "refused") == 0
    assert counter(relay, "destination_attempts", "other", "delivered") == 1
    assert counter(relay, "destination_tls", "failing", "plaintext") == 1
    [line] = log.of("mx_hop_failed")
    assert line["reason"] == "refused"
    # the destination label is bounded: the table's name or "other", never a domain
    families = ("relayd_destination_attempts", "relayd_destination_tls",
                "relayd_mx_hop_failures")
    seen = {s.labels["destination"] for fam in relay.relay.registry.collect()
            if fam.name in families for s in fam.samples}
    assert seen == {"failing", "other"}, seen


async def test_dns_failures_of_the_relay_are_counted_by_kind(
        relay_at: Callable[..., Any], sink: Sink, dns: DnsServer) -> None:
    relay = await relay_at()
    dns.servfail.add("flaky.test")
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@nowhere.test", "r@null.test", "r@flaky.test"])
    m = relay.relay.metrics.dns_failures

    async def counted() -> bool | None:
        return all(m[k]._value.get() >= 1 for k in ("nxdomain", "null_mx", "servfail")) or None

    await eventually(counted)
    assert m["timeout"]._value.get() == 0 and m["no_address"]._value.get() == 0


async def test_the_resolver_reports_each_failure_kind(dns: DnsServer) -> None:
    """SERVFAIL, NXDOMAIN, silence, null MX and hosts without addresses, each by kind."""
    seen: list[str] = []
    resolver = MxResolver(["127.0.0.1"], port=dns.port, clock=FakeClock(), timeout=0.3,
                          rand=random.Random(1),
                          destinations=DestinationPolicy(allowed_networks=("127.0.0.0/8",)))
    resolver.on_dns_failure = seen.append
    dns.servfail.add("flaky.test")
    dns.silent.add("slow.test")
    for domain, error in [("flaky.test", TemporaryRouteError), ("slow.test", TemporaryRouteError),
                          ("nowhere.test", NotFoundRouteError), ("null.test", NullMxRouteError),
                          ("noaddr.test", NotFoundRouteError)]:
        with pytest.raises(error):
            await resolver.resolve(domain)
    assert seen == ["servfail", "timeout", "nxdomain", "null_mx", "no_address"]
    await resolver.resolve("fail.test")  # a route: nothing more
    assert len(seen) == 5


def test_hop_names_carry_the_mx_name_as_postfix_does() -> None:
    assert Hop("192.0.2.7", 25, mx="mx.example").name == "mx.example[192.0.2.7]:25"
    assert Hop("2001:db8::1", 25, mx="mx.example").name == "mx.example[2001:db8::1]:25"
    assert Hop("192.0.2.7", 2525).name == "192.0.2.7:2525"  # smarthost, static route
    assert Hop("2001:db8::1", 25).name == "[2001:db8::1]:25"
    assert Hop("192.0.2.7", 25, mx="192.0.2.7").name == "192.0.2.7:25"  # address literal


@pytest.mark.parametrize(("text", "kind"), [
    ("SMTPConnectError: Error connecting to 127.0.0.2 on port 25: [Errno 111] Connect call"
     " failed ('127.0.0.2', 25)", "refused"),
    ("SMTPConnectTimeoutError: Timed out waiting for server ready message", "timeout"),
    ("SMTPConnectResponseError: (421, '4.3.2 busy')", "greeting_4xx"),
    ("SMTPConnectResponseError: (554, 'go away')", "greeting_5xx"),
    ("SMTPHeloError: (550, 'no')", "helo_refused"),
    ("SMTPTLSRequired: TLS required (level verify) by mx.example: certificate", "tls"),
    ("SMTPServerDisconnected: connection closed", "lost"),
    ("message data is gone (purged or delivered meanwhile)", "other"),
])
def test_hop_failure_kinds(text: str, kind: str) -> None:
    assert hopfailures.kind(text) == kind and kind in hopfailures.HOP_FAILURE_KINDS


def test_a_flood_of_failures_is_budgeted_but_counted() -> None:
    """An MX down for a long time: ``BURST`` lines, then a summary with the count held back;
    the metric counts every failure."""
    metrics = Metrics(new_registry())
    log = Lines()
    clock = FakeClock()
    watch = HopWatch(metrics, log, clock)
    hop = Hop("192.0.2.7", 25, mx="mx1.example")
    for i in range(BURST + 30):
        watch.hop_failed(i, "example.test", "other", hop, "SMTPConnectTimeoutError: x", 1)
    written = [x for x in log.lines if x[1] == "mx_hop_failed"]
    assert len(written) == BURST
    watch.report_suppressed(everything=True)
    [summary] = [x for x in log.lines if x[1] == "mx_hop_failures_suppressed"]
    assert summary[2] == {"address": "192.0.2.7", "reason": "timeout", "suppressed": 30}
    assert metrics.by_destination("mx_hop_failures", "other", "timeout")._value.get() == BURST + 30
