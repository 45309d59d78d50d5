"""Next-hop faults: each fault defers (or, for 5xx, fails and bounces) every recipient per
SEMANTICS.md §5; when the next hop is healthy again everything accepted arrives (nothing
lost) and the connection pool works again.

Each test runs the fault on one loopback port — ``smtp-sink`` with a fault flag, a
silent or plaintext server, or nothing at all — submits messages, waits until the
delivery log shows the fault's outcome for each of them, then puts the in-process sink
on the same port and waits for every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP

from tests.conftest import RelayFactory, RelayHandle, Sink, _SinkHandler, message, start_sink
from tests.procs import free_port
from tests.rawsmtp import Raw

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

N = 4
FAST_RETRY = {"delivery": {"retry_first_seconds": 0.5, "retry_max_seconds": 1.0,
                           "retry_jitter": 0.0, "connect_timeout_seconds": 1.0,
                           "command_timeout_seconds": 1.0}}

Stopper = Callable[[], Awaitable[None]]


async def _smtp_sink(port: int, *flags: str) -> Stopper:
    """Postfix's smtp-sink on ``port`` with fault flags; returns its stopper."""
    root = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses root otherwise
    proc = await asyncio.create_subprocess_exec(
        "/usr/sbin/smtp-sink", *root, *flags, f"127.0.0.1:{port}", "10",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    for _ in range(100):
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        await asyncio.sleep(0.05)
    assert proc.returncode is None, "smtp-sink did not start"

    async def stop() -> None:
        proc.kill()
        await proc.wait()
    return stop


async def _silent(port: int) -> Stopper:
    """A next hop that accepts connections and never says anything."""
    held: list[asyncio.StreamWriter] = []

    async def on(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)
        await r.read()

    server = await asyncio.start_server(on, "127.0.0.1", port)

    async def stop() -> None:
        server.close()
        for w in held:
            w.close()
    return stop


async def _nothing(port: int) -> Stopper:
    """No server at all: connections are refused."""
    async def stop() -> None:
        return None
    return stop


@pytest.fixture
async def healthy(tmp_path: Path) -> AsyncIterator[Callable[[int, Sink], Awaitable[None]]]:
    """Start the in-process sink (plain) on a given port; stopped at the end."""
    started: list[Sink] = []

    async def start(port: int, sink: Sink) -> None:
        await start_sink(sink, port=port)
        started.append(sink)
    yield start
    for s in started:
        if s.server is not None:
            s.server.close()


async def _submit(relay: RelayHandle, n: int, tag: str) -> tuple[tuple[str, str], list[str]]:
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    ids = []
    for i in range(n):
        assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
        assert await raw.cmd(f"RCPT TO:<{tag}{i}@dest.test>") == "250 2.1.5 Ok"
        assert (await raw.cmd("DATA")).startswith("354 ")
        reply = await raw.cmd(message(f"{tag} {i}") + b".")
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        ids.append(reply.rsplit(" ", 1)[1])
    await raw.cmd("QUIT")
    return account, ids


async def _log(relay: RelayHandle, user: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = (await relay.ctl.ok("GET", "/v1/log", user=user))["entries"]
    return entries


async def _wait_outcome(relay: RelayHandle, user: str, ids: list[str], outcome: str,
                        timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait until every message has at least one log entry with ``outcome``."""
    deadline = time.monotonic() + timeout
    while True:
        entries = await _log(relay, user)
        seen = {e["message_id"] for e in entries if e["outcome"] == outcome}
        if set(ids) <= seen:
            return [e for e in entries if e["outcome"] == outcome]
        assert time.monotonic() < deadline, entries
        await asyncio.sleep(0.1)


async def _fault_then_recover(relay_factory: RelayFactory, healthy: Any,
                              start_fault: Callable[[int], Awaitable[Stopper]],
                              extra: dict[str, Any] | None = None,
                              sink_port: int | None = None) -> list[dict[str, Any]]:
    """Run the scenario; return the 'deferred' log entries seen during the fault."""
    port = sink_port or free_port()
    cfg = {k: dict(v) for k, v in FAST_RETRY.items()}
    for k, v in (extra or {}).items():
        cfg.setdefault(k, {}).update(v)
    stop = await start_fault(port)
    sink = Sink()
    try:
        relay = await relay_factory(cfg, smarthost=f"127.0.0.1:{port}")
        (user, _), ids = await _submit(relay, N, "f")
        deferred = await _wait_outcome(relay, user, ids, "deferred")
    finally:
        await stop()
    await asyncio.sleep(0.2)
    await healthy(port, sink)
    got = await sink.wait_for(N, timeout=30)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(f"f{i}@dest.test" for i in range(N))
    await _wait_outcome(relay, user, ids, "delivered")
    # The pool recovered: a new message goes straight through, without a retry wait.
    t0 = time.monotonic()
    await _submit_one_more(relay)
    await sink.wait_for(N + 1, timeout=5)
    assert time.monotonic() - t0 < 5
    return deferred


async def _submit_one_more(relay: RelayHandle) -> None:
    account = await relay.ctl.add_user("example.com")
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<after@dest.test>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    reply = await raw.cmd(message("after") + b".")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    await raw.cmd("QUIT")


async def test_4xx_at_rcpt_defers_then_delivers(relay_factory: RelayFactory,
                                                healthy: Any) -> None:
    """A 4xx to RCPT defers each recipient with that code; all arrive once it passes."""
    deferred = await _fault_then_recover(relay_factory, healthy,
                                         lambda p: _smtp_sink(p, "-r", "RCPT"))
    assert {e["code"] for e in deferred} == {450}


async def test_4xx_at_end_of_data_defers_then_delivers(relay_factory: RelayFactory,
                                                       healthy: Any) -> None:
    """A 4xx to the final "." defers; all arrive once it passes."""
    deferred = await _fault_then_recover(relay_factory, healthy,
                                         lambda p: _smtp_sink(p, "-r", "."))
    assert {e["code"] for e in deferred} == {450}


async def test_drop_after_data_defers_then_delivers(relay_factory: RelayFactory,
                                                    healthy: Any) -> None:
    """A next hop that drops the connection after the data, with no reply, defers."""
    deferred = await _fault_then_recover(relay_factory, healthy,
                                         lambda p: _smtp_sink(p, "-q", "."))
    assert {e["code"] for e in deferred} == {None}


async def test_421_mid_session_defers_then_delivers(relay_factory: RelayFactory,
                                                    healthy: Any) -> None:
    """A 421 and disconnect at MAIL defers; all arrive once it passes."""
    deferred = await _fault_then_recover(relay_factory, healthy,
                                         lambda p: _smtp_sink(p, "-Q", "MAIL"))
    assert {e["code"] for e in deferred} <= {421, None}


async def test_refused_connection_defers_then_delivers(relay_factory: RelayFactory,
                                                       healthy: Any) -> None:
    """A next hop that refuses connections defers with no code; all arrive later."""
    deferred = await _fault_then_recover(relay_factory, healthy, _nothing)
    assert {e["code"] for e in deferred} == {None}


async def test_silent_next_hop_defers_then_delivers(relay_factory: RelayFactory,
                                                    healthy: Any) -> None:
    """A next hop that never answers is given up on after the timeout; all arrive later."""
    deferred = await _fault_then_recover(relay_factory, healthy, _silent)
    assert {e["code"] for e in deferred} == {None}


async def test_tls_handshake_failure_defers_then_delivers(relay_factory: RelayFactory,
                                                          tmp_path: Path) -> None:
    """An implicit-TLS next hop whose handshake fails defers; a real TLS hop gets it all."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    port = free_port()
    plain = await start_sink(Sink(), port=port)  # speaks plaintext: the handshake fails
    try:
        relay = await relay_factory(
            {**FAST_RETRY, "delivery": {**FAST_RETRY["delivery"], "smarthost_tls": "tls",
                                        "tls_verify": False}},
            smarthost=f"127.0.0.1:{port}")
        (user, _), ids = await _submit(relay, N, "f")
        deferred = await _wait_outcome(relay, user, ids, "deferred")
    finally:
        assert plain.server is not None
        plain.server.close()
        await plain.server.wait_closed()
    assert {e["code"] for e in deferred} == {None}
    assert plain.messages == []
    sink = Sink()
    handler = _SinkHandler(sink)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: AioSMTP(handler, hostname="sink.test"), "127.0.0.1", port, ssl=server_ctx)
    try:
        got = await sink.wait_for(N, timeout=30)
        assert sorted(m.rcpt_tos[0] for m in got) == sorted(f"f{i}@dest.test" for i in range(N))
    finally:
        server.close()


async def test_5xx_fails_at_once_and_bounces(relay_factory: RelayFactory, sink: Sink) -> None:
    """A 5xx to RCPT fails the recipient at once (never retried) and a bounce to the sender
    arrives instead."""
    sink.rcpt_script.update({f"f{i}@dest.test": "550 5.1.1 No such user" for i in range(N)})
    relay = await relay_factory(FAST_RETRY)
    (user, _), ids = await _submit(relay, N, "f")
    failed = await _wait_outcome(relay, user, ids, "failed")
    assert {e["code"] for e in failed} == {550}
    got = await sink.wait_for(N, timeout=30)
    assert all(m.mail_from in ("", "<>") and m.rcpt_tos == ["app@example.com"] for m in got)
    await asyncio.sleep(1.5)  # several retry periods: a failed recipient is not retried
    entries = [e for e in await _log(relay, user) if e["message_id"] in ids]
    assert len(entries) == N and {e["outcome"] for e in entries} == {"failed"}
