"""Shared fixtures: a real relayd in the test's event loop, a real receiving SMTP
server, and a control-socket client — all over loopback sockets, nothing mocked.

- ``sink``: an in-process aiosmtpd server that records every message and whose
  replies a test can script (``sink.script.append("451 4.3.0 try later")``).
- ``relay_factory`` / ``relay``: a running ``relayd.app.Relay`` on ephemeral
  ports with its spool under ``tmp_path``; cheap argon2 parameters so tests
  stay fast (verification cost is not what they test).
- ``ctl``: an async client of the control socket (aiohttp over the Unix socket).
- ``smtp_session``: an aiosmtplib client connected to the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import msgspec
import pytest
import uvloop
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd import config as config_mod
from relayd.app import Relay
from tests.delivery_fake import InProcessTransport
from tests.procs import RelayProcess
from tests.tools import register_ci_guard

pytest_plugins = ["tests.pg_fixtures"]

TEST_CONFIG: dict[str, Any] = {
    "server": {"hostname": "relay.test", "log_level": "warning",
               "shutdown_grace_seconds": 5.0},
    "smtp": {"listen": "127.0.0.1:0"},
    "credentials": {"argon2_time_cost": 1, "argon2_memory_cost_kib": 1024,
                    "argon2_parallelism": 1},
    "delivery": {"retry_first_seconds": 300.0, "connect_timeout_seconds": 3.0,
                 "command_timeout_seconds": 5.0},
    "metrics": {"listen": "127.0.0.1:0"},
    "spool": {"last_connection_flush_seconds": 0.2},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out



def pytest_configure(config: pytest.Config) -> None:
    """Under CI=true a skip fails the test (tests/tools.py says which skips stay)."""
    register_ci_guard(config)


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_relays() -> Iterator[None]:
    """relayd processes started by tests never outlive the test session."""
    from tests.procs import kill_leftovers

    yield
    kill_leftovers()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run every async test under uvloop, as the daemon does."""
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class Received:
    """One message as the receiving server saw it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Sink:
    """An in-process receiving SMTP server with scripted answers."""

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Received] = field(default_factory=list)
    script: list[str] = field(default_factory=list)  # replies to end of DATA, in order
    rcpt_script: dict[str, str] = field(default_factory=dict)  # rcpt -> reply
    connections: int = 0
    server: asyncio.base_events.Server | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        """HOST:PORT of the sink."""
        return f"{self.host}:{self.port}"

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``n`` messages arrived."""
        async def _wait() -> None:
            while len(self.messages) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(_wait(), timeout)
        return self.messages


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: AioSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.sink.rcpt_script.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.script:
            reply = self.sink.script.pop(0)
            if not reply.startswith("2"):
                return reply
        self.sink.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                           bytes(envelope.original_content or b"")))
        self.sink.arrived.set()
        return "250 2.0.0 OK queued"


async def start_sink(sink: Sink | None = None, port: int = 0) -> Sink:
    """Start a receiving server on loopback."""
    sink = sink or Sink()
    loop = asyncio.get_running_loop()
    handler = _SinkHandler(sink)

    def factory() -> AioSMTP:
        sink.connections += 1
        return AioSMTP(handler, hostname="sink.test", enable_SMTPUTF8=True)

    sink.server = await loop.create_server(factory, sink.host, port)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """A receiving SMTP server on an ephemeral loopback port."""
    s = await start_sink()
    yield s
    assert s.server is not None
    s.server.close()


class Ctl:
    """Async client of the real control socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def call(self, method: str, path: str, body: Any = None,
                   query: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One request; returns (HTTP status, decoded JSON)."""
        conn = aiohttp.UnixConnector(path=self.path)
        async with aiohttp.ClientSession(connector=conn) as s:
            params = {k: str(v) for k, v in (query or {}).items() if v is not None}
            data = json.dumps(body).encode() if body is not None else None
            async with s.request(method, f"http://relayd{path}", data=data,
                                 params=params) as resp:
                raw = await resp.read()
                return resp.status, json.loads(raw) if raw else None

    async def ok(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """A call that must succeed."""
        status, data = await self.call(method, path, body, query)
        assert status < 300, (status, data)
        return data

    async def add_domain(self, name: str = "example.com") -> dict[str, Any]:
        """Create a domain."""
        result: dict[str, Any] = await self.ok("POST", "/v1/domains", {"name": name})
        return result

    async def add_user(self, domain: str = "example.com",
                       networks: list[str] | None = None) -> tuple[str, str]:
        """Create an account; return (username, password)."""
        r = await self.ok("POST", "/v1/users", {"domain": domain,
                                                "allow_networks": networks or []})
        return r["username"], r["password"]


@dataclass
class RelayHandle:
    """A running relay and how to reach it."""

    relay: Relay
    host: str
    port: int
    ctl: Ctl
    data_dir: Path
    metrics_url: str

    async def client(self, username: str | None = None, password: str | None = None,
                     ) -> aiosmtplib.SMTP:
        """A connected (and, with credentials, authenticated) SMTP client."""
        c = aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False,
                            use_tls=False, timeout=10)
        await c.connect()
        if username is not None:
            assert password is not None
            await c.ehlo()
            await c.auth_plain(username, password)
        return c

    async def stop(self) -> None:
        """Graceful stop."""
        await self.relay.stop()


RelayFactory = Callable[..., Awaitable[RelayHandle]]


def make_config(tmp: Path, smarthost: str,
                extra: dict[str, Any] | None = None) -> config_mod.Config:
    """A test configuration: ephemeral ports, spool under ``tmp``, cheap argon2."""
    cfg = msgspec.convert(_merge(TEST_CONFIG, extra or {}), type=config_mod.Config)
    return config_mod.with_overrides(
        cfg, data_dir=str(tmp / "var"), control_socket=str(tmp / "var" / "control.sock"),
        smarthost=smarthost)


@pytest.fixture
async def procs() -> AsyncIterator[list[RelayProcess]]:
    """Relay processes a test started (append them); killed at the end if still running."""
    started: list[RelayProcess] = []
    yield started
    for rp in started:
        if rp.proc is not None and rp.proc.returncode is None:
            await rp.kill()


async def start_relay(cfg: Any, started: list[Relay],
                      transport: InProcessTransport | None = None) -> RelayHandle:
    """Start relayd in this process on ``cfg`` (appended to ``started``, for the fixture
    that stops them) and its handle."""
    relay = Relay(cfg, transport=transport)
    await relay.start()
    started.append(relay)
    smtp = next(x for x in relay.listeners if x.kind == "smtp").address
    host, _, port = smtp.rpartition(":")
    return RelayHandle(relay, host, int(port), Ctl(cfg.control_socket),
                       Path(cfg.server.data_dir),
                       f"http://{relay.control.metrics_address}/metrics")


@pytest.fixture
async def relay_factory(tmp_path: Path, sink: Sink) -> AsyncIterator[RelayFactory]:
    """Start relays (``await relay_factory({"smtp": {...}})``); all stopped at the end."""
    started: list[Relay] = []

    async def start(extra: dict[str, Any] | None = None, smarthost: str | None = None,
                    data: Path | None = None, in_process: bool = False) -> RelayHandle:
        cfg = make_config(data or tmp_path, smarthost or sink.address, extra)
        # in_process: the transactions run in this process (tests/delivery_fake.py).
        transport = InProcessTransport(cfg.delivery, cfg.delivery.helo_name
                                       or cfg.server.hostname) if in_process else None
        return await start_relay(cfg, started, transport)

    yield start
    for r in started:
        with contextlib.suppress(Exception):
            if r.spool._w is not None:
                await r.stop()


#: Many failed AUTHs from 127.0.0.1 are expected in credential tests: no throttling.
NO_THROTTLE: dict[str, Any] = {"smtp": {"auth_failures_before_delay": 1000,
                                        "auth_failures_before_disconnect": 1000}}


@pytest.fixture
async def lrelay(relay_factory: RelayFactory) -> RelayHandle:
    """A relay without AUTH throttling, with domain example.com."""
    r = await relay_factory(NO_THROTTLE)
    await r.ctl.add_domain("example.com")
    return r


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> RelayHandle:
    """One running relay delivering to ``sink``."""
    return await relay_factory()


@pytest.fixture
async def account(relay: RelayHandle) -> tuple[str, str]:
    """A domain ``example.com`` with one account; returns (username, password)."""
    await relay.ctl.add_domain("example.com")
    return await relay.ctl.add_user("example.com")


def message(subject: str = "test", body: str = "Hello.\r\n", sender: str = "app@example.com",
            to: str = "rcpt@dest.test") -> bytes:
    """A small RFC 5322 message with CRLF line endings."""
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\n{body}").encode()


def decode(obj: Any, kind: type[Any]) -> Any:
    """Decode a JSON-able object into a control schema type (checks the contract)."""
    return msgspec.convert(obj, type=kind)


def spool_at_schema(path: Path, version: int, *statements: str) -> None:
    """A spool database as an older relayd left it: the migrations up to ``version``
    (its ``user_version``), then ``statements`` (its rows)."""
    from relayd.store.schema import MIGRATIONS
    conn = sqlite3.connect(path)
    conn.executescript("".join(MIGRATIONS[v] for v in range(1, version + 1))
                       + f"PRAGMA user_version={version};")
    for stmt in statements:
        conn.execute(stmt)
    conn.commit()
    conn.close()
