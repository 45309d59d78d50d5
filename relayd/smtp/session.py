"""The inbound SMTP session as a protocol state machine: bytes in, replies and events out.

Owns: the SMTP grammar and the states of one session, without sockets and
without asyncio (in the manner of h11): the greeting, EHLO/HELO and the
extensions advertised, the AUTH PLAIN/LOGIN exchanges (their 334 challenges
and base64 answers), MAIL/RCPT/DATA, RSET, NOOP, QUIT, VRFY, HELP, EXPN and
the STARTTLS command; line framing and its limits, the command and error
counts, DATA framing on CRLF.CRLF with dot-unstuffing, the size limit while
reading, the smuggling checks (bare CR/LF/NUL) and the minimum data rate.

Parts: ``Framer`` (the input buffer: lines, message data and their limits),
``SaslExchange`` (one AUTH PLAIN/LOGIN exchange), ``Envelope`` (the mail
transaction's sender and recipients, checked against relayd.smtp.policy) and
``Session`` (the grammar: which command is allowed when, and what it answers).

How it is driven (relayd.smtp.server is the driver): ``receive(data)`` buffers
input; ``next_event()`` runs every complete command it can, appending replies
to ``out``, and returns ``None`` when it needs more input or an event when it
needs the edge: ``AuthRequest`` (verify credentials: argon2, the throttle's
waits), ``MessageReceived`` (sign, commit, 250 or 451), ``STARTTLS`` (upgrade
the transport, then ``tls_started``) or ``CLOSE`` (flush and close). The
driver answers with ``authenticated``/``reject``/``emit``/``close`` and then
``resume``. Why events rather than callbacks: every step that waits (a thread
pool, a group commit, a TLS handshake) is then at the edge, where timeouts and
cancellation live, and the machine stays a plain object that unit tests feed
byte strings. Decisions that are in-memory and cheap (the directory, the
queue count, free disk, the throttle's address check) are read synchronously
from the context, as the policy functions need them.

Line limits (``500 5.5.2`` past them, the rest of the line discarded without
being buffered): a command line is at most 512 octets with its CRLF (RFC 5321
§4.5.3.1.4), except MAIL and RCPT, whose limit that section lets extensions
raise (SIZE +26 octets, AUTH= +500, SMTPUTF8 addresses are longer in octets):
2048, rounded up as Postfix's ``line_length_limit``; and AUTH with its initial
response and the answers to its challenges: 12288 (RFC 4954 §4). A line of
message data is at most 1000 octets with its CRLF (§4.5.3.1.6). Past
``max_message_size`` the data is discarded as it arrives (never buffered
whole) and the end of DATA gets ``552 5.3.4``. A command line ended by a bare
LF gets ``500 5.5.2`` and does not run.

Untrusted input: everything passed to ``receive``. A handler error becomes
``451 4.3.0`` and a log entry, never an exception text on the wire.
Settings read (live, at each use, so that a reload applies to open sessions):
see ``Settings``.
See also: relayd.smtp.server (the transport), relayd.smtp.policy,
relayd.smtp.replies, relayd.smtp.address.
"""

from __future__ import annotations

import base64
import binascii
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from relayd.directory.accounts import Account, Directory
from relayd.smtp import policy, replies
from relayd.smtp.address import PathError, parse_mail_from, parse_rcpt_to
from relayd.smtp.replies import Reply

# Command line limits in octets, CRLF included (see the module docstring).
COMMAND_LINE_MAX = 512
MAIL_LINE_MAX = 2048
AUTH_LINE_MAX = 12288
_LINE_MAX = {"MAIL": MAIL_LINE_MAX, "RCPT": MAIL_LINE_MAX, "AUTH": AUTH_LINE_MAX}
MAX_ERRORS = 20  # past this many refusals, an unknown or bad line ends the session

# Phases of the machine.
_COMMAND, _DATA, _AUTH, _WAIT, _CLOSED = range(5)


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


class QueueCount(Protocol):
    def queued_count(self, account_id: int) -> int:
        """Messages of this account not yet in a final state (cheap, no I/O)."""


class Observer(Protocol):
    def rejected(self, reply: Reply, session: SessionState, detail: str = "") -> None: ...
    def error(self, session: SessionState, where: str, exc: BaseException) -> None: ...


class Settings(Protocol):
    """What the session reads of relayd.smtp.server.SmtpContext (read-only here)."""

    @property
    def hostname(self) -> str: ...
    @property
    def directory(self) -> Directory: ...
    @property
    def scheduler(self) -> QueueCount: ...
    @property
    def events(self) -> Observer: ...
    @property
    def plaintext_auth(self) -> policy.PlaintextAuthPolicy: ...
    @property
    def throttle(self) -> policy.AuthThrottle: ...
    @property
    def max_message_size(self) -> int: ...
    @property
    def max_recipients(self) -> int: ...
    @property
    def max_queued_per_account(self) -> int: ...
    @property
    def min_free_disk(self) -> int: ...
    @property
    def free_disk(self) -> Callable[[], int]: ...
    @property
    def min_data_rate(self) -> int: ...
    @property
    def data_rate_grace(self) -> float: ...
    @property
    def max_commands(self) -> int: ...
    @property
    def smtputf8(self) -> bool: ...
    @property
    def allow_address_literals(self) -> bool: ...
    @property
    def fenced(self) -> Callable[[], bool]: ...
    @property
    def shutting_down(self) -> bool: ...
    @property
    def clock(self) -> Callable[[], float]: ...


# --- events --------------------------------------------------------------------
@dataclass(slots=True)
class AuthRequest:
    """Credentials to verify; answer with ``authenticated`` or ``reject``, then ``resume``."""

    username: str  # "" if the name was not UTF-8 (it then matches no account)
    password: bytes


@dataclass(slots=True)
class MessageReceived:
    """A complete, valid message; answer with its 250 (or a refusal), then ``resume``."""

    sender: str
    recipients: list[str]
    data: bytearray  # unstuffed, CRLF line ends, preceded by one CRLF (cut it off)


class Signal:
    """An event without data (``STARTTLS``, ``CLOSE``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The 220 for STARTTLS is in ``out``: flush it, upgrade, then ``tls_started``.
STARTTLS = Signal("STARTTLS")
#: The session is over: flush ``out`` and close.
CLOSE = Signal("CLOSE")
_AGAIN = Signal("AGAIN")  # internal: the step made progress, run the next one

Event = AuthRequest | MessageReceived | Signal


class Framer:
    """The input buffer of a session: command lines and message data, with their limits."""

    __slots__ = ("_discarding", "_scan", "_too_big", "buf")

    def __init__(self) -> None:
        self.buf = bytearray()
        self._scan = 0  # where the search for a line end (or the data's end) resumes
        self._discarding = False  # inside an over-long line: dropped up to its LF
        self._too_big = False  # message data past the size limit: dropped as it came

    def clear(self) -> None:
        self.buf.clear()
        self._scan = 0
        self._discarding = False

    def readline(self, limit: int) -> bytes | Reply | None:
        """Next line without its CRLF, the refusal of a line longer than ``limit``
        (``COMMAND_TOO_LONG``) or ended by a bare LF (``BARE_LF_COMMAND``), or None."""
        buf = self.buf
        if self._discarding:
            nl = buf.find(b"\n")
            if nl < 0:
                del buf[:]
                return None
            del buf[: nl + 1]
            self._discarding = False
            return replies.COMMAND_TOO_LONG
        nl = buf.find(b"\n", self._scan)
        if nl >= 0:
            self._scan = 0
            if nl and buf[nl - 1] == 13:  # CRLF
                line = bytes(buf[:nl - 1])
                del buf[: nl + 1]
                return line if len(line) <= limit else replies.COMMAND_TOO_LONG
            del buf[: nl + 1]
            return replies.BARE_LF_COMMAND if nl <= limit else replies.COMMAND_TOO_LONG
        if len(buf) > limit:  # an over-long line: drop it up to its end, never hold it
            del buf[:]
            self._discarding = True
            self._scan = 0
        else:
            self._scan = len(buf)
        return None

    def start_data(self) -> None:
        """Message data follows: put back the CRLF that ended the DATA line, so that a
        first line "." ends the data too (and a stuffed first dot looks like any other)."""
        self.buf[:0] = b"\r\n"
        self._scan = 0
        self._too_big = False

    def read_data(self, limit: int) -> bytearray | Reply | None:
        """The message data up to CRLF.CRLF, checked and unstuffed (still preceded by
        the CRLF of ``start_data``), its refusal, or None (more input needed)."""
        buf = self.buf
        end = buf.find(b"\r\n.\r\n", self._scan)
        if end < 0:
            if len(buf) > limit + 8:
                self._too_big = True  # drop what came, keep a possible terminator's start
                del buf[:-4]
            self._scan = max(0, len(buf) - 4)
            return None
        # The data stays in its buffer (no copy): the rest goes to a fresh buffer,
        # the data's buffer is cut after its final CRLF and handed out as it is.
        self.buf = bytearray(memoryview(buf)[end + 5:])
        self._scan = 0
        del buf[end + 2:]
        if self._too_big or len(buf) > limit + 4:
            return replies.SIZE_EXCEEDED
        problem = policy.data_violation(buf)
        if problem is not None:
            return problem
        if policy.has_long_line(buf):
            return replies.LINE_TOO_LONG
        if b"\r\n." in buf:
            buf = buf.replace(b"\r\n.", b"\r\n")
        return buf


class Credentials(NamedTuple):
    user: bytes
    password: bytes


class Refused(NamedTuple):
    reply: Reply
    detail: str = ""


class SaslExchange:
    """One AUTH PLAIN (RFC 4616) or LOGIN exchange: challenges out, credentials out.

    ``start`` and ``answer`` give the next step: a challenge (bytes, sent after
    ``334 ``), the ``Credentials``, or ``Refused``.
    """

    __slots__ = ("_user", "mechanism")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism  # "PLAIN" or "LOGIN"
        self._user: bytes | None = None

    def start(self, initial: str | None) -> bytes | Credentials | Refused:
        if self.mechanism == "PLAIN":
            if initial is None:
                return b""
            return _plain(b"" if initial == "=" else _b64(initial))
        if initial is None:
            return b"VXNlcm5hbWU6"  # "Username:"
        return self._login_user(_b64(initial))

    def answer(self, line: bytes) -> bytes | Credentials | Refused:
        """The client's answer to the last challenge."""
        line = line.strip()
        if line == b"*":
            return Refused(replies.AUTH_ABORTED)
        blob = _b64(line)
        if self.mechanism == "PLAIN":
            return _plain(blob)
        if self._user is None:
            return self._login_user(blob)
        if blob is None:
            return Refused(replies.AUTH_BAD_BASE64)
        return Credentials(self._user, blob)

    def _login_user(self, blob: bytes | None) -> bytes | Refused:
        if blob is None:
            return Refused(replies.AUTH_BAD_BASE64)
        self._user = blob
        return b"UGFzc3dvcmQ6"  # "Password:"


def _b64(text: bytes | str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _plain(blob: bytes | None) -> Credentials | Refused:
    """A SASL PLAIN message: authzid NUL user NUL password (authzid empty or the user)."""
    if blob is None:
        return Refused(replies.AUTH_BAD_BASE64)
    fields = blob.split(b"\0")
    if len(fields) != 3:
        return Refused(replies.AUTH_BAD_BASE64, "bad PLAIN layout")
    authzid, user, password = fields
    if authzid and authzid != user:
        return Refused(replies.AUTH_FAILED, "authzid differs")
    return Credentials(user, password)


class Envelope:
    """The mail transaction being built: its sender and recipients, checked as they come."""

    __slots__ = ("recipients", "sender", "smtputf8")

    def __init__(self) -> None:
        self.sender: str | None = None  # None: no transaction
        self.recipients: list[str] = []
        self.smtputf8 = False

    def reset(self) -> None:
        self.sender = None
        self.recipients = []
        self.smtputf8 = False

    def mail(self, ctx: Settings, esmtp: bool, account: Account,
             arg: str) -> tuple[Reply, str] | None:
        """MAIL FROM's argument: the refusal (and its log detail), or None (sender set)."""
        try:
            path = parse_mail_from(arg, smtputf8_offered=ctx.smtputf8 and esmtp)
        except PathError as exc:
            return exc.reply, ""
        params = path.params
        if params and not esmtp:
            return replies.MAIL_SYNTAX, ""
        size: int | None = None
        for key, value in params.items():
            if key == "SIZE":
                size = int(value or 0)
            elif key not in ("BODY", "SMTPUTF8", "AUTH"):
                return replies.PARAM_UNKNOWN, ""
        refusal = policy.declared_size_ok(size, ctx.max_message_size)
        if refusal is None:
            refusal = policy.sender_allowed(account, path.domain, null=not path.address)
        if refusal is None:
            refusal = policy.queue_room(ctx.scheduler.queued_count(account.id),
                                        ctx.max_queued_per_account, ctx.free_disk(),
                                        ctx.min_free_disk)
        if refusal is not None:
            return refusal, path.address
        self.sender = path.address
        self.smtputf8 = "SMTPUTF8" in params
        self.recipients = []
        return None

    def rcpt(self, ctx: Settings, arg: str) -> Reply | None:
        """RCPT TO's argument: the refusal, or None (the recipient is added)."""
        try:
            path = parse_rcpt_to(arg, smtputf8=self.smtputf8)
        except PathError as exc:
            return exc.reply
        if path.params:
            return replies.PARAM_UNKNOWN
        refusal = policy.recipient_domain_allowed(
            path.domain, allow_literals=ctx.allow_address_literals
        ) or policy.recipient_allowed(len(self.recipients), ctx.max_recipients)
        if refusal is None:
            self.recipients.append(path.address)
        return refusal


class Session:
    """One SMTP session's protocol state (no I/O): see the module docstring.

    Size: one short ``smtp_*`` method per command RFC 5321 and its extensions
    define, plus the AUTH and DATA steps: the class is the command table, and
    framing, SASL and the envelope already live apart (Framer, SaslExchange,
    Envelope).
    """

    __slots__ = ("_data_bytes", "_data_started", "_env", "_in", "_phase", "_sasl", "ctx",
                 "monotonic", "out", "starttls", "state", "touched")

    def __init__(self, ctx: Settings, state: SessionState, *, starttls: bool = False,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.state = state
        self.starttls = starttls  # STARTTLS offered (a TLS context, no TLS yet)
        self.monotonic = monotonic
        self.out: list[bytes] = []  # replies not yet written
        self.touched = False  # a command or message data arrived (the idle timer's input)
        self._in = Framer()
        self._phase = _COMMAND
        self._env = Envelope()
        self._sasl: SaslExchange | None = None
        self._data_started = 0.0
        self._data_bytes = 0

    # -- driving ---------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Waiting for a command outside a mail transaction (a shutdown may close it)."""
        return self._phase == _COMMAND and self._env.sender is None

    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed."""
        return len(self._in.buf)

    def greet(self) -> None:
        """Queue the 220 greeting."""
        self.out.append(_greeting(self.ctx.hostname))

    def refuse(self, reply: Reply) -> None:
        """End the session with ``reply`` instead of the greeting; input is dropped."""
        self._in.clear()
        self.reject(reply)
        self._phase = _CLOSED

    def receive(self, data: bytes) -> None:
        """Buffer input; while reading message data, enforce the minimum data rate."""
        if self._phase == _CLOSED:
            return
        self._in.buf += data
        if self._phase == _DATA:
            self._data_bytes += len(data)
            self.touched = True
            ctx = self.ctx
            if ctx.min_data_rate:
                elapsed = self.monotonic() - self._data_started
                if (elapsed > ctx.data_rate_grace
                        and self._data_bytes / elapsed < ctx.min_data_rate):
                    self.reject(replies.DATA_TOO_SLOW)
                    self._phase = _CLOSED

    def next_event(self) -> Event | None:
        """Run what the input allows; None when more input is needed (or an event is open)."""
        while True:
            phase = self._phase
            if phase == _COMMAND:
                event = self._command()
            elif phase == _DATA:
                event = self._data()
            elif phase == _AUTH:
                event = self._auth_answer()
            elif phase == _CLOSED:
                return CLOSE
            else:  # _WAIT
                return None
            if event is not _AGAIN:
                return event

    def resume(self) -> None:
        """The open event is answered: take commands again (unless closed)."""
        if self._phase == _WAIT:
            self._phase = _COMMAND
            self._after_command()

    def close(self) -> None:
        """End the session after the pending replies."""
        self._phase = _CLOSED

    def tls_started(self) -> None:
        """The STARTTLS handshake completed: plaintext pipelined before it is discarded."""
        self._in.clear()
        self.state.tls = True
        self.starttls = False
        self.touched = True

    def emit(self, reply: Reply) -> None:
        self.out.append(reply.line())

    def reject(self, reply: Reply, detail: str = "") -> None:
        """Queue a refusal, counted as an error and reported to the observer."""
        self.state.errors += 1
        self.ctx.events.rejected(reply, self.state, detail)
        self.out.append(reply.line())

    # -- commands --------------------------------------------------------------------------
    def _command(self) -> Event | None:
        """Read and run one command line."""
        line = self._in.readline(AUTH_LINE_MAX - 2)
        if line is None:
            return None
        st = self.state
        ctx = self.ctx
        st.commands += 1
        if st.commands > ctx.max_commands:
            self.reject(replies.TOO_MANY_COMMANDS)
            self._phase = _CLOSED
            return _AGAIN
        self.touched = True
        rest = b""
        handler = None
        if isinstance(line, bytes):
            verb, _, rest = line.partition(b" ")
            verb_text = verb.upper().decode("ascii", "replace")
            if len(line) + 2 > _LINE_MAX.get(verb_text, COMMAND_LINE_MAX):
                line = replies.COMMAND_TOO_LONG
            else:
                handler = _COMMANDS.get(verb_text)
                if handler is None:
                    line = replies.UNKNOWN_COMMAND
        if handler is None:
            assert isinstance(line, Reply)
            self.reject(line)
            if st.errors > MAX_ERRORS:
                self.reject(replies.TOO_MANY_ERRORS)
                self._phase = _CLOSED
            return _AGAIN
        try:
            arg = rest.decode("utf-8") if rest else ""
        except UnicodeDecodeError:
            self.reject(replies.SYNTAX_ERROR, "undecodable argument")
            return _AGAIN
        try:
            event = handler(self, arg.strip(" "))
        except Exception as exc:
            ctx.events.error(st, handler.__name__, exc)
            self.reject(replies.LOCAL_ERROR, "handler error")
            event = None
        if event is not None:
            return event
        self._after_command()
        return _AGAIN

    def _after_command(self) -> None:
        """A command is done: during a shutdown, a session outside a transaction ends."""
        if (self._phase == _COMMAND and self._env.sender is None
                and self.ctx.shutting_down):
            self.reject(replies.SHUTTING_DOWN)
            self._phase = _CLOSED

    def smtp_EHLO(self, arg: str) -> None:
        """EHLO: advertise extensions."""
        if not arg:
            self.reject(replies.HELO_SYNTAX)
            return
        st = self.state
        st.helo = arg
        st.esmtp = True
        self._env.reset()
        ctx = self.ctx
        self.out.append(_ehlo_reply(
            ctx.hostname, ctx.max_message_size, ctx.smtputf8, self.starttls and not st.tls,
            policy.may_advertise_auth(tls_active=st.tls,
                                      plaintext_ok=ctx.plaintext_auth.allows(st.peer_ip)),
        ))

    def smtp_HELO(self, arg: str) -> None:
        """HELO: plain SMTP greeting."""
        if not arg:
            self.reject(replies.HELO_SYNTAX_PLAIN)
            return
        self.state.helo = arg
        self.state.esmtp = False
        self._env.reset()
        self.emit(replies.helo_ok(self.ctx.hostname))

    def smtp_NOOP(self, arg: str) -> None:
        self.out.append(_NOOP)

    def smtp_RSET(self, arg: str) -> None:
        self._env.reset()
        self.out.append(_RSET)

    def smtp_QUIT(self, arg: str) -> None:
        self.emit(replies.BYE)
        self._phase = _CLOSED

    def smtp_VRFY(self, arg: str) -> None:
        """VRFY: never confirms addresses."""
        self.emit(replies.VRFY_CANNOT)

    def smtp_HELP(self, arg: str) -> None:
        self.emit(replies.HELP)

    def smtp_EXPN(self, arg: str) -> None:
        """EXPN: not offered."""
        self.reject(replies.NOT_IMPLEMENTED)

    def smtp_STARTTLS(self, arg: str) -> Signal | None:
        """STARTTLS: 220, forget the session's greeting, and let the driver upgrade."""
        st = self.state
        if st.tls:
            self.reject(replies.TLS_ALREADY)
            return None
        if not self.starttls:
            self.reject(replies.TLS_NOT_AVAILABLE)
            return None
        if arg:
            self.reject(replies.SYNTAX_ERROR)
            return None
        self._in.clear()  # anything pipelined after STARTTLS is discarded
        self.emit(replies.STARTTLS_GO)
        st.helo = ""
        st.esmtp = False
        self._env.reset()
        self._phase = _WAIT
        return STARTTLS

    # -- authentication ----------------------------------------------------------------------
    def smtp_AUTH(self, arg: str) -> AuthRequest | None:
        """AUTH PLAIN / LOGIN: the exchange; the verification is the driver's."""
        st = self.state
        ctx = self.ctx
        if not st.esmtp:
            self.reject(replies.NEED_EHLO)
            return None
        if policy.session_account_valid(st.account, st.epoch) and not st.via_network:
            self.reject(replies.AUTH_ALREADY)
            return None
        if self._env.sender is not None:
            self.reject(replies.AUTH_IN_TRANSACTION)
            return None
        refusal = policy.may_auth(tls_active=st.tls,
                                  plaintext_ok=ctx.plaintext_auth.allows(st.peer_ip))
        if refusal is None:
            refusal = ctx.throttle.address_refusal(st.peer_ip, ctx.clock())
            if refusal is not None:
                self._phase = _CLOSED
        if refusal is not None:
            self.reject(refusal)
            return None
        parts = arg.split()
        if not parts or len(parts) > 2:
            self.reject(replies.AUTH_SYNTAX)
            return None
        mech = parts[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            self.reject(replies.AUTH_UNKNOWN_MECHANISM)
            return None
        self._sasl = SaslExchange(mech)
        return self._auth_step(self._sasl.start(parts[1] if len(parts) == 2 else None))

    def _auth_answer(self) -> Event | None:
        """The client's answer to a 334 challenge."""
        line = self._in.readline(AUTH_LINE_MAX - 2)
        if line is None:
            return None
        self._phase = _COMMAND
        if isinstance(line, bytes) and self._sasl is not None:
            event = self._auth_step(self._sasl.answer(line))
        else:
            self.reject(line if isinstance(line, Reply) else replies.LOCAL_ERROR)
            event = None
        if event is not None:
            return event
        self._after_command()
        return _AGAIN

    def _auth_step(self, step: bytes | Credentials | Refused) -> AuthRequest | None:
        """Send a challenge, refuse, or hand the credentials to the driver."""
        if isinstance(step, bytes):
            self.out.append(b"334 " + step + b"\r\n")
            self._phase = _AUTH
            return None
        self._sasl = None
        if isinstance(step, Refused):
            self.reject(step.reply, step.detail)
            return None
        try:
            username = step.user.decode("utf-8")
        except UnicodeDecodeError:
            username = ""  # matches no account
        self._phase = _WAIT
        return AuthRequest(username, step.password)

    def authenticated(self, account: Account) -> None:
        """The driver verified the credentials of ``account``: 235."""
        st = self.state
        st.account = account
        st.epoch = account.epoch
        st.via_network = False
        account.last_connection = self.ctx.clock()
        self.emit(replies.AUTH_OK)

    def current_account(self) -> Account | None:
        """The account this session may send as now, or None (see ``session_account``)."""
        return session_account(self.ctx, self.state)

    # -- the mail transaction ------------------------------------------------------------------
    def smtp_MAIL(self, arg: str) -> None:
        """MAIL FROM: sender checks, queue room, size."""
        st = self.state
        if not st.helo:
            self.reject(replies.NEED_EHLO)
            return
        account = self.current_account()
        if account is None:
            self.reject(replies.AUTH_REQUIRED)
            return
        if self.ctx.fenced():
            self.reject(replies.FENCED_MAIL)
            return
        if self._env.sender is not None:
            self.reject(replies.NESTED_MAIL)
            return
        refusal = self._env.mail(self.ctx, st.esmtp, account, arg)
        if refusal is not None:
            self.reject(*refusal)
            return
        self.out.append(_MAIL_OK)

    def smtp_RCPT(self, arg: str) -> None:
        """RCPT TO: add a recipient."""
        if self._env.sender is None:
            self.reject(replies.NEED_MAIL)
            return
        refusal = self._env.rcpt(self.ctx, arg)
        if refusal is not None:
            self.reject(refusal)
            return
        self.out.append(_RCPT_OK)

    def smtp_DATA(self, arg: str) -> None:
        """DATA: 354, then message data (``_data``)."""
        if self._env.sender is None:
            self.reject(replies.NEED_MAIL)
            return
        if not self._env.recipients:
            self.reject(replies.NEED_RCPT)
            return
        if arg:
            self.reject(replies.SYNTAX_ERROR)
            return
        self.out.append(_DATA_GO)
        self._in.start_data()
        self._data_bytes = 0
        self._data_started = self.monotonic()
        self._phase = _DATA

    def _data(self) -> Event | None:
        """Message data up to CRLF.CRLF: its refusal, or ``MessageReceived``."""
        data = self._in.read_data(self.ctx.max_message_size)
        if data is None:
            return None
        env = self._env
        sender, rcpts = env.sender, env.recipients
        env.reset()
        self._phase = _COMMAND
        if isinstance(data, Reply) or sender is None:
            self.reject(data if isinstance(data, Reply) else replies.NEED_MAIL)
            self._after_command()
            return _AGAIN
        self._phase = _WAIT
        return MessageReceived(sender, rcpts, data)


def session_account(ctx: Settings, st: SessionState) -> Account | None:
    """The account a session may send as now, or None (re-resolving network binds)."""
    if policy.session_account_valid(st.account, st.epoch):
        return st.account
    if st.account is not None and not st.via_network:
        return None  # authenticated once, then invalidated: 530 until a new AUTH
    acct = ctx.directory.account_for_ip(st.peer_ip)
    if acct is None or not acct.usable:
        st.account = None
        return None
    if st.account is not acct or st.epoch != acct.epoch:
        acct.last_connection = ctx.clock()
    st.account, st.epoch, st.via_network = acct, acct.epoch, True
    return acct


_NOOP = replies.NOOP_OK.line()
_RSET = replies.RSET_OK.line()
_MAIL_OK = replies.MAIL_OK.line()
_RCPT_OK = replies.RCPT_OK.line()
_DATA_GO = replies.DATA_GO.line()

#: Verb -> handler (a plain function of the session and the argument).
_COMMANDS: dict[str, Callable[[Session, str], Event | None]] = {
    name[5:]: getattr(Session, name) for name in dir(Session) if name.startswith("smtp_")
}


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
