"""Slow, idle and greedy clients over a real socket: idle timeout, minimum data rate,
command cap per session and connection cap per client address, each a 421 and a close."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import RelayFactory
from tests.rawsmtp import Raw

pytestmark = pytest.mark.timeout(60)


async def test_idle_client_gets_421_and_is_closed(relay_factory: RelayFactory) -> None:
    """A client silent for idle_timeout_seconds gets 421 4.4.2 and the connection closes."""
    relay = await relay_factory({"smtp": {"idle_timeout_seconds": 0.5}})
    raw = await Raw.open(relay.host, relay.port)
    assert await raw.cmd("EHLO client.test") != ""
    assert await raw.reply(timeout=3) == "421 4.4.2 Idle timeout, closing connection"
    assert await raw.closed_by_server()


async def test_commands_keep_a_session_alive(relay_factory: RelayFactory) -> None:
    """Each command restarts the idle timer: a client active past the timeout is not cut."""
    relay = await relay_factory({"smtp": {"idle_timeout_seconds": 0.5}})
    raw = await Raw.open(relay.host, relay.port)
    for _ in range(5):
        await asyncio.sleep(0.25)
        assert await raw.cmd("NOOP") == "250 2.0.0 Ok"
    raw.close()


async def test_trickling_data_is_cut_off(relay_factory: RelayFactory) -> None:
    """DATA slower than the minimum rate after the grace gets 421 4.4.2 and a close."""
    relay = await relay_factory({"smtp": {"min_data_rate_bytes_per_second": 10000,
                                          "min_data_rate_grace_seconds": 0.5,
                                          "idle_timeout_seconds": 5}})
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<a@dest.test>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    reply = None
    for _ in range(40):  # 10 bytes every 0.1 s: 100 B/s, far below 10000 B/s
        try:
            await raw.send(b"x" * 8 + b"\r\n")
        except ConnectionError:
            break
        reply = await raw.pending(0.1)
        if reply:
            break
    assert reply == b"421 4.4.2 Data rate too low, closing connection\r\n"
    assert await raw.closed_by_server()


async def test_command_cap_per_session(relay_factory: RelayFactory) -> None:
    """The command past max_commands_per_session gets 421 4.7.0 and the connection closes."""
    relay = await relay_factory({"smtp": {"max_commands_per_session": 5}})
    raw = await Raw.open(relay.host, relay.port)
    for _ in range(5):
        assert await raw.cmd("NOOP") == "250 2.0.0 Ok"
    assert await raw.cmd("NOOP") == "421 4.7.0 Too many commands, closing connection"
    assert await raw.closed_by_server()


async def test_pipelined_flood_is_capped(relay_factory: RelayFactory) -> None:
    """Thousands of pipelined commands in one write get answers up to the cap, then 421."""
    relay = await relay_factory({"smtp": {"max_commands_per_session": 100}})
    raw = await Raw.open(relay.host, relay.port)
    await raw.send(b"NOOP\r\n" * 5000)
    answers = [await raw.reply() for _ in range(101)]
    assert answers[:100] == ["250 2.0.0 Ok"] * 100
    assert answers[100] == "421 4.7.0 Too many commands, closing connection"
    assert await raw.closed_by_server()


async def test_too_many_errors_close_the_session(relay_factory: RelayFactory) -> None:
    """A client that sends only garbage is closed with 421 4.7.0 after 20 errors."""
    relay = await relay_factory()
    raw = await Raw.open(relay.host, relay.port)
    await raw.send(b"GARBAGE\r\n" * 30)
    answers = [await raw.reply() for _ in range(22)]
    assert answers[:21] == ["500 5.5.1 Command not recognized"] * 21
    assert answers[21] == "421 4.7.0 Too many errors, closing connection"
    assert await raw.closed_by_server()


async def test_connection_cap_per_client_address(relay_factory: RelayFactory) -> None:
    """The connection past max_connections_per_ip gets 421 4.7.0; other addresses still
    connect, and a slot freed is usable again."""
    relay = await relay_factory({"smtp": {"max_connections_per_ip": 2}})
    first = await Raw.open(relay.host, relay.port)
    second = await Raw.open(relay.host, relay.port)
    r, w = await asyncio.open_connection(relay.host, relay.port)
    line = await asyncio.wait_for(r.readline(), 5)
    assert line == b"421 4.7.0 Too many connections from your address\r\n"
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()
    other = await Raw.open(relay.host, relay.port, source="127.0.0.2")
    assert other.greeting == "220 relay.test ESMTP relayd"
    await first.cmd("QUIT")
    assert await first.closed_by_server()
    await asyncio.sleep(0.1)
    again = await Raw.open(relay.host, relay.port)
    assert again.greeting == "220 relay.test ESMTP relayd"
    for c in (second, other, again):
        c.close()
