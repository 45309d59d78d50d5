"""Per-destination shaping end to end: a real relay in MX mode, the tests' DNS server,
and sinks on 127.0.0.2 and 127.0.0.3 (one port: MX hosts share ``mx_port``) that count
concurrent sessions, messages per session and arrival times."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.app import Relay
from tests.conftest import Ctl, RelayHandle, make_config
from tests.dnsserver import DnsServer
from tests.test_ops_support import scrape, value
from tests.test_queue_support import eventually, log_entries, submit

ZONE = {
    "example.com": {"MX": ["10 mx.example.com."]},
    "mx.example.com": {"A": ["127.0.0.3"]},
    "slow.test": {"MX": ["10 mx.slow.test."]},
    "mx.slow.test": {"A": ["127.0.0.2"]},
    "capped.test": {"MX": ["10 mx.capped.test."]},
    "mx.capped.test": {"A": ["127.0.0.2"]},
    "reuse.test": {"MX": ["10 mx.reuse.test."]},
    "mx.reuse.test": {"A": ["127.0.0.2"]},
    "throttle.test": {"MX": ["10 in1.provider.test."]},  # a provider, by its MX suffix
    "in1.provider.test": {"A": ["127.0.0.2"]},
    "fine.test": {"MX": ["10 mx.fine.test."]},
    "mx.fine.test": {"A": ["127.0.0.3"]},
}

SHAPING = {
    "backoff_initial_seconds": 4.0,
    "destination": [
        {"name": "slow", "domains": ["slow.test"], "messages_per_second": 2},
        {"name": "capped", "domains": ["capped.test"], "connections": 2},
        {"name": "reuse", "domains": ["reuse.test"], "connections": 1,
         "messages_per_connection": 2},
        {"name": "provider", "mx_suffixes": ["provider.test"]},
    ],
}


@dataclass
class CountingSink:
    """A receiving server that records sessions: how many at once, messages in each."""

    host: str
    port: int = 0
    active: int = 0
    most_active: int = 0
    sessions: int = 0
    per_session: dict[Any, int] = field(default_factory=dict)  # by client (address, port)
    arrivals: list[float] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    script: list[str] = field(default_factory=list)  # replies to end of DATA, in order
    delay: float = 0.0  # before answering the end of DATA
    server: asyncio.base_events.Server | None = None

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.script:
            return self.script.pop(0)
        self.per_session[session.peer] = self.per_session.get(session.peer, 0) + 1
        self.arrivals.append(time.monotonic())
        self.rcpts.extend(envelope.rcpt_tos)
        return "250 2.0.0 OK queued"

    async def start(self) -> None:
        sink = self

        class Counted(AioSMTP):
            def connection_made(self, transport: Any) -> None:
                sink.sessions += 1
                sink.active += 1
                sink.most_active = max(sink.most_active, sink.active)
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                sink.active -= 1
                super().connection_lost(exc)

        self.server = await asyncio.get_running_loop().create_server(
            lambda: Counted(self, hostname="sink.test"), self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def sinks() -> AsyncIterator[tuple[CountingSink, CountingSink]]:
    """Sinks on 127.0.0.2 and 127.0.0.3, on one port."""
    for _ in range(20):
        a = CountingSink("127.0.0.2")
        await a.start()
        b = CountingSink("127.0.0.3", a.port)
        try:
            await b.start()
        except OSError:
            a.close()
            continue
        yield a, b
        a.close()
        b.close()
        return
    pytest.fail("no port free on both 127.0.0.2 and 127.0.0.3")


Start = Callable[[], Awaitable[RelayHandle]]


@pytest.fixture
async def relay(tmp_path: Path, sinks: tuple[CountingSink, CountingSink]
                ) -> AsyncIterator[RelayHandle]:
    """A relay in MX mode with the SHAPING table; retries come back quickly."""
    async with DnsServer(dict(ZONE)) as dns:
        cfg = make_config(tmp_path, "127.0.0.1:9", {"delivery": {
            "retry_first_seconds": 0.5, "retry_jitter": 0.0, "shaping": SHAPING}})
        delivery = msgspec.structs.replace(
            cfg.delivery, mode="mx", dns_nameservers=(f"{dns.host}:{dns.port}",),
            mx_port=sinks[0].port, mx_allowed_networks=("127.0.0.0/8",))
        cfg = msgspec.structs.replace(cfg, delivery=delivery)
        r = Relay(cfg)
        await r.start()
        smtp = next(x for x in r.listeners if x.kind == "smtp").address
        host, _, port = smtp.rpartition(":")
        handle = RelayHandle(r, host, int(port), Ctl(cfg.control_socket),
                             Path(cfg.server.data_dir),
                             f"http://{r.control.metrics_address}/metrics")
        await handle.ctl.add_domain("example.com")
        try:
            yield handle
        finally:
            await r.stop()


async def delivered(sink: CountingSink, n: int, timeout: float = 15.0) -> None:
    async def enough() -> bool:
        return len(sink.arrivals) >= n
    await eventually(enough, timeout)


async def test_per_second_limit_spreads_messages(
        relay: RelayHandle, sinks: tuple[CountingSink, CountingSink]) -> None:
    """Six messages at 2 a second: a burst of two, then one every half second."""
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@slow.test"], count=6)
    await delivered(sinks[0], 6)
    spread = sinks[0].arrivals[-1] - sinks[0].arrivals[0]
    assert spread >= 1.5, sinks[0].arrivals  # unshaped: all within a few milliseconds


async def test_connection_cap_is_respected(
        relay: RelayHandle, sinks: tuple[CountingSink, CountingSink]) -> None:
    """Ten messages at once to a destination capped at two connections."""
    a = sinks[0]
    a.delay = 0.2
    account = await relay.ctl.add_user("example.com")
    await asyncio.gather(*(submit(relay, account, ["r@capped.test"]) for _ in range(10)))
    await delivered(a, 10)
    assert 1 <= a.most_active <= 2, a.most_active


async def test_messages_per_connection_cap(
        relay: RelayHandle, sinks: tuple[CountingSink, CountingSink]) -> None:
    """Two messages per connection: six messages take at least three sessions."""
    a = sinks[0]
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@reuse.test"], count=6)
    await delivered(a, 6)
    assert max(a.per_session.values()) <= 2, a.per_session
    assert a.sessions >= 3


async def test_throttling_reply_backs_the_destination_off(
        relay: RelayHandle, sinks: tuple[CountingSink, CountingSink]) -> None:
    """421 4.7.0 from the provider: it backs off (metric, status), its mail waits and
    no connection is opened to it, another destination keeps flowing; then all of it
    is delivered."""
    a, b = sinks
    a.script = ["421 4.7.0 Try again later"]
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r1@throttle.test"])

    async def backed_off() -> list[dict[str, Any]]:
        st = await relay.ctl.ok("GET", "/v1/status")
        return [x for x in st["backoffs"] if x["destination"] == "provider"]
    [entry] = await eventually(backed_off)
    assert entry["reply"].startswith("4.7.0 Try again later") and entry["level"] == 1

    async def gauge() -> Any:  # the gauges are at most a second old
        samples = await scrape(relay.metrics_url)
        key = ("relayd_destination_backoff", frozenset({("destination", "provider")}))
        return samples if samples.get(key) == 1 else None
    samples = await eventually(gauge, timeout=1.5)
    assert value(samples, "relayd_destination_shaped_total", destination="provider",
                 kind="throttled") == 1
    sessions = a.sessions

    await submit(relay, account, ["r2@throttle.test"])
    await submit(relay, account, ["r@fine.test"])
    await delivered(b, 1, timeout=1.5)  # the other destination is not held
    assert b.rcpts == ["r@fine.test"]
    entries = await eventually(lambda: _logged(relay, "r2@throttle.test"))
    assert entries[0]["outcome"] == "deferred" and "backed off" in entries[0]["text"]
    assert a.sessions == sessions and not a.arrivals  # no new connection while backed off

    await delivered(a, 2, timeout=15.0)  # after the back-off (4 s)
    assert sorted(a.rcpts) == ["r1@throttle.test", "r2@throttle.test"]
    st = await relay.ctl.ok("GET", "/v1/status")
    assert st["backoffs"] == []


async def _logged(relay: RelayHandle, rcpt: str) -> list[dict[str, Any]]:
    return [e for e in await log_entries(relay) if e["recipient"] == rcpt]


async def test_reload_applies_shaping(
        relay: RelayHandle, sinks: tuple[CountingSink, CountingSink], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reload that sets messages_per_connection = 1 for reuse.test, three messages
    take three sessions (two per session before)."""
    a = sinks[0]
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@reuse.test"], count=2)
    await delivered(a, 2)
    assert a.sessions == 1
    path = tmp_path / "reloaded.toml"
    path.write_text('[delivery]\nretry_first_seconds = 0.5\n\n'
                    '[[delivery.shaping.destination]]\nname = "reuse"\n'
                    'domains = ["reuse.test"]\nconnections = 1\nmessages_per_connection = 1\n')
    monkeypatch.setenv("RELAYD_CONFIG_PATH", str(path))
    await relay.relay.reload()
    assert relay.relay.shaping is not None
    assert relay.relay.shaping.shaper.cfg.destination[0].messages_per_connection == 1
    await submit(relay, account, ["r@reuse.test"], count=3)
    await delivered(a, 5)
    assert a.sessions >= 4 and sorted(a.per_session.values()) == [1, 1, 1, 2], a.per_session
