"""Helpers shared by the MX-mode TLS tests (tests/test_mx_tls.py, test_dane.py,
test_mta_sts.py): a relay in MX mode pointed at the tests' DNS server and MX sinks,
one message to a recipient and its delivery-log entry, and the TLS outcome counters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from relayd.app import Relay
from tests.conftest import RelayHandle, Sink, make_config, start_relay
from tests.dnsserver import DnsServer
from tests.test_queue_support import eventually, log_entries, submit

MxRelay = Callable[..., Awaitable[RelayHandle]]


def mx_relay_starter(tmp_path: Path, dns: DnsServer, port: int, started: list[Relay],
                     **fixed: Any) -> MxRelay:
    """``start(**delivery)``: a relay in MX mode resolving through ``dns``, delivering to
    MX sinks on ``port`` of 127.0.0.0/8, with domain example.com; ``[delivery]`` is
    ``fixed`` then ``delivery``. The caller stops what lands in ``started``."""

    async def start(**delivery: Any) -> RelayHandle:
        cfg = make_config(tmp_path / f"r{len(started)}", "127.0.0.1:9")
        fields = {**msgspec.to_builtins(cfg.delivery), "mode": "mx",
                  "dns_nameservers": [f"{dns.host}:{dns.port}"], "mx_port": port,
                  "mx_allowed_networks": ["127.0.0.0/8"], **fixed, **delivery}
        cfg = msgspec.structs.replace(
            cfg, delivery=msgspec.convert(fields, type=type(cfg.delivery)))
        handle = await start_relay(cfg, started)
        await handle.ctl.add_domain("example.com")
        return handle

    return start


async def send_one(relay: RelayHandle, rcpt: str) -> dict[str, Any]:
    """One message from a new account of example.com to ``rcpt``; its first log entry."""
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, [rcpt])

    async def entry() -> dict[str, Any] | None:
        return next((e for e in await log_entries(relay) if e["recipient"] == rcpt), None)

    found: dict[str, Any] = await eventually(entry)
    return found


def tls_count(relay: RelayHandle, outcome: str) -> float:
    """relayd_delivery_tls_total{outcome} of the relay."""
    value: float = relay.relay.metrics.delivery_tls[outcome]._value.get()
    return value


async def expect_delivered(relay: RelayHandle, sink: Sink, rcpt: str) -> dict[str, Any]:
    """One message to ``rcpt`` is delivered, and ``sink`` got it; its log entry."""
    entry = await send_one(relay, rcpt)
    assert entry["outcome"] == "delivered", entry
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == [rcpt]
    return entry


async def expect_deferred(relay: RelayHandle, sink: Sink, rcpt: str, reason: str) -> None:
    """One message to ``rcpt`` is deferred for ``reason``; ``sink`` got nothing."""
    entry = await send_one(relay, rcpt)
    assert entry["outcome"] == "deferred", entry
    assert reason in entry["text"], entry
    assert sink.messages == []
