"""relayd's own outbound SMTP connection (relayd.delivery.connection) against real
servers on loopback: aiosmtpd with AUTH and STARTTLS, and scripted raw servers for
what a well-behaved server never does. aiosmtplib is not imported by relayd."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from relayd.config import DeliveryConfig
from relayd.delivery import client as delivery
from relayd.delivery.connection import (
    Connection,
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPException,
)
from tests.procs import free_port
from tests.test_import_rules import IMPORTS

MSG = b"From: a@example.com\r\nSubject: t\r\n\r\n.dot line\r\nbody\r\n"


def test_relayd_does_not_import_aiosmtplib() -> None:
    """aiosmtplib is the tests' client only: no module of relayd/ or control/ imports it."""
    users = sorted({m for m, names in IMPORTS.items() for name, _line in names
                    if name.split(".")[0] == "aiosmtplib"})
    assert users == []


class _Handler:
    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.got.append((str(envelope.mail_from), list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 queued"


def _auth(server: AioSMTP, session: Session, envelope: Envelope, mechanism: str,
          data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"u", b"p w")
    return AuthResult(success=ok)


Server = Callable[..., Awaitable[tuple[_Handler, int]]]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """Start aiosmtpd servers (with AUTH, and STARTTLS when given a context)."""
    started: list[asyncio.base_events.Server] = []

    async def start(tls: ssl.SSLContext | None = None, **kw: Any) -> tuple[_Handler, int]:
        handler = _Handler()

        def factory() -> AioSMTP:
            return AioSMTP(handler, hostname="next.test", authenticator=_auth,
                           auth_require_tls=False, tls_context=tls, **kw)

        srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        started.append(srv)
        return handler, srv.sockets[0].getsockname()[1]

    yield start
    for srv in started:
        srv.close()


async def _open(port: int, **kw: Any) -> Connection:
    args: dict[str, Any] = dict(helo="relay.test", tls="none", verify=True, context=None,
                                username="", password="", connect_timeout=5,
                                reply_timeout=5)
    args.update(kw)
    return await Connection.open("127.0.0.1", port, **args)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


async def test_auth_plain_then_a_pipelined_transaction(server: Server) -> None:
    """EHLO extensions are read, AUTH succeeds, and a pipelined transaction delivers the
    dot-stuffed body byte for byte."""
    handler, port = await server()
    conn = await _open(port, username="u", password="p w")
    assert conn.supports("auth") and conn.supports("8bitmime")
    pool = delivery.Pool(delivery.Hop("127.0.0.1", port), DeliveryConfig(), "relay.test", None)
    replies = await pool._pipelined(conn, [b"MAIL FROM:<a@example.com>",
                                           b"RCPT TO:<b@example.net>"], MSG)
    assert [(r.code, r.text) for r in replies[0]] == [(250, "2.0.0 queued")]
    assert replies[1] is True
    await conn.quit()
    assert not conn.is_connected
    [(sender, rcpts, data)] = handler.got
    assert (sender, rcpts) == ("a@example.com", ["b@example.net"])
    assert data == MSG


async def test_starttls_verified_unverified_and_required(server: Server, ca: trustme.CA
                                                         ) -> None:
    """STARTTLS with a certificate the context trusts works; verification refuses an
    unknown CA, unless verification is off; STARTTLS required of a server without it fails."""
    _handler, port = await server(tls=_server_ctx(ca))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    conn = await _open(port, tls="starttls", context=trusted)
    assert conn.transport.get_extra_info("sslcontext") is trusted
    assert conn.supports("auth")  # EHLO again after the handshake
    await conn.quit()
    with pytest.raises((ssl.SSLError, SMTPException, OSError)):
        await _open(port, tls="starttls")  # the system store does not know trustme's CA
    conn = await _open(port, tls="starttls", verify=False)
    assert conn.transport.get_extra_info("sslcontext") is not None
    await conn.quit()
    conn = await _open(port, tls="opportunistic", verify=False)
    assert conn.transport.get_extra_info("sslcontext") is not None
    await conn.quit()
    _h, plain = await server()
    with pytest.raises(SMTPException, match="STARTTLS extension not supported"):
        await _open(plain, tls="starttls")
    conn = await _open(plain, tls="opportunistic", verify=False)  # not offered: plain
    assert conn.transport.get_extra_info("sslcontext") is None
    await conn.quit()


async def _raw_server(lines: Callable[[bytes], list[bytes]], greeting: bytes = b"220 raw\r\n",
                      ) -> tuple[asyncio.base_events.Server, int, list[bytes]]:
    """A server that answers each command line with ``lines(command)``; records commands."""
    seen: list[bytes] = []

    async def session(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(greeting)
        while line := await r.readline():
            seen.append(line.rstrip(b"\r\n"))
            for out in lines(line.rstrip(b"\r\n")):
                w.write(out)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(session, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], seen


async def test_helo_fallback_and_one_by_one_transaction() -> None:
    """A server without ESMTP (EHLO refused) gets HELO, then one command per round trip,
    with per-recipient replies and the body dot-stuffed."""
    def answer(cmd: bytes) -> list[bytes]:
        if cmd.startswith(b"EHLO"):
            return [b"502 5.5.1 no ESMTP\r\n"]
        if cmd.startswith(b"RCPT TO:<bad"):
            return [b"550 5.1.1 no such user\r\n"]
        if cmd == b"DATA":
            return [b"354 go\r\n"]
        if cmd == b".":
            return [b"250 2.0.0 ok\r\n"]
        if cmd.startswith((b"HELO", b"MAIL", b"RCPT", b"QUIT")):
            return [b"250 ok\r\n"] if not cmd.startswith(b"QUIT") else [b"221 bye\r\n"]
        return []

    srv, port, seen = await _raw_server(answer)
    try:
        pool = delivery.Pool(delivery.Hop("127.0.0.1", port), DeliveryConfig(), "relay.test",
                             None)
        replies = await pool.send("a@example.com", ["ok@x.test", "bad@x.test"], MSG)
        await pool.close()
    finally:
        srv.close()
    assert [(r.code, r.text) for r in replies] == [(250, "2.0.0 ok"),
                                                   (550, "5.1.1 no such user")]
    assert seen[:2] == [b"EHLO relay.test", b"HELO relay.test"]
    assert b"..dot line" in seen  # dot-stuffed on the wire
    assert seen[2:5] == [b"MAIL FROM:<a@example.com>", b"RCPT TO:<ok@x.test>",
                         b"RCPT TO:<bad@x.test>"]


async def test_bad_greeting_and_refused_connection() -> None:
    """A 554 greeting and a closed port are connection errors naming what happened."""
    srv, port, _seen = await _raw_server(lambda c: [], greeting=b"554 5.7.1 go away\r\n")
    try:
        with pytest.raises(SMTPConnectResponseError) as info:
            await _open(port)
        assert info.value.code == 554
    finally:
        srv.close()
    with pytest.raises(SMTPConnectError, match=r"Error connecting to 127\.0\.0\.1"):
        await _open(free_port())


async def test_multiline_and_pipelined_replies_are_read_in_order() -> None:
    """Replies that arrive together (pipelining) and multi-line ones are split correctly;
    the EHLO keyword AUTH=... (old form) counts as AUTH."""
    def answer(cmd: bytes) -> list[bytes]:
        if cmd.startswith(b"EHLO"):
            return [b"250-raw\r\n250-PIPELINING\r\n250-AUTH=PLAIN\r\n250 SIZE 100\r\n"]
        if cmd == b"NOOP":
            return [b"250-one\r\n250-two\r\n250 three\r\n"]
        return [b"250 ok\r\n"]

    srv, port, _seen = await _raw_server(answer)
    try:
        conn = await _open(port)
        assert conn.extensions == {"pipelining": "", "auth": "PLAIN", "size": "100"}
        conn.write(b"NOOP\r\nRSET\r\n")
        assert await conn.reply() == (250, "one\ntwo\nthree")
        assert await conn.reply() == (250, "ok")
        await conn.quit()
    finally:
        srv.close()


async def test_refused_auth_tries_each_offered_mechanism_then_fails() -> None:
    """AUTH refused by PLAIN and by LOGIN (in that order, CRAM-MD5 not offered): the
    error carries the server's code, and the connection is closed."""
    import base64

    def answer(cmd: bytes) -> list[bytes]:
        if cmd.startswith(b"EHLO"):
            return [b"250-raw\r\n250 AUTH LOGIN PLAIN\r\n"]
        if cmd.startswith(b"AUTH LOGIN"):
            return [b"334 UGFzc3dvcmQ6\r\n"]
        return [b"535 5.7.8 no\r\n"]

    srv, port, seen = await _raw_server(answer)
    try:
        with pytest.raises(SMTPAuthenticationError) as info:
            await _open(port, username="u", password="p")
        assert info.value.code == 535
    finally:
        srv.close()
    assert seen[1:] == [b"AUTH PLAIN " + base64.b64encode(b"\0u\0p"),
                        b"AUTH LOGIN " + base64.b64encode(b"u"), base64.b64encode(b"p")]
