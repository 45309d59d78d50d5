"""TLS over a real socket: nothing pipelined after STARTTLS survives the upgrade, AUTH
is refused on plaintext where required and works after STARTTLS, and the implicit-TLS
listener serves a full submission."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.rawsmtp import Raw, plain

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[ssl.SSLContext, dict[str, Any]]:
    """A throw-away CA, a server certificate for relay.test, and the client context."""
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return client, {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file),
                    "plaintext_auth_networks": []}


async def _tls_relay(relay_factory: RelayFactory, smtp: dict[str, Any]) -> RelayHandle:
    relay = await relay_factory({"smtp": smtp})
    await relay.ctl.add_domain("example.com")
    return relay


async def test_commands_pipelined_with_starttls_are_discarded(
        relay_factory: RelayFactory, tls_files: tuple[ssl.SSLContext, dict[str, Any]]) -> None:
    """A MAIL sent in the same packet as STARTTLS is never answered, before or after TLS."""
    client_ctx, smtp = tls_files
    relay = await _tls_relay(relay_factory, smtp)
    raw = await Raw.open(relay.host, relay.port)
    assert "250-STARTTLS" in await raw.cmd("EHLO client.test")
    await raw.send(b"STARTTLS\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<x@dest.test>\r\n")
    assert await raw.reply() == "220 2.0.0 Ready to start TLS"
    await raw.writer.start_tls(client_ctx, server_hostname="relay.test")
    assert await raw.pending(0.3) == b""  # nothing queued for the smuggled commands
    ehlo = await raw.cmd("EHLO client.test")
    assert ehlo.startswith("250-relay.test") and "250-AUTH PLAIN LOGIN" in ehlo
    assert "STARTTLS" not in ehlo
    assert await raw.cmd("RCPT TO:<x@dest.test>") == "503 5.5.1 Need MAIL command first"
    raw.close()


async def test_plaintext_auth_is_refused_and_not_advertised(
        relay_factory: RelayFactory, tls_files: tuple[ssl.SSLContext, dict[str, Any]]) -> None:
    """Without TLS, from a network not allowed plaintext AUTH: no AUTH in EHLO, 538 5.7.11."""
    _, smtp = tls_files
    relay = await _tls_relay(relay_factory, smtp)
    account = await relay.ctl.add_user("example.com")
    raw = await Raw.open(relay.host, relay.port)
    ehlo = await raw.cmd("EHLO client.test")
    assert "AUTH" not in ehlo and "250-STARTTLS" in ehlo
    assert await raw.cmd(f"AUTH PLAIN {plain(*account)}") == \
        "538 5.7.11 Encryption required for requested authentication mechanism"
    assert await raw.cmd("AUTH LOGIN") == \
        "538 5.7.11 Encryption required for requested authentication mechanism"
    raw.close()


async def test_auth_works_after_starttls(
        relay_factory: RelayFactory, sink: Sink,
        tls_files: tuple[ssl.SSLContext, dict[str, Any]]) -> None:
    """After STARTTLS, AUTH is advertised, succeeds, and a message goes through."""
    client_ctx, smtp = tls_files
    relay = await _tls_relay(relay_factory, smtp)
    user, password = await relay.ctl.add_user("example.com")
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, tls_context=client_ctx,
                             start_tls=True, timeout=10)
    await client.connect()
    await client.ehlo()
    assert client.supports_extension("auth")
    resp = await client.login(user, password)
    assert (resp.code, resp.message) == (235, "2.7.0 Authentication successful")
    _, reply = await client.sendmail("app@example.com", ["t@dest.test"], message("tls"))
    assert reply.startswith("2.0.0 Ok: queued as ")
    await client.quit()
    [got] = await sink.wait_for(1)
    assert b"with ESMTPSA" in got.data


async def test_implicit_tls_listener_serves_a_submission(
        relay_factory: RelayFactory, sink: Sink,
        tls_files: tuple[ssl.SSLContext, dict[str, Any]]) -> None:
    """The tls_listen listener speaks TLS from the first byte; AUTH and DATA work over it."""
    client_ctx, smtp = tls_files
    relay = await _tls_relay(relay_factory, {**smtp, "tls_listen": "127.0.0.1:0"})
    user, password = await relay.ctl.add_user("example.com")
    smtps = next(x for x in relay.relay.listeners if x.kind == "smtps").address
    host, _, port = smtps.rpartition(":")
    raw = await Raw.open(host, int(port), tls=client_ctx)
    assert raw.greeting == "220 relay.test ESMTP relayd"
    ehlo = await raw.cmd("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo
    assert await raw.cmd(f"AUTH PLAIN {plain(user, password)}") == \
        "235 2.7.0 Authentication successful"
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<i@dest.test>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    assert (await raw.cmd(message("smtps") + b".")).startswith("250 2.0.0 Ok: queued as ")
    assert await raw.cmd("QUIT") == "221 2.0.0 Bye"
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["i@dest.test"]


async def test_failed_tls_handshake_closes_only_that_session(
        relay_factory: RelayFactory, tls_files: tuple[ssl.SSLContext, dict[str, Any]]) -> None:
    """Garbage instead of a TLS handshake closes that connection without leaking its slot."""
    _, smtp = tls_files
    relay = await _tls_relay(relay_factory, smtp)
    raw = await Raw.open(relay.host, relay.port)
    await raw.cmd("EHLO client.test")
    assert await raw.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    await raw.send(b"this is not a TLS client hello\r\n" * 4)
    assert await raw.closed_by_server(10)
    other = await Raw.open(relay.host, relay.port)
    assert await other.cmd("NOOP") == "250 2.0.0 Ok"
    other.close()
    for _ in range(50):  # both sessions are forgotten: no leaked slot for the address
        if not relay.relay.ctx.sessions and not relay.relay.ctx.per_ip:
            break
        await asyncio.sleep(0.05)
    assert not relay.relay.ctx.sessions and not relay.relay.ctx.per_ip
