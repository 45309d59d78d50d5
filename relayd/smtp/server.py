"""The SMTP submission server: the only module that imports aiosmtpd.

Owns: the per-connection protocol state machine on top of aiosmtpd's
``SMTP`` class — greeting, EHLO, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, RSET,
NOOP, QUIT, VRFY, HELP and STARTTLS (aiosmtpd's TLS upgrade machinery) — and
the translation of each command into calls to relayd.smtp.policy, the credential
cache, and the spool. Replies come from relayd.smtp.replies only.

Why the command loop is our own: aiosmtpd 1.4.6 builds its command tables
with ``inspect`` on every connection, replies to every command with its own
``write``+``drain``, parses addresses with ``email._header_value_parser``,
reads DATA line by line, passes bare LF/CR and NUL through (SMTP smuggling),
and runs authenticators synchronously on the loop. Here: tables are built
once per class, input is read in large chunks into one buffer, replies to
pipelined commands are coalesced into one write, addresses are parsed by
relayd.smtp.address, DATA is framed only on CRLF.CRLF and refused if it has bare
CR/LF/NUL, and argon2 runs in a thread pool (relayd.directory.credentials), each check
admitted (and counted from its start) by relayd.smtp.policy.AuthThrottle.

Line limits (``500 5.5.2`` past them, the rest of the line discarded
without being buffered): a command line is at most 512 octets with its CRLF
(RFC 5321 §4.5.3.1.4), except MAIL and RCPT, whose limit that section lets
extensions raise (SIZE +26 octets, AUTH= +500, SMTPUTF8 addresses are longer
in octets): 2048, rounded up as Postfix's ``line_length_limit``; and AUTH with
its initial response and the answers to its challenges: 12288 (RFC 4954 §4).
A line of message data is at most 1000 octets with its CRLF (§4.5.3.1.6).
The message size is enforced while reading: past ``max_message_size_bytes``
the data is discarded as it arrives (never buffered whole) and the end of
DATA gets ``552 5.3.4``.

Session ends: a client that speaks before the 220 gets ``554 5.5.0`` instead
of it (an optional silent pause, ``greet_pause_seconds``, catches early
talkers; with none, only input already received when the greeting is due);
a command line ended by a bare LF gets ``500 5.5.2`` and does not run. Every
way out of a session (close, reset, idle timeout, shutdown, a STARTTLS
handshake that never completes) gives the connection slot back exactly once
(``_release``), and nothing is written to a transport once it is closing.

Untrusted input: everything the client sends. A client never sees an
exception text: any handler error becomes ``451 4.3.0`` and a log entry.
Settings read: [smtp], [limits], [server].hostname (through SmtpContext).
See also: relayd.smtp.policy, relayd.smtp.replies, relayd.smtp.address,
relayd.directory.credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import inspect
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from random import getrandbits as _randbits
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP as _AioSMTP

from relayd.config import Config
from relayd.directory.accounts import Account, Directory
from relayd.directory.credentials import AuthOutcome, CredentialCache
from relayd.ids import format_id
from relayd.smtp import policy, replies
from relayd.smtp.address import PathError, parse_mail_from, parse_rcpt_to
from relayd.smtp.replies import Reply
from relayd.store.spool import NewMessage, Spool

# Command line limits in octets, CRLF included (see the module docstring).
COMMAND_LINE_MAX = 512
MAIL_LINE_MAX = 2048
AUTH_LINE_MAX = 12288
_LINE_MAX = {"MAIL": MAIL_LINE_MAX, "RCPT": MAIL_LINE_MAX, "AUTH": AUTH_LINE_MAX}
_READ_CHUNK = 65536
#: How long a connection closed after a 421 may wait for the client to read the
#: reply before it is dropped (a client that never reads would hold it forever).
CLOSE_WAIT_SECONDS = 2.0
_get_running_loop = asyncio.get_running_loop


class Accepting(Protocol):
    """What the server needs from the scheduler (kept as a protocol: no import cycle)."""

    def queued_count(self, account_id: int) -> int:
        """Messages of this account not yet in a final state (cheap, no I/O)."""

    def enqueue_new(self, msg: NewMessage) -> None:
        """Hand a committed message to delivery (cheap, no I/O)."""


class Signing(Protocol):
    """DKIM signing at acceptance (runs off the loop)."""

    async def sign(self, account: Account, data: bytes) -> bytes:
        """Return ``data`` with the domain's DKIM-Signature header(s) prepended."""


class Events(Protocol):
    """Observability hooks (metrics and logs), called on the hot path: must be cheap."""

    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def rejected(self, reply: Reply, session: SessionState, detail: str = "") -> None: ...
    def auth_result(self, session: SessionState, username: str, reason: str,
                    cache_hit: bool) -> None: ...
    def accepted(self, session: SessionState, message_id: str, size: int, rcpts: int,
                 seconds: float) -> None: ...
    def error(self, session: SessionState, where: str, exc: BaseException) -> None: ...


@dataclass
class SmtpContext:
    """Everything a session needs, built once by relayd.app (``reconfigure`` at a reload)."""

    hostname: str
    directory: Directory
    credentials: CredentialCache
    spool: Spool
    scheduler: Accepting
    signer: Signing | None
    events: Events
    plaintext_auth: policy.PlaintextAuthPolicy
    throttle: policy.AuthThrottle
    max_message_size: int
    max_recipients: int
    max_queued_per_account: int
    min_free_disk: int
    free_disk: Callable[[], int]
    idle_timeout: float
    min_data_rate: int
    max_commands: int
    max_connections: int
    max_connections_per_ip: int
    smtputf8: bool
    data_rate_grace: float = 30.0
    allow_address_literals: bool = False
    greet_pause: float = 0.0  # seconds of silence before the 220 (early-talker check)
    clock: Callable[[], float] = time.time
    sessions: set[RelaySMTP] = field(default_factory=set)
    per_ip: dict[str, int] = field(default_factory=dict)
    shutting_down: bool = False
    auth_turn: asyncio.Event = field(default_factory=asyncio.Event)  # set when a check ends
    auth_waiting: int = 0  # AUTHs waiting for their turn (policy.Admission.wait)

    def reconfigure(self, cfg: Config, plaintext_auth: policy.PlaintextAuthPolicy,
                    tls: ssl.SSLContext | None) -> None:
        """A reload: the session limits of ``cfg`` from every session's next command.

        ``plaintext_auth`` is built from ``cfg`` by the caller (it can fail, and a
        reload is all or nothing). ``tls``: the certificate for a STARTTLS not
        issued yet, in sessions that offer it (new sessions get it from the listener).
        """
        sm, lim = cfg.smtp, cfg.limits
        self.max_queued_per_account = lim.max_queued_per_account
        self.min_free_disk = lim.min_free_disk_bytes
        self.max_recipients = sm.max_recipients
        self.max_message_size = sm.max_message_size_bytes
        self.idle_timeout = sm.idle_timeout_seconds
        self.min_data_rate = sm.min_data_rate_bytes_per_second
        self.max_commands = sm.max_commands_per_session
        self.max_connections = sm.max_connections
        self.max_connections_per_ip = sm.max_connections_per_ip
        self.greet_pause = sm.greet_pause_seconds
        self.plaintext_auth = plaintext_auth
        if tls is not None:
            for s in self.sessions:
                if s.tls_context is not None:
                    s.tls_context = tls


@dataclass(slots=True)
class SessionState:
    """Per-connection facts, as logs and metrics see them."""

    peer_ip: str
    sid: str = ""  # session id for logs: 12 hex digits, set at connection
    tls: bool = False
    helo: str = ""
    esmtp: bool = False
    account: Account | None = None
    epoch: int = -1
    via_network: bool = False
    commands: int = 0
    errors: int = 0


class _ClientGone(Exception):
    """The client closed the connection."""


class RelaySMTP(_AioSMTP):
    """One SMTP connection to relayd."""

    _COMMANDS: dict[str, str] = {}  # filled below: verb -> method name

    def __init__(self, ctx: SmtpContext, tls_context: ssl.SSLContext | None = None,
                 implicit_tls: bool = False) -> None:
        # Deliberately not calling aiosmtpd's (nor StreamReaderProtocol's) __init__:
        # aiosmtpd introspects the class and the handler on every connection, and a
        # StreamReader/StreamWriter pair per connection costs more than the few
        # attributes below. Input arrives through ``data_received`` into ``_rx``;
        # aiosmtpd's STARTTLS machinery uses only ``loop``, ``transport``,
        # ``tls_context``, ``_tls_protocol``, ``_original_transport`` and ``push``.
        self.loop = _get_running_loop()
        self.ctx = ctx
        self.tls_context = None if implicit_tls else tls_context
        self._tls_protocol = None
        self._original_transport = None
        self._tls_handshake_okay = True
        self.transport: Any = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        self._implicit_tls = implicit_tls
        self._inbuf = bytearray()
        self._rx = bytearray()  # received, not yet taken by _fill
        self._rx_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self.state = SessionState(peer_ip="")
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        self._smtputf8 = False
        self._idle = True  # waiting for a command outside a transaction
        self._closing = False
        self._active = 0.0  # loop time of the last input: the idle timer checks it lazily
        self._timer: asyncio.TimerHandle | None = None
        self._released = True  # no slot taken yet (connection_made takes one)
        self._shut = False  # we closed the transport: nothing more is written to it

    # -- connection ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start a session (or finish a STARTTLS upgrade)."""
        if self.transport is not None and self._original_transport is not None:
            # STARTTLS: the SSL layer hands us its application transport.
            self.transport = transport
            self._inbuf.clear()  # RFC 3207 §4.2: discard anything pipelined in plaintext
            self._rx.clear()
            self._tls_handshake_okay = True
            self.state.tls = True
            self._touch()
            return
        self.transport = transport
        st = self.state
        peer = transport.get_extra_info("peername")
        st.peer_ip = ip = str(peer[0]) if peer else ""
        st.sid = f"{_randbits(48):012x}"
        if self._implicit_tls:
            st.tls = True
        ctx = self.ctx
        ctx.events.connection_opened()
        ctx.sessions.add(self)
        self._released = False
        ctx.per_ip[ip] = ctx.per_ip.get(ip, 0) + 1
        loop = self.loop
        self._active = now = loop.time()
        self._timer = loop.call_at(now + self.ctx.idle_timeout, self._idle_check)
        self._handler_coroutine = loop.create_task(self._handle_client())

    def data_received(self, data: bytes) -> None:
        """Queue input for the command loop; stop reading while it is far behind."""
        rx = self._rx
        rx += data
        if len(rx) > 2 * _READ_CHUNK and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        waiter = self._rx_waiter
        if waiter is not None:
            self._rx_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool:
        """The client half-closed: end the session (as aiosmtpd does)."""
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        return not self.state.tls  # keep a plain transport open until the handler closes it

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the session."""
        self._release()
        if self._original_transport is not None:
            self._original_transport.close()  # STARTTLS: close the socket under the SSL layer
        self._wake_gone()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        self.transport = None

    def _wake_gone(self) -> None:
        """Fail the command loop's pending read or drain wait: the session is over."""
        for waiter in (self._rx_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(_ClientGone())
                waiter.exception()  # retrieved: the loop may be cancelled instead
        self._rx_waiter = self._drain_waiter = None

    def _release(self) -> None:
        """Give back the session's connection slots and stop its timer: idempotent.

        Every way out of a session comes here: ``connection_lost``, and the end of
        the command loop whatever ended it (a connection lost during a STARTTLS
        handshake never reaches ``connection_lost``: asyncio's SSL layer reports
        only losses after a completed handshake).
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._released:
            return
        self._released = True
        ctx = self.ctx
        ctx.sessions.discard(self)
        ctx.events.connection_closed()
        ip = self.state.peer_ip
        n = ctx.per_ip.get(ip, 1) - 1
        if n <= 0:
            ctx.per_ip.pop(ip, None)
        else:
            ctx.per_ip[ip] = n

    def _touch(self) -> None:
        """Input arrived: push the idle deadline back (no timer work: see _idle_check)."""
        self._active = self.loop.time()

    def _idle_check(self) -> None:
        """The idle timer: re-armed for the remaining time unless idle long enough."""
        self._timer = None
        if self.transport is None:
            return
        deadline = self._active + self.ctx.idle_timeout
        now = self.loop.time()
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._idle_check)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        self._say_and_close(replies.IDLE_TIMEOUT)

    def close_if_idle(self, reply: Reply = replies.SHUTTING_DOWN) -> bool:
        """Say 421 and close if no transaction is open (graceful shutdown); True if closed
        (or already closing)."""
        if self._idle:
            self._say_and_close(reply)
            return True
        return self.transport is None

    def _say_and_close(self, reply: Reply) -> None:
        """Send ``reply`` and close, unless the transport is gone or already closing.

        In a STARTTLS handshake nothing can be said (the client expects TLS records):
        the socket is dropped, which ends the handshake and with it the session.
        """
        transport = self.transport
        if transport is None or self._shut or transport.is_closing():
            return
        self._reject(reply)
        if self._original_transport is not None and not self.state.tls:
            self._out.clear()
            cast(asyncio.Transport, self._original_transport).abort()
        else:
            self._flush()
            transport.close()
            if transport.get_write_buffer_size():
                # The reply may still go out; if the client does not read, the close
                # would wait for it forever: cut it after a bounded wait.
                asyncio.get_running_loop().call_later(
                    CLOSE_WAIT_SECONDS, self._abort_if_open, transport)
        self._shut = True
        self._closing = True
        self._wake_gone()  # the command loop ends now, and gives the slot back

    def _abort_if_open(self, transport: asyncio.BaseTransport) -> None:
        """Drop a connection whose close is still waiting for the client to read."""
        if self.transport is transport:
            cast(asyncio.Transport, transport).abort()

    def _close(self) -> None:
        """Close the transport once (a second close of an SSL transport breaks it)."""
        transport = self.transport
        if transport is not None and not self._shut:
            self._shut = True
            transport.close()

    # -- output ------------------------------------------------------------------
    def _emit(self, reply: Reply) -> None:
        self._out.append(reply.line())

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self._shut:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _reject(self, reply: Reply, detail: str = "") -> None:
        self.state.errors += 1
        self.ctx.events.rejected(reply, self.state, detail)
        self._emit(reply)

    # -- input -------------------------------------------------------------------
    async def _fill(self) -> None:
        """Flush pending replies, then take more input (at most 64 KiB) into the buffer."""
        self._flush()
        if self._writing_paused and self.transport is not None:
            waiter = self._drain_waiter = self.loop.create_future()
            await waiter
        rx = self._rx
        if not rx:
            if self.transport is None:
                raise _ClientGone
            waiter = self._rx_waiter = self.loop.create_future()
            await waiter
        if len(rx) <= _READ_CHUNK:
            self._inbuf += rx
            rx.clear()
        else:
            self._inbuf += memoryview(rx)[:_READ_CHUNK]
            del rx[:_READ_CHUNK]
        if self._reading_paused and len(rx) <= _READ_CHUNK and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    async def _readline(self, limit: int) -> bytes | Reply:
        """Next line without its CRLF, or the refusal of a line longer than ``limit``
        (``COMMAND_TOO_LONG``) or ended by a bare LF (``BARE_LF_COMMAND``)."""
        buf = self._inbuf
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl >= 0:
                if nl and buf[nl - 1] == 13:  # CRLF
                    line = bytes(buf[:nl - 1])
                    del buf[: nl + 1]
                    return line if len(line) <= limit else replies.COMMAND_TOO_LONG
                del buf[: nl + 1]
                return replies.BARE_LF_COMMAND if nl <= limit else replies.COMMAND_TOO_LONG
            if len(buf) > limit:
                # Discard an over-long line up to its end, without holding it.
                while True:
                    del buf[:]
                    await self._fill()
                    nl = buf.find(b"\n")
                    if nl >= 0:
                        del buf[: nl + 1]
                        return replies.COMMAND_TOO_LONG
            start = len(buf)
            await self._fill()

    # -- the command loop ----------------------------------------------------------
    async def _handle_client(self) -> None:
        ctx = self.ctx
        st = self.state
        try:
            if self._shut:
                return  # closed (shutdown) before this loop ever ran
            refusal = None
            if ctx.shutting_down:
                refusal = replies.SHUTTING_DOWN
            elif ctx.per_ip.get(st.peer_ip, 0) > ctx.max_connections_per_ip:
                refusal = replies.TOO_MANY_CONNECTIONS
            elif len(ctx.sessions) > ctx.max_connections:
                refusal = replies.TOO_MANY_CONNECTIONS_GLOBAL
            elif ctx.greet_pause > 0:
                await asyncio.sleep(ctx.greet_pause)
                if self.transport is None or self._shut:
                    return  # closed during the pause (shutdown)
            if refusal is None and self._rx:
                # Input before the greeting (RFC 5321 §3.1: the client waits for it):
                # an early talker. 554 instead of the greeting, nothing of it is read.
                refusal = replies.PREGREET
            if refusal is not None:
                self._rx.clear()
                self._reject(refusal)
                self._flush()
                self._close()
                return
            self._out.append(_greeting(ctx.hostname))
            while self.transport is not None and not self._closing:
                self._idle = self._mail_from is None
                line = await self._readline(AUTH_LINE_MAX - 2)
                self._idle = False
                st.commands += 1
                if st.commands > ctx.max_commands:
                    self._reject(replies.TOO_MANY_COMMANDS)
                    break
                self._touch()
                verb_text = ""
                if isinstance(line, bytes):
                    verb, _, rest = line.partition(b" ")
                    verb_text = verb.upper().decode("ascii", "replace")
                    if len(line) + 2 > _LINE_MAX.get(verb_text, COMMAND_LINE_MAX):
                        line = replies.COMMAND_TOO_LONG
                if not isinstance(line, bytes):
                    self._reject(line)
                    name = None
                else:
                    name = self._COMMANDS.get(verb_text)
                    if name is None:
                        self._reject(replies.UNKNOWN_COMMAND)
                if name is None:
                    if st.errors > 20:
                        self._reject(replies.TOO_MANY_ERRORS)
                        break
                    continue
                try:
                    arg = rest.decode("utf-8") if rest else ""
                except UnicodeDecodeError:
                    self._reject(replies.SYNTAX_ERROR, "undecodable argument")
                    continue
                try:
                    if name in _ASYNC_COMMANDS:
                        await getattr(self, name)(arg.strip(" "))
                    else:  # most commands never wait: no coroutine for them
                        getattr(self, name)(arg.strip(" "))
                except (_ClientGone, asyncio.CancelledError, ConnectionError):
                    raise
                except Exception as exc:
                    ctx.events.error(st, name, exc)
                    self._reject(replies.LOCAL_ERROR, "handler error")
                if ctx.shutting_down and self._mail_from is None and not self._closing:
                    self._reject(replies.SHUTTING_DOWN)
                    break
            self._flush()
            self._close()
        except (_ClientGone, ConnectionError):
            self._close()
        except asyncio.CancelledError:
            self._close()
            raise
        except Exception as exc:  # a bug outside a command handler: say 421, never a trace
            ctx.events.error(st, "session", exc)
            self._say_and_close(replies.LOCAL_ERROR_CLOSING)
        finally:
            self._release()

    # -- session commands ----------------------------------------------------------
    def _reset_transaction(self) -> None:
        self._mail_from = None
        self._rcpts = []
        self._smtputf8 = False

    def smtp_EHLO(self, arg: str) -> None:
        """EHLO: advertise extensions."""
        if not arg:
            self._reject(replies.HELO_SYNTAX)
            return
        st = self.state
        st.helo = arg
        st.esmtp = True
        self._reset_transaction()
        ctx = self.ctx
        self._out.append(_ehlo_reply(
            ctx.hostname, ctx.max_message_size, ctx.smtputf8,
            self.tls_context is not None and not st.tls,
            policy.may_advertise_auth(tls_active=st.tls,
                                      plaintext_ok=ctx.plaintext_auth.allows(st.peer_ip)),
        ))

    def smtp_HELO(self, arg: str) -> None:
        """HELO: plain SMTP greeting."""
        if not arg:
            self._reject(replies.HELO_SYNTAX_PLAIN)
            return
        self.state.helo = arg
        self.state.esmtp = False
        self._reset_transaction()
        self._emit(replies.helo_ok(self.ctx.hostname))

    def smtp_NOOP(self, arg: str) -> None:
        """NOOP."""
        self._emit(replies.NOOP_OK)

    def smtp_RSET(self, arg: str) -> None:
        """RSET: abort the transaction."""
        self._reset_transaction()
        self._emit(replies.RSET_OK)

    def smtp_QUIT(self, arg: str) -> None:
        """QUIT."""
        self._emit(replies.BYE)
        self._closing = True

    def smtp_VRFY(self, arg: str) -> None:
        """VRFY: never confirms addresses."""
        self._emit(replies.VRFY_CANNOT)

    def smtp_HELP(self, arg: str) -> None:
        """HELP."""
        self._emit(replies.HELP)

    async def smtp_EXPN(self, arg: str) -> None:
        """EXPN: not offered."""
        self._reject(replies.NOT_IMPLEMENTED)

    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS: upgrade the connection (aiosmtpd's TLS machinery)."""
        if self.state.tls:
            self._reject(replies.TLS_ALREADY)
            return
        if self.tls_context is None:
            self._reject(replies.TLS_NOT_AVAILABLE)
            return
        if arg:
            self._reject(replies.SYNTAX_ERROR)
            return
        self._inbuf.clear()  # anything pipelined after STARTTLS is discarded
        self._rx.clear()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False  # the handshake must be able to read
            self.transport.resume_reading()
        self._emit(replies.STARTTLS_GO)
        self._flush()
        self.state.helo = ""
        self.state.esmtp = False
        self._reset_transaction()
        await self._starttls_upgrade()

    async def _starttls_upgrade(self) -> None:
        push = self.push

        async def _silent(_status: Any) -> None:  # aiosmtpd pushes its own 220: ours went out
            return None

        self.push = _silent  # type: ignore[method-assign,assignment]
        self._idle = True  # no transaction: a shutdown may drop a pending handshake
        try:
            await _AioSMTP.smtp_STARTTLS(self, "")
        except Exception:
            self._tls_failed()
            raise _ClientGone from None
        finally:
            self.push = push  # type: ignore[method-assign]
        if not self.state.tls:
            # The handshake waiter woke without an error and without a TLS session:
            # the socket was closed under it (idle timeout, shutdown). asyncio's SSL
            # layer calls no connection_lost for a connection lost mid-handshake.
            self._tls_failed()
            raise _ClientGone

    def _tls_failed(self) -> None:
        """The STARTTLS handshake did not complete: drop the socket (the slot is released
        when the command loop ends)."""
        if self._original_transport is not None:
            cast(asyncio.Transport, self._original_transport).abort()
        self.transport = None

    # -- authentication -------------------------------------------------------------
    async def smtp_AUTH(self, arg: str) -> None:
        """AUTH PLAIN / LOGIN, verified through the credential cache."""
        st = self.state
        ctx = self.ctx
        if not st.esmtp:
            self._reject(replies.NEED_EHLO)
            return
        if policy.session_account_valid(st.account, st.epoch) and not st.via_network:
            self._reject(replies.AUTH_ALREADY)
            return
        if self._mail_from is not None:
            self._reject(replies.AUTH_IN_TRANSACTION)
            return
        refusal = policy.may_auth(tls_active=st.tls,
                                  plaintext_ok=ctx.plaintext_auth.allows(st.peer_ip))
        if refusal is not None:
            self._reject(refusal)
            return
        refusal = ctx.throttle.address_refusal(st.peer_ip, ctx.clock())
        if refusal is not None:
            self._reject(refusal)
            self._closing = True
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._reject(replies.AUTH_SYNTAX)
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        creds: tuple[bytes, bytes] | None
        if mech == "PLAIN":
            creds = await self._auth_plain(initial)
        elif mech == "LOGIN":
            creds = await self._auth_login(initial)
        else:
            self._reject(replies.AUTH_UNKNOWN_MECHANISM)
            return
        if creds is None:
            return
        user_b, password = creds
        try:
            username = user_b.decode("utf-8")
        except UnicodeDecodeError:
            username = ""
        throttle = ctx.throttle
        while True:  # the throttle counts the check from its start (policy.AuthThrottle)
            account = ctx.directory.account(username) if username else None
            admission = throttle.begin(
                st.peer_ip, username, ctx.credentials.attempt_digest(username, password, account),
                ctx.clock())
            if not admission.wait:
                break
            await self._auth_turn()
        if admission.refusal is not None:
            self._reject(admission.refusal)
            self._closing = True
            return
        if admission.attempt is None:
            # The same password just failed for this username from this address (another
            # SASL mechanism): the same answer, without a second verification or count.
            reason, delay, refusal = admission.repeat, admission.delay, None
            ctx.events.auth_result(st, username, reason, False)
        else:
            outcome = await self._verify(admission.attempt, account, password)
            ctx.events.auth_result(st, username, outcome.reason, outcome.cache_hit)
            if outcome.ok and account is not None:
                st.account = account
                st.epoch = account.epoch
                st.via_network = False
                account.last_connection = ctx.clock()
                self._emit(replies.AUTH_OK)
                return
            reason = outcome.reason
            delay, refusal = throttle.finish(admission.attempt, ctx.clock(), ok=False,
                                             reason=reason)
            _auth_wake(ctx)
        reply = {
            "account_disabled": replies.AUTH_DISABLED,
            "account_deleted": replies.AUTH_DELETED,
            "domain_deleted": replies.AUTH_DOMAIN_DELETED,
        }.get(reason, replies.AUTH_FAILED)
        if delay:
            self._flush()
            await asyncio.sleep(delay)
        self._reject(reply, reason)
        if refusal is not None:
            self._reject(refusal)
            self._closing = True

    async def _verify(self, attempt: policy.AuthAttempt, account: Account | None,
                      password: bytes) -> AuthOutcome:
        """The credential check of an admitted attempt; a success is recorded here.

        If the session ends while argon2 runs, the check still completes and its
        result is recorded then (the attempt was counted when it started).
        """
        ctx = self.ctx
        check = asyncio.ensure_future(ctx.credentials.check(account, password))
        try:
            outcome = await asyncio.shield(check)
        except asyncio.CancelledError:
            check.add_done_callback(functools.partial(_finish_late, ctx, attempt))
            raise
        except BaseException:
            ctx.throttle.abandon(attempt)
            _auth_wake(ctx)
            raise
        if outcome.ok:
            ctx.throttle.finish(attempt, ctx.clock(), ok=True, reason=outcome.reason)
            _auth_wake(ctx)
        return outcome

    async def _auth_turn(self) -> None:
        """Wait until a running credential check ends (bounded: then the caller asks again)."""
        ctx = self.ctx
        ctx.auth_waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.auth_turn.wait(), 1.0)
        finally:
            ctx.auth_waiting -= 1

    async def _auth_response(self, challenge: bytes) -> bytes | None:
        """Send a 334 challenge and decode the client's base64 answer (None: aborted/bad)."""
        self._out.append(b"334 " + challenge + b"\r\n")
        line = await self._readline(AUTH_LINE_MAX - 2)
        if not isinstance(line, bytes):
            self._reject(line)
            return None
        if line.strip() == b"*":
            self._reject(replies.AUTH_ABORTED)
            return None
        return self._b64(line.strip())

    def _b64(self, text: bytes | str) -> bytes | None:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._reject(replies.AUTH_BAD_BASE64)
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[bytes, bytes] | None:
        if initial is None:
            blob = await self._auth_response(b"")
        elif initial == "=":
            blob = b""
        else:
            blob = self._b64(initial)
        if blob is None:
            return None
        fields = blob.split(b"\0")
        if len(fields) != 3:
            self._reject(replies.AUTH_BAD_BASE64, "bad PLAIN layout")
            return None
        authzid, user, password = fields
        if authzid and authzid != user:
            self._reject(replies.AUTH_FAILED, "authzid differs")
            return None
        return user, password

    async def _auth_login(self, initial: str | None) -> tuple[bytes, bytes] | None:
        if initial is None:
            user = await self._auth_response(b"VXNlcm5hbWU6")  # "Username:"
        else:
            user = self._b64(initial)
        if user is None:
            return None
        password = await self._auth_response(b"UGFzc3dvcmQ6")  # "Password:"
        if password is None:
            return None
        return user, password

    def _current_account(self) -> Account | None:
        """The account this session may send as now, or None (re-resolving network binds)."""
        st = self.state
        if policy.session_account_valid(st.account, st.epoch):
            return st.account
        if st.account is not None and not st.via_network:
            return None  # authenticated once, then invalidated: 530 until a new AUTH
        acct = self.ctx.directory.account_for_ip(st.peer_ip)
        if acct is None or not acct.usable:
            st.account = None
            return None
        if st.account is not acct or st.epoch != acct.epoch:
            acct.last_connection = self.ctx.clock()
        st.account, st.epoch, st.via_network = acct, acct.epoch, True
        return acct

    # -- the mail transaction ------------------------------------------------------
    def smtp_MAIL(self, arg: str) -> None:
        """MAIL FROM: sender checks, queue room, size."""
        st = self.state
        ctx = self.ctx
        if not st.helo:
            self._reject(replies.NEED_EHLO)
            return
        account = self._current_account()
        if account is None:
            self._reject(replies.AUTH_REQUIRED)
            return
        if self._mail_from is not None:
            self._reject(replies.NESTED_MAIL)
            return
        try:
            path = parse_mail_from(arg, smtputf8_offered=ctx.smtputf8 and st.esmtp)
        except PathError as exc:
            self._reject(exc.reply)
            return
        params = path.params
        if params and not st.esmtp:
            self._reject(replies.MAIL_SYNTAX)
            return
        size: int | None = None
        for key, value in params.items():
            if key == "SIZE":
                size = int(value or 0)
            elif key in ("BODY", "SMTPUTF8"):
                continue
            elif key == "AUTH":
                continue
            else:
                self._reject(replies.PARAM_UNKNOWN)
                return
        refusal = policy.declared_size_ok(size, ctx.max_message_size)
        if refusal is None:
            refusal = policy.sender_allowed(account, path.domain)
        if refusal is None:
            refusal = policy.queue_room(ctx.scheduler.queued_count(account.id),
                                        ctx.max_queued_per_account, ctx.free_disk(),
                                        ctx.min_free_disk)
        if refusal is not None:
            self._reject(refusal, path.address)
            return
        self._mail_from = path.address
        self._smtputf8 = "SMTPUTF8" in params
        self._rcpts = []
        self._emit(replies.MAIL_OK)

    def smtp_RCPT(self, arg: str) -> None:
        """RCPT TO: add a recipient."""
        if self._mail_from is None:
            self._reject(replies.NEED_MAIL)
            return
        try:
            path = parse_rcpt_to(arg, smtputf8=self._smtputf8)
        except PathError as exc:
            self._reject(exc.reply)
            return
        if path.params:
            self._reject(replies.PARAM_UNKNOWN)
            return
        refusal = policy.recipient_domain_allowed(
            path.domain, allow_literals=self.ctx.allow_address_literals
        ) or policy.recipient_allowed(len(self._rcpts), self.ctx.max_recipients)
        if refusal is not None:
            self._reject(refusal)
            return
        self._rcpts.append(path.address)
        self._emit(replies.RCPT_OK)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA: receive, check, sign, commit durably, then 250."""
        ctx = self.ctx
        st = self.state
        if self._mail_from is None:
            self._reject(replies.NEED_MAIL)
            return
        if not self._rcpts:
            self._reject(replies.NEED_RCPT)
            return
        if arg:
            self._reject(replies.SYNTAX_ERROR)
            return
        self._emit(replies.DATA_GO)
        data, problem = await self._read_data()
        sender, rcpts = self._mail_from, self._rcpts
        self._reset_transaction()
        if problem is not None:
            self._reject(problem)
            return
        assert data is not None
        started = time.perf_counter()
        account = self._current_account()
        if account is None:
            self._reject(replies.AUTH_REQUIRED, "invalidated during transaction")
            return
        msg_id = ctx.spool.ids.next()
        ext_id = format_id(msg_id)
        now = ctx.clock()
        received = (
            f"Received: from {_clean(st.helo)} ([{st.peer_ip}])\r\n"
            f"\tby {ctx.hostname} (relayd) with {'ESMTPSA' if st.tls else 'ESMTPA'}"
            f" id {ext_id};\r\n\t{_date(now)}\r\n"
        ).encode("utf-8", "replace")
        # One copy of the data: the Received header and the data after the CRLF
        # that _read_data put in front. Then drop the input buffer.
        body = b"".join((received, memoryview(data)[2:]))
        del data
        if ctx.signer is not None:
            body = await ctx.signer.sign(account, body)
            if self._current_account() is not account:
                # Disabled while signing. Checked again here, with no await before the
                # commit is queued: a disable either wins now or its own database write
                # is queued after this commit, so its control call returns after the 250.
                self._reject(replies.AUTH_REQUIRED, "invalidated during transaction")
                return
        new = NewMessage(
            id=msg_id, account_id=account.id, username=account.username,
            domain=account.domain.name, sender=sender, recipients=rcpts, data=body,
            received_at=now,
        )
        try:
            # Handed to the scheduler by the commit itself: also when the client is
            # gone (and this task cancelled) before the commit is done.
            await ctx.spool.accept(new, then=ctx.scheduler.enqueue_new)
        except Exception as exc:
            ctx.events.error(st, "spool commit", exc)
            self._reject(replies.LOCAL_ERROR, "commit failed")
            return
        self._emit(replies.queued(ext_id))
        ctx.events.accepted(st, ext_id, len(body), len(rcpts), time.perf_counter() - started)

    async def _read_data(self) -> tuple[bytearray | None, Reply | None]:
        """Read message data up to CRLF.CRLF; enforce size and line rules while reading.

        Returns the unstuffed data *preceded by CRLF* (see the end), or a refusal.
        """
        ctx = self.ctx
        buf = self._inbuf
        limit = ctx.max_message_size
        too_big = False
        started = time.monotonic()
        received = 0
        # The CRLF that ended the DATA line, so that a first line "." ends the data too.
        buf[:0] = b"\r\n"
        scan = 0
        while True:
            end = buf.find(b"\r\n.\r\n", scan)
            if end >= 0:
                break
            if len(buf) > limit + 8:
                too_big = True  # over the limit: drop what came, keep a possible terminator's start
                del buf[:-4]
            scan = max(0, len(buf) - 4)
            before = len(buf)
            await self._fill()
            received += len(buf) - before
            self._touch()
            elapsed = time.monotonic() - started
            if (ctx.min_data_rate and elapsed > ctx.data_rate_grace
                    and received / elapsed < ctx.min_data_rate):
                self._reject(replies.DATA_TOO_SLOW)
                self._flush()
                self._closing = True
                raise _ClientGone
        # The data stays in the input buffer (no copy): the rest goes to a fresh buffer,
        # the data's buffer is cut after its final CRLF and handed back as it is,
        # still starting with the CRLF put in front above (which makes a stuffed dot
        # on the first line look like any other). smtp_DATA copies it once, into
        # the stored message; a large buffer is released when it returns.
        self._inbuf = bytearray(memoryview(buf)[end + 5:])
        del buf[end + 2:]
        if too_big or len(buf) > limit + 4:
            return None, replies.SIZE_EXCEEDED
        bad = policy.data_violation(buf)
        if bad is not None:
            return None, bad
        if policy.has_long_line(buf):
            return None, replies.LINE_TOO_LONG
        if b"\r\n." in buf:
            buf = buf.replace(b"\r\n.", b"\r\n")
        return buf, None


def _auth_wake(ctx: SmtpContext) -> None:
    """A credential check ended: wake the AUTHs waiting for their turn (``_auth_turn``)."""
    if ctx.auth_waiting:
        turn, ctx.auth_turn = ctx.auth_turn, asyncio.Event()
        turn.set()


def _finish_late(ctx: SmtpContext, attempt: policy.AuthAttempt,
                 check: asyncio.Future[AuthOutcome]) -> None:
    """Record a check whose session ended while argon2 ran (the client went away)."""
    if check.cancelled() or check.exception() is not None:
        ctx.throttle.abandon(attempt)
    else:
        outcome = check.result()
        ctx.throttle.finish(attempt, ctx.clock(), ok=outcome.ok, reason=outcome.reason)
    _auth_wake(ctx)


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, max_size: int, smtputf8: bool, starttls: bool,
                auth: bool) -> bytes:
    """The EHLO reply for one combination of settings (built once, then cached)."""
    lines = [f"250-{hostname}", "250-PIPELINING", f"250-SIZE {max_size}", "250-8BITMIME",
             "250-ENHANCEDSTATUSCODES"]
    if smtputf8:
        lines.append("250-SMTPUTF8")
    if starttls:
        lines.append("250-STARTTLS")
    if auth:
        lines.append("250-AUTH PLAIN LOGIN")
    lines.append("250 HELP")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


@functools.lru_cache(maxsize=8)
def _greeting(hostname: str) -> bytes:
    """The 220 greeting for ``hostname``, as bytes (built once per name)."""
    return replies.greeting(hostname).line()


_date_cache: tuple[int, str] = (-1, "")


def _date(now: float) -> str:
    """``formatdate(now)``, computed once per second (the Received header of every message)."""
    global _date_cache
    sec = int(now)
    if _date_cache[0] != sec:
        _date_cache = (sec, formatdate(sec))
    return _date_cache[1]


@functools.lru_cache(maxsize=1024)
def _clean(text: str) -> str:
    """Make client-supplied text safe for a header comment (memoised: HELO names repeat)."""
    return "".join(c if 32 < ord(c) < 127 and c not in "()\\" else "_" for c in text[:128])


RelaySMTP._COMMANDS = {
    name[5:]: name for name in dir(RelaySMTP) if name.startswith("smtp_")
}
_ASYNC_COMMANDS = frozenset(
    name for name in RelaySMTP._COMMANDS.values()
    if inspect.iscoroutinefunction(getattr(RelaySMTP, name)))
