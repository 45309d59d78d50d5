"""Helpers shared by the MX-mode TLS tests (tests/test_mx_tls.py, test_dane.py,
test_mta_sts.py): MX sinks on 127.0.0.x sharing one port, each with its own TLS
context; a relay in MX mode pointed at the tests' DNS server and those sinks; one
message to a recipient and its delivery-log entry; the TLS outcome counters.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
from aiosmtpd.smtp import SMTP as AioSMTP

from relayd.app import Relay
from tests.conftest import RelayHandle, Sink, _SinkHandler, make_config, start_relay
from tests.dnsserver import DnsServer
from tests.test_queue_support import eventually, log_entries, submit

MxRelay = Callable[..., Awaitable[RelayHandle]]
#: (key, address, TLS context or None for no STARTTLS, server class)
SinkSpec = tuple[str, str, "ssl.SSLContext | None", type[AioSMTP]]


async def start_mx_sinks(specs: Iterable[SinkSpec]) -> tuple[dict[str, Sink], int]:
    """One aiosmtpd sink per spec, all on one port (the first one's, free): (sinks by
    key, port). OSError when that port is taken at a later address (the caller tries
    again); the sinks started so far are closed then."""
    loop = asyncio.get_running_loop()
    sinks: dict[str, Sink] = {}
    port = 0
    try:
        for key, addr, ctx, cls in specs:
            sink = Sink(host=addr)
            handler = _SinkHandler(sink)

            def factory(sink: Sink = sink, handler: _SinkHandler = handler,
                        ctx: ssl.SSLContext | None = ctx, cls: type[AioSMTP] = cls) -> AioSMTP:
                sink.connections += 1
                return cls(handler, hostname=f"sink-{sink.host}", tls_context=ctx)

            sink.server = await loop.create_server(factory, addr, port)
            sink.port = port = sink.server.sockets[0].getsockname()[1]
            sinks[key] = sink
    except OSError:
        close_sinks(sinks)
        raise
    return sinks, port


def close_sinks(sinks: dict[str, Sink]) -> None:
    for sink in sinks.values():
        if sink.server is not None:
            sink.server.close()


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
