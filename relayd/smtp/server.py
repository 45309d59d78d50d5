"""The SMTP submission server: the asyncio transport around relayd.smtp.session.

Owns: the per-connection ``asyncio.Protocol`` (``RelaySMTP``) that feeds the
bytes it receives to a ``Session`` (the protocol state machine), writes the
replies it gives, and answers its events: the credential check of an AUTH
(a credential-cache hit at once, unless the throttle has the client locked;
otherwise argon2 in a thread pool through relayd.directory.credentials, each
check admitted and counted from its start by relayd.smtp.policy.AuthThrottle), the
acceptance of a message (Received header, DKIM signing, the durable commit,
then ``250``) and the STARTTLS upgrade (``loop.start_tls``). Also: the greeting
and the connection limits, the idle timeout, flow control in both directions,
and the end of a session.

Replies to pipelined commands are coalesced into one write: the session's
replies go out when it needs more input (or before the TLS handshake).
No third-party SMTP library is used at run time (aiosmtpd is a test and bench
dependency only: the tests' sink and the bench's stock peer).

Session ends: a client that speaks before the 220 gets ``554 5.5.0`` instead
of it (an optional silent pause, ``greet_pause_seconds``, catches early
talkers; with none, only input already received when the greeting is due).
Every way out of a session (close, reset, idle timeout, shutdown, a STARTTLS
handshake that never completes) gives the connection slot back exactly once
(``_release``), and nothing is written to a transport once it is closing.

Untrusted input: everything the client sends (parsed by the session). A
client never sees an exception text: any handler error becomes ``451 4.3.0``
and a log entry; a fault outside a handler ``421 4.3.0`` and a close.
Settings read: [smtp], [limits], [server].hostname (through SmtpContext).
See also: relayd.smtp.session, relayd.smtp.policy, relayd.smtp.replies,
relayd.directory.credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from random import getrandbits as _randbits
from typing import Protocol, cast

from relayd.config import Config
from relayd.directory.accounts import Account, Directory
from relayd.directory.credentials import AuthOutcome, CredentialCache
from relayd.ids import format_id
from relayd.smtp import policy, replies
from relayd.smtp.replies import Reply
from relayd.smtp.session import (
    CLOSE,
    STARTTLS,
    AuthRequest,
    Event,
    MessageReceived,
    Session,
)
from relayd.smtp.session import SessionState as SessionState
from relayd.store.spool import NewMessage, Spool

_READ_CHUNK = 65536
#: How long a connection closed after a 421 may wait for the client to read the
#: reply before it is dropped (a client that never reads would hold it forever).
CLOSE_WAIT_SECONDS = 2.0


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
    #: Cluster mode: true while this node is fenced (no new logins, no new mail).
    fenced: Callable[[], bool] = lambda: False
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


class _ClientGone(Exception):
    """The client closed the connection (or the session must end without a reply)."""


class RelaySMTP(asyncio.Protocol):
    """One SMTP connection to relayd: the transport around its ``Session``."""

    def __init__(self, ctx: SmtpContext, tls_context: ssl.SSLContext | None = None,
                 implicit_tls: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.ctx = ctx
        self.tls_context = None if implicit_tls else tls_context  # STARTTLS (a reload swaps it)
        self.transport: asyncio.Transport | None = None
        self.state = SessionState(peer_ip="", tls=implicit_tls)
        self.session = Session(ctx, self.state, starttls=self.tls_context is not None)
        self._raw: asyncio.Transport | None = None  # the plaintext socket under STARTTLS
        self._handshaking = False
        self._task: asyncio.Task[None] | None = None  # answering a session event
        self._start: asyncio.Handle | None = None  # the greeting, due
        self._greeted = False
        self._reading_paused = False
        self._writing_paused = False
        self._active = 0.0  # loop time of the last input: the idle timer checks it lazily
        self._timer: asyncio.TimerHandle | None = None
        self._released = True  # no slot taken yet (connection_made takes one)
        self._shut = False  # we closed the transport: nothing more is written to it

    # -- connection ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start a session: take its slots; the greeting (or a refusal) is due next."""
        self.transport = cast(asyncio.Transport, transport)
        st = self.state
        peer = transport.get_extra_info("peername")
        st.peer_ip = ip = str(peer[0]) if peer else ""
        st.sid = f"{_randbits(48):012x}"
        ctx = self.ctx
        ctx.events.connection_opened()
        ctx.sessions.add(self)
        self._released = False
        ctx.per_ip[ip] = ctx.per_ip.get(ip, 0) + 1
        loop = self.loop
        self._active = now = loop.time()
        self._timer = loop.call_at(now + ctx.idle_timeout, self._idle_check)
        self._start = loop.call_soon(self._open)

    def _open(self) -> None:
        """The connection limits, the optional greet pause, then the greeting."""
        self._start = None
        if self._shut:
            return  # closed (shutdown) before this ran
        ctx = self.ctx
        refusal = None
        if ctx.shutting_down:
            refusal = replies.SHUTTING_DOWN
        elif ctx.per_ip.get(self.state.peer_ip, 0) > ctx.max_connections_per_ip:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif len(ctx.sessions) > ctx.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS_GLOBAL
        elif ctx.greet_pause > 0:
            self._start = self.loop.call_later(ctx.greet_pause, self._greet)
            return
        if refusal is not None:
            self._refuse(refusal)
        else:
            self._greet()

    def _greet(self) -> None:
        """220, unless the client spoke first (RFC 5321 §3.1: it waits): 554 then."""
        self._start = None
        if self.transport is None or self._shut:
            return  # closed during the pause (shutdown)
        if self.session.buffered:
            self._refuse(replies.PREGREET)
            return
        self._greeted = True
        self.session.greet()
        self._process()

    def _refuse(self, reply: Reply) -> None:
        """End the session before its greeting, with ``reply``; nothing of the input is read."""
        self.session.refuse(reply)
        self._flush()
        self._finish()

    def data_received(self, data: bytes) -> None:
        """Feed input to the session and run it (unless an event is being answered)."""
        session = self.session
        session.receive(data)
        if self._task is None and self._greeted and not self._writing_paused:
            self._process()
        elif session.buffered > 2 * _READ_CHUNK and not self._reading_paused:
            self._reading_paused = True  # far behind: stop reading until it catches up
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        """The client half-closed: end the session."""
        self._cancel_task()
        self.loop.call_soon(self._finish)
        return not self.state.tls  # keep a plain transport open until _finish closes it

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._task is None and self._greeted:
            self._process()

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the session."""
        self._release()
        if self._raw is not None:
            self._raw.close()  # STARTTLS: close the socket under the SSL layer
        self._cancel_task()
        self.transport = None

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _release(self) -> None:
        """Give back the session's connection slots and stop its timers: idempotent.

        Every way out of a session comes here: ``connection_lost``, and the end of
        the session whatever ended it (a connection lost during a STARTTLS
        handshake never reaches ``connection_lost``: asyncio's SSL layer reports
        only losses after a completed handshake).
        """
        for handle in (self._timer, self._start):
            if handle is not None:
                handle.cancel()
        self._timer = self._start = None
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
        self._say_and_close(replies.IDLE_TIMEOUT)

    def close_if_idle(self, reply: Reply = replies.SHUTTING_DOWN) -> bool:
        """Say 421 and close if no transaction is open (graceful shutdown); True if closed
        (or already closing)."""
        if self._handshaking or (self._task is None and self.session.idle):
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
        session = self.session
        session.reject(reply)
        session.close()
        if self._handshaking and self._raw is not None:
            session.out.clear()
            self._raw.abort()
        else:
            self._flush()
            transport.close()
            if transport.get_write_buffer_size():
                # The reply may still go out; if the client does not read, the close
                # would wait for it forever: cut it after a bounded wait.
                self.loop.call_later(CLOSE_WAIT_SECONDS, self._abort_if_open, transport)
        self._shut = True
        if self._task is None:
            self._release()

    def _abort_if_open(self, transport: asyncio.Transport) -> None:
        """Drop a connection whose close is still waiting for the client to read."""
        if self.transport is transport:
            transport.abort()

    def _finish(self) -> None:
        """The session is over: close the transport once (a second close of an SSL
        transport breaks it) and give the slot back."""
        transport = self.transport
        if transport is not None and not self._shut:
            self._shut = True
            transport.close()
        self._shut = True
        self.session.close()
        if self._task is None:
            self._release()

    # -- output ------------------------------------------------------------------
    def _flush(self) -> None:
        out = self.session.out
        if out:
            if self.transport is not None and not self._shut:
                self.transport.write(b"".join(out))
            out.clear()

    # -- the session loop --------------------------------------------------------------
    def _process(self) -> None:
        """Run the session on the input it holds; answer its events; write its replies."""
        session = self.session
        if self._shut:
            return
        try:
            while True:
                event = session.next_event()
                if event is None:
                    break
                if event is CLOSE:
                    self._flush()
                    self._finish()
                    return
                if event is STARTTLS:
                    self._flush()
                self._task = self.loop.create_task(self._answer(event))
                return
        except Exception as exc:  # a bug outside a command handler: say 421, never a trace
            self.ctx.events.error(self.state, "session", exc)
            self._say_and_close(replies.LOCAL_ERROR_CLOSING)
            return
        finally:
            if session.touched:
                session.touched = False
                self._active = self.loop.time()
        self._flush()
        if self._reading_paused and session.buffered <= _READ_CHUNK and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()

    async def _answer(self, event: Event) -> None:
        """Answer one session event (it may wait), then run the session on."""
        try:
            if event is STARTTLS:
                await self._starttls()
            elif isinstance(event, AuthRequest):
                await _authenticate(self, event)
            elif isinstance(event, MessageReceived):
                await _accept(self, event)
        except (_ClientGone, ConnectionError):
            self._task = None
            self._finish()
            return
        except asyncio.CancelledError:
            self._task = None
            self._finish()
            raise
        except Exception as exc:
            self.ctx.events.error(self.state, type(event).__name__, exc)
            self.session.reject(replies.LOCAL_ERROR, "handler error")
        self._task = None
        if self._shut:
            self._release()
            return
        self.session.resume()
        self._process()

    async def _starttls(self) -> None:
        """Upgrade the connection (the 220 is out); the session restarts without a greeting."""
        raw = self.transport
        context = self.tls_context
        if raw is None or context is None:
            raise _ClientGone
        self._raw = raw
        self._handshaking = True  # no transaction: a shutdown may drop a pending handshake
        try:
            tls = await self.loop.start_tls(raw, self, context, server_side=True)
        except (asyncio.CancelledError, _ClientGone):
            raise
        except Exception:
            self._tls_failed()
            raise _ClientGone from None
        finally:
            self._handshaking = False
        if tls is None or self._shut:
            # The handshake waiter woke without an error and without a TLS session:
            # the socket was closed under it (idle timeout, shutdown). asyncio's SSL
            # layer calls no connection_lost for a connection lost mid-handshake.
            self._tls_failed()
            raise _ClientGone
        self.transport = tls
        self.session.tls_started()
        self._active = self.loop.time()

    def _tls_failed(self) -> None:
        """The STARTTLS handshake did not complete: drop the socket (the slot is released
        when the session ends)."""
        if self._raw is not None:
            self._raw.abort()
        self.transport = None

    def current_account(self) -> Account | None:
        """The account this session may send as now (see Session.current_account)."""
        return self.session.current_account()


async def _authenticate(conn: RelaySMTP, req: AuthRequest) -> None:
    """Verify an AUTH's credentials through the throttle and the credential cache."""
    ctx = conn.ctx
    st = conn.state
    session = conn.session
    username, password = req.username, req.password
    if ctx.fenced():
        session.reject(replies.FENCED_AUTH)
        return
    throttle = ctx.throttle
    account = ctx.directory.account(username) if username else None
    if account is not None and not throttle.locked(st.peer_ip, username, ctx.clock()) \
            and ctx.credentials.hit(account, password):
        # A cached verification of a usable account is not a guess: no throttle turn (which
        # would make concurrent logins of one account wait for each other), no await.
        throttle.succeeded(st.peer_ip, username)
        ctx.events.auth_result(st, username, "success", True)
        session.authenticated(account)
        return
    while True:  # the throttle counts the check from its start (policy.AuthThrottle)
        account = ctx.directory.account(username) if username else None
        admission = throttle.begin(
            st.peer_ip, username, ctx.credentials.attempt_digest(username, password, account),
            ctx.clock())
        if not admission.wait:
            break
        await _auth_turn(ctx)
    if admission.refusal is not None:
        session.reject(admission.refusal)
        session.close()
        return
    if admission.attempt is None:
        # The same password just failed for this username from this address (another
        # SASL mechanism): the same answer, without a second verification or count.
        reason, delay, refusal = admission.repeat, admission.delay, None
        ctx.events.auth_result(st, username, reason, False)
    else:
        outcome = await _verify(ctx, admission.attempt, account, password)
        ctx.events.auth_result(st, username, outcome.reason, outcome.cache_hit)
        if outcome.ok and account is not None:
            session.authenticated(account)
            return
        reason = outcome.reason
        delay, refusal = throttle.finish(admission.attempt, ctx.clock(), ok=False,
                                         reason=reason)
        _auth_wake(ctx)
    reply = _AUTH_REFUSALS.get(reason, replies.AUTH_FAILED)
    if delay:
        conn._flush()
        await asyncio.sleep(delay)
    session.reject(reply, reason)
    if refusal is not None:
        session.reject(refusal)
        session.close()


_AUTH_REFUSALS = {
    "account_disabled": replies.AUTH_DISABLED,
    "account_deleted": replies.AUTH_DELETED,
    "domain_deleted": replies.AUTH_DOMAIN_DELETED,
}


async def _verify(ctx: SmtpContext, attempt: policy.AuthAttempt, account: Account | None,
                  password: bytes) -> AuthOutcome:
    """The credential check of an admitted attempt; a success is recorded here.

    If the session ends while argon2 runs, the check still completes and its
    result is recorded then (the attempt was counted when it started).
    """
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


async def _auth_turn(ctx: SmtpContext) -> None:
    """Wait until a running credential check ends (bounded: then the caller asks again)."""
    ctx.auth_waiting += 1
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.auth_turn.wait(), 1.0)
    finally:
        ctx.auth_waiting -= 1


async def _accept(conn: RelaySMTP, msg: MessageReceived) -> None:
    """Received header, signing, the durable commit, then 250 (or the refusal)."""
    ctx = conn.ctx
    st = conn.state
    session = conn.session
    started = time.perf_counter()
    account = session.current_account()
    if account is None:
        session.reject(replies.AUTH_REQUIRED, "invalidated during transaction")
        return
    if ctx.fenced():  # cut off from the cluster: a disable may be waiting for this node
        session.reject(replies.FENCED_MAIL)
        return
    refusal = policy.header_from_allowed(account, msg.data, 2)  # after the session's CRLF
    if refusal is not None:
        session.reject(refusal, "header From" if refusal is replies.NO_HEADER_FROM
                       else "header From or Sender")
        return
    msg_id = ctx.spool.ids.next()
    ext_id = format_id(msg_id)
    now = ctx.clock()
    received = (
        f"Received: from {_clean(st.helo)} ([{st.peer_ip}])\r\n"
        f"\tby {ctx.hostname} (relayd) with {'ESMTPSA' if st.tls else 'ESMTPA'}"
        f" id {ext_id};\r\n\t{_date(now)}\r\n"
    ).encode("utf-8", "replace")
    # One copy of the data: the Received header and the data after the CRLF that
    # the session put in front. Then drop the input buffer.
    body = b"".join((received, memoryview(msg.data)[2:]))
    msg.data = bytearray()
    if ctx.signer is not None:
        body = await ctx.signer.sign(account, body)
        if session.current_account() is not account:
            # Disabled while signing. Checked again here, with no await before the
            # commit is queued: a disable either wins now or its own database write
            # is queued after this commit, so its control call returns after the 250.
            session.reject(replies.AUTH_REQUIRED, "invalidated during transaction")
            return
        if ctx.fenced():
            session.reject(replies.FENCED_MAIL)
            return
    new = NewMessage(
        id=msg_id, account_id=account.id, username=account.username,
        domain=account.domain.name, sender=msg.sender, recipients=msg.recipients, data=body,
        received_at=now,
    )
    try:
        # Handed to the scheduler by the commit itself: also when the client is
        # gone (and this task cancelled) before the commit is done.
        await ctx.spool.accept(new, then=ctx.scheduler.enqueue_new)
    except Exception as exc:
        ctx.events.error(st, "spool commit", exc)
        session.reject(replies.LOCAL_ERROR, "commit failed")
        return
    session.emit(replies.queued(ext_id))
    ctx.events.accepted(st, ext_id, len(body), len(msg.recipients),
                        time.perf_counter() - started)


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
