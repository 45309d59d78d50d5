"""relayd.smtp.session, the protocol state machine, driven with byte strings (no sockets).

Each test feeds bytes to a ``Session`` and checks the exact replies and the
events it hands to its driver (credential checks, accepted messages,
STARTTLS, close). The directory, the throttle and the policy are the real
ones; the context is a plain object with the settings.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from relayd.directory.accounts import Account, Directory, Domain
from relayd.smtp import policy, replies
from relayd.smtp.replies import Reply
from relayd.smtp.session import (
    CLOSE,
    STARTTLS,
    AuthRequest,
    Event,
    MessageReceived,
    Session,
    SessionState,
)

HOST = "relay.unit"


class _Queue:
    def queued_count(self, account_id: int) -> int:
        return 0


@dataclass
class _Events:
    rejections: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def rejected(self, reply: Reply, session: SessionState, detail: str = "") -> None:
        self.rejections.append(reply.reason)

    def error(self, session: SessionState, where: str, exc: BaseException) -> None:
        self.errors.append(where)


def _directory() -> tuple[Directory, Account]:
    directory = Directory()
    domain = Domain(1, "example.com", "s1")
    directory.put_domain(domain)
    bound = Account(id=1, username="app@example.com", domain=domain, password_hash="",
                    networks=["192.0.2.0/24"])
    directory.put_account(bound)
    directory.put_account(Account(id=2, username="user@example.com", domain=domain,
                                  password_hash=""))
    directory.rebuild_networks()
    return directory, bound


@dataclass
class _Ctx:
    directory: Directory
    hostname: str = HOST
    scheduler: _Queue = field(default_factory=_Queue)
    events: _Events = field(default_factory=_Events)
    plaintext_auth: policy.PlaintextAuthPolicy = field(
        default_factory=lambda: policy.PlaintextAuthPolicy(["192.0.2.0/24"]))
    throttle: policy.AuthThrottle = field(default_factory=lambda: policy.AuthThrottle(
        free_failures=3, max_failures=10, base_delay=1.0, max_delay=10.0))
    max_message_size: int = 1000
    max_recipients: int = 3
    max_queued_per_account: int = 100
    min_free_disk: int = 0
    free_disk: Callable[[], int] = lambda: 1 << 40
    min_data_rate: int = 0
    data_rate_grace: float = 30.0
    max_commands: int = 100
    smtputf8: bool = True
    allow_address_literals: bool = False
    shutting_down: bool = False
    clock: Callable[[], float] = lambda: 1000.0
    fenced: Callable[[], bool] = lambda: False


def _session(peer: str = "192.0.2.7", *, starttls: bool = False, **settings: Any
             ) -> tuple[Session, _Ctx]:
    directory, _bound = _directory()
    ctx = _Ctx(directory=directory, **settings)
    session = Session(ctx, SessionState(peer_ip=peer), starttls=starttls)
    session.greet()
    return session, ctx


def _feed(session: Session, data: bytes) -> tuple[list[str], Event | None]:
    """Feed ``data``; the reply lines written and the event the session stopped at."""
    session.receive(data)
    event = session.next_event()
    out = b"".join(session.out).decode()
    session.out.clear()
    return out.split("\r\n")[:-1], event


def test_greeting_and_ehlo_keywords_follow_tls_and_auth_policy() -> None:
    """220 first; EHLO lists PIPELINING, SIZE, 8BITMIME, STARTTLS when offered, AUTH when
    plaintext AUTH is allowed from the address."""
    session, _ctx = _session(starttls=True)
    lines, event = _feed(session, b"EHLO client.example\r\n")
    assert event is None
    assert lines == ["220 relay.unit ESMTP relayd", "250-relay.unit", "250-PIPELINING",
                     "250-SIZE 1000", "250-8BITMIME", "250-ENHANCEDSTATUSCODES",
                     "250-SMTPUTF8", "250-STARTTLS", "250-AUTH PLAIN LOGIN", "250 HELP"]
    outside, _ = _session(peer="198.51.100.1", smtputf8=False)
    lines, _ = _feed(outside, b"EHLO x\r\n")
    assert "250-AUTH PLAIN LOGIN" not in lines and "250-STARTTLS" not in lines
    assert "250-SMTPUTF8" not in lines and lines[-1] == "250 HELP"


def test_auth_plain_with_initial_response_asks_the_driver() -> None:
    """AUTH PLAIN with its initial response gives an AuthRequest; authenticated() says 235."""
    session, ctx = _session()
    blob = base64.b64encode(b"\0user@example.com\0secret").decode()
    _feed(session, b"EHLO c\r\n")
    lines, event = _feed(session, f"AUTH PLAIN {blob}\r\nNOOP\r\n".encode())
    assert lines == [] and event == AuthRequest("user@example.com", b"secret")
    assert session.next_event() is None  # nothing runs while the check is open
    account = ctx.directory.account("user@example.com")
    assert account is not None
    session.authenticated(account)
    session.resume()
    lines, event = _feed(session, b"")
    assert lines == ["235 2.7.0 Authentication successful", "250 2.0.0 Ok"]
    lines, _ = _feed(session, b"AUTH PLAIN " + blob.encode() + b"\r\n")
    assert lines == ["503 5.5.1 Already authenticated"]


def test_auth_plain_and_login_challenges() -> None:
    """PLAIN without initial response: ``334 ``; LOGIN: Username:, Password: challenges."""
    session, _ = _session()
    _feed(session, b"EHLO c\r\n")
    lines, event = _feed(session, b"AUTH PLAIN\r\n")
    assert lines == ["334 "] and event is None
    lines, event = _feed(session, base64.b64encode(b"u\0u\0pw") + b"\r\n")
    assert event == AuthRequest("u", b"pw")
    session.reject(replies.AUTH_FAILED)
    session.resume()
    lines, event = _feed(session, b"AUTH LOGIN\r\n")
    assert lines == ["535 5.7.8 Authentication credentials invalid", "334 VXNlcm5hbWU6"]
    lines, event = _feed(session, base64.b64encode(b"name") + b"\r\n")
    assert lines == ["334 UGFzc3dvcmQ6"] and event is None
    lines, event = _feed(session, base64.b64encode(b"word") + b"\r\n")
    assert event == AuthRequest("name", b"word")


def test_auth_refusals() -> None:
    """Aborted, bad base64, unknown mechanism, bad PLAIN layout, plaintext outside the
    allowed networks, and AUTH before EHLO."""
    session, ctx = _session()
    lines, _ = _feed(session, b"AUTH PLAIN\r\n")
    assert lines == ["220 relay.unit ESMTP relayd", "503 5.5.1 Send EHLO or HELO first"]
    _feed(session, b"EHLO c\r\n")
    assert _feed(session, b"AUTH LOGIN\r\n*\r\n")[0] == [
        "334 VXNlcm5hbWU6", "501 5.7.0 Authentication aborted"]
    assert _feed(session, b"AUTH PLAIN %%%\r\n")[0] == ["501 5.5.2 Cannot decode base64"]
    assert _feed(session, b"AUTH CRAM-MD5\r\n")[0] == [
        "504 5.5.4 Unrecognized authentication type"]
    assert _feed(session, b"AUTH PLAIN " + base64.b64encode(b"a\0b") + b"\r\n")[0] == [
        "501 5.5.2 Cannot decode base64"]
    assert ctx.events.rejections[-1] == "syntax"
    outside, _ = _session(peer="198.51.100.1")
    _feed(outside, b"EHLO c\r\n")
    assert _feed(outside, b"AUTH PLAIN AGFiAGM=\r\n")[0] == [
        "538 5.7.11 Encryption required for requested authentication mechanism"]


def _transaction(session: Session, data: bytes) -> tuple[list[str], Event | None]:
    _feed(session, b"EHLO c\r\n")
    return _feed(session, b"MAIL FROM:<app@example.com>\r\nRCPT TO:<r@dest.test>\r\n"
                          b"DATA\r\n" + data)


def test_mail_rcpt_data_happy_path_unstuffs_dots() -> None:
    """A network-bound account sends; the message comes out unstuffed, after one CRLF."""
    session, _ = _session()
    lines, event = _transaction(session, b"Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n")
    assert lines == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert isinstance(event, MessageReceived)
    assert (event.sender, event.recipients) == ("app@example.com", ["r@dest.test"])
    assert bytes(event.data) == b"\r\nSubject: x\r\n\r\n.dot\r\nbody\r\n"
    assert not session.idle
    session.emit(replies.queued("ID1"))
    session.resume()
    lines, _ = _feed(session, b"QUIT\r\n")
    assert lines == ["250 2.0.0 Ok: queued as ID1", "221 2.0.0 Bye"]
    assert session.next_event() is CLOSE


def test_fenced_node_refuses_mail_with_451() -> None:
    """Cluster mode: while the node is fenced, MAIL from an authorised session gets 451
    4.3.0 (counted as ``fenced``); once it opens again, the same session may send."""
    fenced = [True]
    session, ctx = _session(fenced=lambda: fenced[0])
    _feed(session, b"EHLO c\r\n")
    assert _feed(session, b"MAIL FROM:<app@example.com>\r\n")[0] == [
        "451 4.3.0 Temporarily unable to accept mail, try another server"]
    assert ctx.events.rejections[-1] == "fenced"
    fenced[0] = False
    assert _feed(session, b"MAIL FROM:<app@example.com>\r\n")[0] == ["250 2.1.0 Ok"]


def test_bad_sequence_gets_503() -> None:
    """MAIL before EHLO, RCPT and DATA before MAIL, DATA before RCPT, nested MAIL."""
    session, ctx = _session()
    lines, _ = _feed(session, b"MAIL FROM:<app@example.com>\r\n")
    assert lines[1:] == ["503 5.5.1 Send EHLO or HELO first"]
    _feed(session, b"HELO c\r\n")
    assert _feed(session, b"RCPT TO:<a@b.test>\r\nDATA\r\n")[0] == [
        "503 5.5.1 Need MAIL command first", "503 5.5.1 Need MAIL command first"]
    assert _feed(session, b"MAIL FROM:<app@example.com>\r\nDATA\r\n"
                          b"MAIL FROM:<app@example.com>\r\n")[0] == [
        "250 2.1.0 Ok", "503 5.5.1 Need RCPT command first", "503 5.5.1 Nested MAIL command"]
    assert ctx.events.rejections.count("bad_sequence") == 5


def test_syntax_errors_and_unknown_commands() -> None:
    """501 for bad arguments, 500 for an unknown verb, 502 for EXPN, 555 for a parameter."""
    session, _ = _session()
    assert _feed(session, b"EHLO\r\n")[0][1:] == ["501 5.5.4 Syntax: EHLO hostname"]
    _feed(session, b"EHLO c\r\n")
    assert _feed(session, b"FOO bar\r\nEXPN x\r\nMAIL FROM:<app@example.com> X=1\r\n"
                          b"MAIL FROM:app\r\n")[0] == [
        "500 5.5.1 Command not recognized", "502 5.5.1 Command not implemented",
        "555 5.5.4 Unsupported MAIL or RCPT parameter", "501 5.1.7 Bad sender address syntax"]
    assert _feed(session, b"NOOP \xff\r\n")[0] == [
        "501 5.5.4 Syntax error in parameters or arguments"]


def test_line_limits_and_discarded_long_lines() -> None:
    """512 octets for a command, 2048 for MAIL; a huge line without LF is never held."""
    session, _ = _session()
    assert _feed(session, b"NOOP " + b"x" * 510 + b"\r\n")[0][1:] == [
        "500 5.5.2 Command line too long"]
    for _ in range(4):
        assert _feed(session, b"X" * 65536) == ([], None)
        assert session.buffered == 0
    assert _feed(session, b"tail\r\nNOOP\r\n")[0] == [
        "500 5.5.2 Command line too long", "250 2.0.0 Ok"]
    assert _feed(session, b"NOOP\nNOOP\r\n")[0] == [
        "500 5.5.2 Bare LF in command line not allowed", "250 2.0.0 Ok"]


def test_data_with_bare_lf_or_smuggled_terminator_is_refused() -> None:
    """A bare LF in data is 550 5.5.2; the commands smuggled behind ``\\n.\\r\\n`` never run
    as commands: they are data of the refused message."""
    session, ctx = _session()
    lines, event = _transaction(
        session, b"Subject: a\r\n\r\nx\n.\r\nMAIL FROM:<evil@example.com>\r\n"
                 b"RCPT TO:<v@dest.test>\r\nDATA\r\nspoof\r\n.\r\n")
    assert event is None
    assert lines[-1] == "550 5.5.2 Bare CR, bare LF or NUL in message data not allowed"
    assert ctx.events.rejections == ["bad_line_ending"]
    assert session.idle
    _, event = _transaction(session, b"a\r\n\0\r\n.\r\n")
    assert event is None and ctx.events.rejections[-1] == "bad_line_ending"


def test_oversize_data_is_discarded_while_reading() -> None:
    """Past max_message_size the data is dropped as it comes; the end gets 552 5.3.4."""
    session, _ = _session(max_message_size=1000)
    _transaction(session, b"")
    for _ in range(10):
        assert _feed(session, b"y" * 998 + b"\r\n") == ([], None)
        assert session.buffered <= 1008
    assert _feed(session, b".\r\nNOOP\r\n")[0] == [
        "552 5.3.4 Message size exceeds fixed maximum", "250 2.0.0 Ok"]


def test_pipelined_commands_in_one_chunk_answer_in_order() -> None:
    """RFC 2920: one chunk, every reply in order, in one output."""
    session, _ = _session()
    lines, event = _feed(session, b"EHLO c\r\nMAIL FROM:<app@example.com>\r\n"
                                  b"RCPT TO:<a@d.test>\r\nRCPT TO:<b@d.test>\r\nRSET\r\n"
                                  b"NOOP\r\nVRFY x\r\nHELP\r\n")
    assert event is None
    assert lines[8] == "250 HELP"
    assert lines[9:] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok",
                          "250 2.0.0 Ok", replies.VRFY_CANNOT.text, "214 2.0.0 See RFC 5321"]


def test_recipient_cap_and_address_literals() -> None:
    """452 4.5.3 past max_recipients; an address literal gets 550 5.7.1."""
    session, _ = _session(max_recipients=1)
    _feed(session, b"EHLO c\r\nMAIL FROM:<app@example.com>\r\n")
    assert _feed(session, b"RCPT TO:<a@[127.0.0.1]>\r\nRCPT TO:<a@d.test>\r\n"
                          b"RCPT TO:<b@d.test>\r\n")[0] == [
        "550 5.7.1 Address literal recipients not accepted", "250 2.1.5 Ok",
        "452 4.5.3 Too many recipients"]


def test_unbound_address_must_authenticate() -> None:
    """MAIL from an address bound to no account: 530 5.7.0."""
    session, _ = _session(peer="198.51.100.9")
    assert _feed(session, b"EHLO c\r\nMAIL FROM:<app@example.com>\r\n")[0][-1] == \
        "530 5.7.0 Authentication required"


def test_error_and_command_caps_close() -> None:
    """Past 20 refusals an unknown command ends the session with 421; so does max_commands."""
    session, _ = _session()
    lines, event = _feed(session, b"BAD\r\n" * 25)
    assert lines[-1] == "421 4.7.0 Too many errors, closing connection"
    assert lines.count("500 5.5.1 Command not recognized") == 21 and event is CLOSE
    capped, _ = _session(max_commands=2)
    lines, event = _feed(capped, b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    assert lines[1:] == ["250 2.0.0 Ok", "250 2.0.0 Ok",
                         "421 4.7.0 Too many commands, closing connection"]
    assert event is CLOSE


def test_starttls_discards_pipelined_plaintext() -> None:
    """STARTTLS: 220, then the driver upgrades; what followed in plaintext is dropped,
    and the session starts over without a HELO."""
    session, _ = _session(starttls=True)
    _feed(session, b"EHLO c\r\n")
    lines, event = _feed(session, b"STARTTLS\r\nMAIL FROM:<app@example.com>\r\n")
    assert lines == ["220 2.0.0 Ready to start TLS"] and event is STARTTLS
    session.receive(b"NOOP\r\n")
    session.tls_started()
    session.resume()
    assert _feed(session, b"MAIL FROM:<app@example.com>\r\nSTARTTLS\r\n")[0] == [
        "503 5.5.1 Send EHLO or HELO first", "503 5.5.1 TLS already active"]
    plain, _ = _session()
    assert _feed(plain, b"STARTTLS\r\n")[0][1:] == ["454 4.7.0 TLS not available"]


def test_minimum_data_rate_closes_a_slow_sender() -> None:
    """After the grace, data slower than min_data_rate gets 421 4.4.2 and a close."""
    now = [0.0]
    directory, _ = _directory()
    ctx = _Ctx(directory=directory, min_data_rate=100, data_rate_grace=5.0)
    session = Session(ctx, SessionState(peer_ip="192.0.2.7"), monotonic=lambda: now[0])
    _transaction(session, b"")
    now[0] = 4.0
    assert _feed(session, b"x" * 10) == ([], None)  # within the grace
    now[0] = 10.0
    lines, event = _feed(session, b"x" * 10)
    assert lines == ["421 4.4.2 Data rate too low, closing connection"] and event is CLOSE


def test_shutdown_ends_an_idle_session_after_its_command() -> None:
    """During a shutdown, a command outside a transaction is answered, then 421 4.3.2."""
    session, ctx = _session()
    _feed(session, b"EHLO c\r\nMAIL FROM:<app@example.com>\r\n")
    ctx.shutting_down = True
    lines, event = _feed(session, b"RCPT TO:<a@d.test>\r\nRSET\r\n")
    assert lines == ["250 2.1.5 Ok", "250 2.0.0 Ok",
                     "421 4.3.2 Service shutting down, closing connection"]
    assert event is CLOSE


def test_handler_error_becomes_451(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault inside a command handler: 451 4.3.0, logged, the session goes on."""
    session, ctx = _session()

    def broken(self: Session, arg: str) -> None:
        raise RuntimeError("secret")

    monkeypatch.setitem(Session.__dict__["smtp_NOOP"].__globals__["_COMMANDS"], "NOOP", broken)
    lines, _ = _feed(session, b"NOOP\r\nRSET\r\n")
    assert lines[1:] == ["451 4.3.0 Local error in processing", "250 2.0.0 Ok"]
    assert ctx.events.errors == ["broken"]
