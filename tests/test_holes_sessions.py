"""Issue 12, items 2, 9 and 11 over real sockets: a STARTTLS handshake that never
starts gives its connection slot back and never breaks the shutdown; a client that
speaks before the greeting gets 554 5.5.0; a command ended by a bare LF is refused;
the global connection cap says so, not "from your address"."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import RelayFactory, RelayHandle
from tests.rawsmtp import Raw
from tests.test_ops_support import scrape, value

pytestmark = pytest.mark.timeout(60)

PREGREET = b"554 5.5.0 Protocol error: input before the greeting\r\n"


@pytest.fixture
def tls_smtp(tmp_path: Path) -> dict[str, Any]:
    """[smtp] settings with a throw-away certificate for relay.test (STARTTLS offered)."""
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}


async def stuck_in_starttls(host: str, port: int, n: int) -> list[Raw]:
    """``n`` clients that send EHLO and STARTTLS, read the 220, and never start TLS."""
    clients = []
    for _ in range(n):
        raw = await Raw.open(host, port)
        await raw.send(b"EHLO x\r\nSTARTTLS\r\n")
        assert (await raw.reply()).startswith("250-")
        assert await raw.reply() == "220 2.0.0 Ready to start TLS"
        clients.append(raw)
    return clients


async def sessions_active(relay: RelayHandle) -> float:
    """relayd_smtp_sessions_active as /metrics shows it."""
    return value(await scrape(relay.metrics_url), "relayd_smtp_sessions_active")


async def rejections(relay: RelayHandle, reason: str) -> float:
    """relayd_smtp_rejections_total for one reason, as /metrics shows it."""
    return value(await scrape(relay.metrics_url), "relayd_smtp_rejections_total",
                 reason=reason)


async def test_timed_out_starttls_handshakes_release_their_slots(
        relay_factory: RelayFactory, tls_smtp: dict[str, Any]) -> None:
    """Clients silent after STARTTLS are closed at the idle timeout, the sessions gauge
    returns to 0 and the same address may connect again (no per-address cap left full)."""
    relay = await relay_factory({"smtp": {**tls_smtp, "idle_timeout_seconds": 1,
                                          "max_connections_per_ip": 5}})
    clients = await stuck_in_starttls(relay.host, relay.port, 5)
    assert await sessions_active(relay) == 5
    for raw in clients:
        assert await raw.closed_by_server(5)
    deadline = time.monotonic() + 3
    while await sessions_active(relay) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await sessions_active(relay) == 0
    assert not relay.relay.ctx.sessions and not relay.relay.ctx.per_ip
    again = await Raw.open(relay.host, relay.port)
    assert again.greeting == "220 relay.test ESMTP relayd"
    await again.quit()


async def test_shutdown_after_timed_out_starttls_handshakes(
        relay_factory: RelayFactory, tls_smtp: dict[str, Any]) -> None:
    """A graceful stop after handshakes were dropped at the idle timeout completes at once,
    without writing to their closed TLS transports."""
    relay = await relay_factory({"smtp": {**tls_smtp, "idle_timeout_seconds": 1}})
    clients = await stuck_in_starttls(relay.host, relay.port, 3)
    for raw in clients:
        assert await raw.closed_by_server(5)
    started = time.monotonic()
    await asyncio.wait_for(relay.stop(), 4)  # the grace is 5 s: no waiting on them
    assert time.monotonic() - started < 2


async def test_shutdown_drops_pending_starttls_handshakes_at_once(
        relay_factory: RelayFactory, tls_smtp: dict[str, Any]) -> None:
    """A graceful stop closes connections waiting in a STARTTLS handshake (no transaction
    is open there) at once instead of waiting out the grace period."""
    relay = await relay_factory({"smtp": {**tls_smtp, "idle_timeout_seconds": 30}})
    clients = await stuck_in_starttls(relay.host, relay.port, 3)
    started = time.monotonic()
    await asyncio.wait_for(relay.stop(), 4)  # the grace is 5 s
    assert time.monotonic() - started < 2
    for raw in clients:
        assert await raw.closed_by_server(2)
    assert not relay.relay.ctx.sessions and not relay.relay.ctx.per_ip


async def test_input_already_there_at_the_greeting_gets_554(
        relay_factory: RelayFactory) -> None:
    """A command sent before the 220 (already received when the greeting is due) gets
    554 5.5.0 instead of the greeting, the connection is closed, and it is counted."""
    relay = await relay_factory()
    # Connect and send synchronously: the bytes are in relayd's socket before its
    # event loop (this test's) has even accepted the connection.
    with socket.create_connection((relay.host, relay.port), timeout=5) as sock:
        sock.sendall(b"EHLO early.test\r\n")
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        assert await asyncio.wait_for(reader.read(), 5) == PREGREET
        writer.close()
    assert await rejections(relay, "pregreet") == 1


async def test_early_talker_during_greet_pause_gets_554(relay_factory: RelayFactory) -> None:
    """With greet_pause_seconds, a client that speaks during the pause gets 554 5.5.0
    and is closed; its command is never answered."""
    relay = await relay_factory({"smtp": {"greet_pause_seconds": 0.5}})
    reader, writer = await asyncio.open_connection(relay.host, relay.port)
    await asyncio.sleep(0.1)
    writer.write(b"EHLO early.test\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == PREGREET
    writer.close()
    assert await rejections(relay, "pregreet") == 1


async def test_greet_pause_delays_the_greeting(relay_factory: RelayFactory) -> None:
    """With greet_pause_seconds, a client that waits gets the 220 after the pause and a
    normal session."""
    relay = await relay_factory({"smtp": {"greet_pause_seconds": 0.4}})
    started = time.monotonic()
    raw = await Raw.open(relay.host, relay.port)
    assert time.monotonic() - started >= 0.35
    assert raw.greeting == "220 relay.test ESMTP relayd"
    assert await raw.cmd("NOOP") == "250 2.0.0 Ok"
    await raw.quit()


async def test_command_ended_by_bare_lf_is_refused_and_not_run(
        relay_factory: RelayFactory) -> None:
    """A command line ended by a bare LF gets 500 5.5.2 and does not run (the next
    command sees no transaction); the session goes on."""
    relay = await relay_factory()
    await relay.ctl.add_domain("example.com")
    await relay.ctl.add_user("example.com", networks=["127.0.0.1/32"])
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.cmd("EHLO client.test")).startswith("250-")
    await raw.send(b"MAIL FROM:<app@example.com>\n")
    assert await raw.reply() == "500 5.5.2 Bare LF in command line not allowed"
    assert await raw.cmd("RCPT TO:<r@dest.test>") == "503 5.5.1 Need MAIL command first"
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    await raw.quit()
    assert await rejections(relay, "bad_line_ending") == 1


async def test_global_connection_cap_has_its_own_reply(relay_factory: RelayFactory) -> None:
    """Past max_connections, a client with no other connection is told the server is full
    (421 4.3.2, reason too_many_connections_global), not "from your address"."""
    relay = await relay_factory({"smtp": {"max_connections": 2,
                                          "max_connections_per_ip": 100}})
    first = await Raw.open(relay.host, relay.port)
    second = await Raw.open(relay.host, relay.port)
    reader, writer = await asyncio.open_connection(relay.host, relay.port,
                                                   local_addr=("127.0.0.2", 0))
    assert await asyncio.wait_for(reader.read(), 5) == \
        b"421 4.3.2 Too many connections, try again later\r\n"
    writer.close()
    assert await rejections(relay, "too_many_connections_global") == 1
    assert await rejections(relay, "too_many_connections") == 0
    for raw in (first, second):
        await raw.quit()


async def test_client_that_stops_reading_is_cut_and_releases_its_slot(
        relay_factory: RelayFactory) -> None:
    """A client that pipelines commands but never reads the replies (its window fills,
    relayd's writes stall) is dropped at the idle timeout and its slot given back."""
    relay = await relay_factory({"smtp": {"idle_timeout_seconds": 1,
                                          "max_commands_per_session": 10**8}})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (relay.host, relay.port))
    await asyncio.sleep(0.1)
    chunk = b"EHLO x\r\n" * 1000  # 8 octets in, about 170 out
    blocked = 0
    try:
        while blocked < 10:  # until relayd stops reading: its replies are stuck
            try:
                sock.send(chunk)
                blocked = 0
            except BlockingIOError:
                blocked += 1
                await asyncio.sleep(0.05)
        assert await sessions_active(relay) == 1
        deadline = time.monotonic() + 5
        while await sessions_active(relay) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await sessions_active(relay) == 0
        assert not relay.relay.ctx.sessions and not relay.relay.ctx.per_ip
    finally:
        sock.close()
