"""One outbound SMTP connection: our own small client over asyncio's public API.

Owns: connecting to a next hop (plain, implicit TLS, STARTTLS required or
opportunistic), the greeting, EHLO (HELO for a server without ESMTP) and its
extensions, AUTH (CRAM-MD5, PLAIN or LOGIN: the first the server offers, in
that order), reading replies (multi-line ones, and several at once when
commands were pipelined), writing commands and data, RSET and QUIT. The
transaction (MAIL, RCPT, DATA, pipelined or one by one) is
relayd.delivery.client's, through ``command``, ``write`` and ``reply``.

Why our own: the hot path pipelines MAIL, every RCPT and DATA (RFC 2920) and
writes the body dot-stuffed once. aiosmtplib reads exactly one reply per
command and normalises the body with regexes; going around it meant lending
its transport to another protocol. This is the part of it relayd used, over
``loop.create_connection`` and ``loop.start_tls``. The errors keep
aiosmtplib's names and texts (``SMTPConnectError: Error connecting to ...``),
so the delivery log reads as before.

Untrusted input: replies of remote servers (a reply longer than 64 KiB ends
the connection; codes that are not numbers read as 0). Settings read: none
(relayd.delivery.client passes hop, timeouts and TLS choices).
See also: relayd.delivery.client (pools and the transaction).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ssl
from collections.abc import Callable

from relayd.delivery import dane, tlslevels

_MAX_REPLY = 64 * 1024
QUIT_TIMEOUT_SECONDS = 5.0
#: AUTH mechanisms in the order they are tried, when the server offers them.
AUTH_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")


class SMTPException(Exception):
    """Trouble with the connection or the session: no reply to use for a recipient."""


class SMTPServerDisconnected(SMTPException):
    """The connection was closed (by the next hop, or after an error)."""


class SMTPConnectError(SMTPException):
    """The connection could not be made (refused, unreachable, TLS, no greeting)."""


class SMTPConnectTimeoutError(SMTPConnectError):
    """Connecting, or waiting for the greeting, took longer than the connect timeout."""


class SMTPTLSRequired(SMTPConnectError):
    """The TLS level (encrypt, verify) could not be met: no STARTTLS, or it failed."""


class SMTPDaneFailed(SMTPTLSRequired):
    """Secure TLSA records (DANE): no STARTTLS, a failed handshake, or no record matched."""


class SMTPStartTLSFailed(SMTPConnectError):
    """Level may: STARTTLS was offered but failed (the caller retries in plaintext)."""


class SMTPResponseException(SMTPException):
    """A reply that ends the session's set-up: its code and text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class SMTPConnectResponseError(SMTPResponseException):
    """The greeting was not 220."""


class SMTPHeloError(SMTPResponseException):
    """Neither EHLO nor HELO was accepted."""


class SMTPAuthenticationError(SMTPResponseException):
    """AUTH was refused."""


def tls_context(verify: bool) -> ssl.SSLContext:
    """A client context: verify the certificate and the name, or encrypt only."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = verify
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return ctx


_LEVEL_CONTEXTS: dict[tuple[bool, str], ssl.SSLContext] = {}


def level_context(verify: bool, ca_file: str) -> ssl.SSLContext:
    """The client context of a TLS level (kept: loading a trust store reads files).

    ``verify``: the certificate must chain to ``ca_file`` (a PEM file; "" = the
    system's trust store) and be valid for the name given at the handshake.
    """
    key = (verify, ca_file if verify else "")
    ctx = _LEVEL_CONTEXTS.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=key[1] or None)
        ctx.check_hostname = verify
        ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
        _LEVEL_CONTEXTS[key] = ctx
    return ctx


def forget_level_contexts() -> None:
    """A reload: the next connections load the trust store (``tls_ca_file``) again."""
    _LEVEL_CONTEXTS.clear()


async def _tls_context(verify: bool) -> ssl.SSLContext:
    """``tls_context`` in a thread: loading the system's CA certificates reads files."""
    return await asyncio.to_thread(tls_context, verify)


class _Replies(asyncio.Protocol):
    """Reads replies as they come and queues every complete one, in order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._replies: list[tuple[int, str]] = []
        self._waiter: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol --------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buf.extend(data)
        while True:
            reply = self._parse()
            if reply is None:
                break
            self._replies.append(reply)
        if len(self._buf) > _MAX_REPLY:
            self._fail(SMTPServerDisconnected("reply too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("connection closed by the next hop"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(SMTPServerDisconnected(f"connection lost: {exc}" if exc
                                          else "connection lost"))
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- reading -----------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> tuple[int, str] | None:
        """One complete (possibly multi-line) reply from the buffer, or None."""
        lines: list[str] = []
        offset = 0
        while True:
            end = self._buf.find(b"\n", offset)
            if end < 0:
                return None
            line = bytes(self._buf[offset:end + 1])
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                break
        try:
            code = int(line[:3])
        except ValueError:
            code = 0  # not a reply: treated as a temporary failure by the caller
        del self._buf[:offset]
        return code, "\n".join(lines)

    async def reply(self, seconds: float) -> tuple[int, str]:
        """The next reply, in order; raise SMTPServerDisconnected or TimeoutError.

        A reply already read (pipelined replies come together) is returned
        without waiting; otherwise one future and one timer (not ``wait_for``,
        which costs a task-like wrapper per call on this per-message path).
        """
        if self._replies:
            return self._replies.pop(0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._replies:
            if self.lost is not None:
                raise self.lost
            if loop.time() >= deadline:
                raise TimeoutError("timed out waiting for the next hop's reply")
            waiter = self._waiter = loop.create_future()
            timer = loop.call_at(deadline, self._wake)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._replies.pop(0)

    async def drain(self, seconds: float) -> None:
        """Wait until the transport's write buffer has room again."""
        if not self._writable.is_set():
            await asyncio.wait_for(self._writable.wait(), seconds)
        if self.lost is not None:
            raise self.lost


class Connection:
    """An open SMTP session with a next hop, ready for MAIL (``open`` makes one)."""

    def __init__(self, host: str, replies: _Replies, transport: asyncio.Transport,
                 timeout: float) -> None:
        self.host = host
        self._replies = replies
        self.transport = transport
        self.timeout = timeout  # seconds to wait for each reply
        self.extensions: dict[str, str] = {}  # EHLO keywords (lower case) -> parameters
        self.encrypted = False  # STARTTLS succeeded (TLS levels only)
        self.verified = False  # ...with a certificate valid for the MX name (level verify)
        self.dane = False  # ...with a certificate matching the MX's TLSA records (DANE)

    @classmethod
    async def open(cls, host: str, port: int, *, helo: str, tls: str, verify: bool,
                   context: ssl.SSLContext | None, username: str, password: str,
                   connect_timeout: float, reply_timeout: float, server_name: str = "",
                   ca_file: str = "", tlsa: tuple[dane.Tlsa, ...] = ()) -> Connection:
        """Connect, read the greeting, EHLO, STARTTLS and AUTH as asked.

        ``tls``: none | tls (implicit) | starttls (required) | opportunistic
        (STARTTLS when offered), or a TLS level (may | encrypt | verify:
        relayd.delivery.tlslevels; ``server_name`` is the MX name for SNI and
        verification, ``ca_file`` the trust store; ``tlsa``: the MX host's
        checkable secure TLSA records, relayd.delivery.dane). ``verify``: check the
        certificate and name (not for levels).
        """
        ctx = (context or await _tls_context(verify)) if tls == "tls" else None
        replies = _Replies()
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(loop.create_connection(
                lambda: replies, host, port, ssl=ctx,
                ssl_handshake_timeout=connect_timeout if ctx else None), connect_timeout)
        except TimeoutError as exc:
            raise SMTPConnectTimeoutError(
                f"Timed out connecting to {host} on port {port}") from exc
        except OSError as exc:  # ssl.SSLError included
            raise SMTPConnectError(f"Error connecting to {host} on port {port}: {exc}") from exc
        conn = cls(host, replies, transport, reply_timeout)
        try:
            await conn._greeting(port, connect_timeout)
            await conn._hello(helo)
            if tls == "starttls" or (tls == "opportunistic" and conn.supports("starttls")):
                await conn._starttls(context or await _tls_context(verify), helo)
            elif tls in ("may", "encrypt", "verify") and tlsa:
                await conn._dane_starttls(helo, server_name or host, tlsa)
            elif tls in ("may", "encrypt", "verify"):
                await conn._level_starttls(tls, helo, server_name or host, ca_file)
            if username:
                await conn._login(username, password)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _greeting(self, port: int, seconds: float) -> None:
        try:
            code, text = await self._replies.reply(seconds)
        except SMTPServerDisconnected as exc:
            raise SMTPConnectError(
                f"Error connecting to {self.host} on port {port}: {exc}") from exc
        except TimeoutError as exc:
            raise SMTPConnectTimeoutError("Timed out waiting for server ready message") from exc
        if code != 220:
            raise SMTPConnectResponseError(code, text)

    async def _hello(self, helo: str) -> None:
        """EHLO (and know the extensions), else HELO for a server without ESMTP."""
        code, text = await self.command(b"EHLO " + helo.encode("ascii"))
        self.extensions = {}
        if code == 250:
            for line in text.split("\n")[1:]:
                keyword, _, params = line.partition(" ")
                if keyword.upper().startswith("AUTH="):  # the pre-RFC 4954 form
                    keyword, params = "AUTH", f"{keyword[5:]} {params}"
                self.extensions[keyword.lower()] = params.strip()
            return
        code, text = await self.command(b"HELO " + helo.encode("ascii"))
        if code != 250:
            raise SMTPHeloError(code, text)

    async def _level_starttls(self, level: str, helo: str, name: str, ca_file: str) -> None:
        """STARTTLS at a TLS level: what a missing STARTTLS or a failed handshake means."""
        if not self.supports("starttls"):
            if tlslevels.requires_tls(level):
                raise SMTPTLSRequired(tlslevels.no_starttls_text(level, name))
            return
        verify = tlslevels.verifies(level)
        ctx = _LEVEL_CONTEXTS.get((verify, ca_file if verify else ""))
        if ctx is None:  # the first connection at this level: the trust store is read
            ctx = await asyncio.to_thread(level_context, verify, ca_file)
        try:
            await self._starttls(ctx, helo, name)
        except (SMTPException, TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            error = f"{type(exc).__name__}: {exc}"
            if tlslevels.requires_tls(level):
                raise SMTPTLSRequired(tlslevels.handshake_text(level, name, error)) from exc
            raise SMTPStartTLSFailed(f"STARTTLS with {name} failed: {error}") from exc
        self.encrypted = True
        self.verified = verify

    async def _dane_starttls(self, helo: str, name: str, tlsa: tuple[dane.Tlsa, ...]) -> None:
        """STARTTLS at a hop with secure TLSA records: required, the certificate checked
        against them (relayd.delivery.dane) before anything is sent under TLS."""
        if not self.supports("starttls"):
            raise SMTPDaneFailed(dane.no_starttls_text(name))
        try:
            ctx = dane.context(tlsa)
            await self._starttls(ctx, helo, name, self._dane_check(name, tlsa))
        except SMTPDaneFailed:
            raise
        except (SMTPException, TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            error = f"{type(exc).__name__}: {exc}"
            raise SMTPDaneFailed(dane.handshake_text(name, error)) from exc
        self.encrypted = True
        self.dane = True

    def _dane_check(self, name: str, tlsa: tuple[dane.Tlsa, ...]) -> Callable[[], None]:
        """The check run right after the handshake: the leaf against the DANE-EE records
        (DANE-TA ``2 0 0``: the handshake itself verified the chain and the name)."""
        def check() -> None:
            if not dane.checks_leaf(tlsa):
                return
            sslobj = self.transport.get_extra_info("ssl_object")
            leaf = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if not leaf or not dane.ee_matches(leaf, tlsa):
                self.close()
                raise SMTPDaneFailed(dane.mismatch_text(name, tlsa))
        return check

    async def _starttls(self, ctx: ssl.SSLContext, helo: str, name: str = "",
                        check: Callable[[], None] | None = None) -> None:
        if not self.supports("starttls"):
            raise SMTPException("SMTP STARTTLS extension not supported by server.")
        code, text = await self.command(b"STARTTLS")
        if code != 220:
            raise SMTPResponseException(code, text)
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self._replies, ctx,
                                         server_hostname=name or self.host,
                                         ssl_handshake_timeout=self.timeout)
        if transport is None:
            raise SMTPServerDisconnected("connection lost during the TLS handshake")
        self.transport = transport
        if check is not None:
            check()  # DANE: the certificate, before EHLO goes out under TLS
        await self._hello(helo)  # the extensions may differ under TLS (RFC 3207)

    async def _login(self, username: str, password: str) -> None:
        if not self.supports("auth"):
            raise SMTPException("The SMTP AUTH extension is not supported by this server.")
        offered = self.extensions["auth"].upper().split()
        mechanisms = [m for m in AUTH_MECHANISMS if m in offered]
        if not mechanisms:
            raise SMTPException("No suitable authentication method found.")
        refused: SMTPAuthenticationError | None = None
        for mechanism in mechanisms:
            code, text = await self._auth(mechanism, username.encode(), password.encode())
            if code == 235:
                return
            refused = SMTPAuthenticationError(code, text)
        assert refused is not None
        raise refused

    async def _auth(self, mechanism: str, user: bytes, password: bytes) -> tuple[int, str]:
        """One AUTH exchange; the final reply (235 when accepted)."""
        if mechanism == "PLAIN":
            return await self.command(b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + password))
        if mechanism == "LOGIN":
            code, text = await self.command(b"AUTH LOGIN " + _b64(user))
            return await self.command(_b64(password)) if code == 334 else (code, text)
        code, text = await self.command(b"AUTH CRAM-MD5")
        if code != 334:
            return code, text
        challenge = base64.b64decode(text.encode("ascii"), validate=False)
        digest = hmac.new(password, challenge, "md5").hexdigest().encode("ascii")
        return await self.command(_b64(user + b" " + digest))

    # -- what the transaction uses ---------------------------------------------------
    def supports(self, extension: str) -> bool:
        """Whether the server's EHLO listed this extension (lower case)."""
        return extension in self.extensions

    @property
    def is_connected(self) -> bool:
        """Open, as far as this side knows."""
        return self._replies.lost is None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        """Send bytes as they are; raise SMTPServerDisconnected when the connection is gone."""
        if not self.is_connected:
            raise SMTPServerDisconnected(str(self._replies.lost or "connection closed"))
        self.transport.write(data)

    def writelines(self, pieces: list[bytes]) -> None:
        """Send several pieces in one call (one syscall for small ones)."""
        if not self.is_connected:
            raise SMTPServerDisconnected(str(self._replies.lost or "connection closed"))
        self.transport.writelines(pieces)

    async def reply(self, seconds: float | None = None) -> tuple[int, str]:
        """The next reply (code, text); raise SMTPServerDisconnected or TimeoutError."""
        return await self._replies.reply(self.timeout if seconds is None else seconds)

    async def command(self, line: bytes) -> tuple[int, str]:
        """One command and its reply."""
        self.write(line + b"\r\n")
        return await self.reply()

    async def drain(self, seconds: float) -> None:
        """Wait until what was written can go out (large bodies)."""
        await self._replies.drain(seconds)

    async def rset(self) -> None:
        """End a failed transaction; close the connection if RSET is not accepted."""
        try:
            code, _ = await self.command(b"RSET")
        except (SMTPException, TimeoutError, OSError):
            code = 0
        if code != 250:
            self.close()

    async def quit(self) -> None:
        """QUIT (waiting at most QUIT_TIMEOUT_SECONDS for the reply), then close."""
        try:
            if self.is_connected:
                self.write(b"QUIT\r\n")
                await self.reply(QUIT_TIMEOUT_SECONDS)
        except (SMTPException, TimeoutError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Close now (what was written is still sent)."""
        self.transport.close()


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)
