"""Every SMTP reply relayd sends, in one table (SEMANTICS.md §6).

Owns: the exact wire text of each reply, and the rejection reason label that
goes with each refusal (the ``reason`` label of
``relayd_smtp_rejections_total``). Nothing else in the code base writes a reply
string; modules name a constant from here.

Wire text is deliberately bland: the detail of *why* (unknown user, disabled,
deleted...) goes to the log and to the metric's reason label, never to the
client.

Untrusted input: none. Settings read: none.
See also: relayd.smtp.policy (chooses a reply), relayd.smtp.server (sends it).
"""

from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    """One SMTP reply: its wire text and, for refusals, the metric reason."""

    text: str
    reason: str = ""

    @property
    def code(self) -> int:
        """The three-digit reply code."""
        return int(self.text[:3])

    def line(self) -> bytes:
        """The reply as it goes on the wire, CRLF-terminated."""
        return self.text.encode("utf-8") + b"\r\n"


# --- success -----------------------------------------------------------------
AUTH_OK = Reply("235 2.7.0 Authentication successful")
MAIL_OK = Reply("250 2.1.0 Ok")
RCPT_OK = Reply("250 2.1.5 Ok")
RSET_OK = Reply("250 2.0.0 Ok")
NOOP_OK = Reply("250 2.0.0 Ok")
DATA_GO = Reply("354 End data with <CR><LF>.<CR><LF>")
BYE = Reply("221 2.0.0 Bye")
VRFY_CANNOT = Reply("252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery")
STARTTLS_GO = Reply("220 2.0.0 Ready to start TLS")
HELP = Reply("214 2.0.0 See RFC 5321")


def queued(message_id: str) -> Reply:
    """The 250 sent after a message is committed to disk."""
    return Reply(f"250 2.0.0 Ok: queued as {message_id}")


def helo_ok(hostname: str) -> Reply:
    """The 250 answer to HELO."""
    return Reply(f"250 {hostname}")


# --- authentication ----------------------------------------------------------
# The same wire text for every 535; the reason differs only in the metric.
AUTH_FAILED = Reply("535 5.7.8 Authentication credentials invalid", "auth_failed")
AUTH_DISABLED = Reply(AUTH_FAILED.text, "account_disabled")
AUTH_DELETED = Reply(AUTH_FAILED.text, "account_deleted")
AUTH_DOMAIN_DELETED = Reply(AUTH_FAILED.text, "domain_deleted")
AUTH_NEEDS_TLS = Reply(
    "538 5.7.11 Encryption required for requested authentication mechanism", "auth_needs_tls"
)
AUTH_REQUIRED = Reply("530 5.7.0 Authentication required", "auth_required")
AUTH_RATE_LIMITED = Reply(
    "421 4.7.0 Too many failed authentication attempts, closing connection",
    "auth_rate_limited",
)
# The same text when one address failed with too many distinct usernames (stuffing).
AUTH_RATE_LIMITED_ADDRESS = Reply(AUTH_RATE_LIMITED.text, "auth_rate_limited_address")
AUTH_ALREADY = Reply("503 5.5.1 Already authenticated", "bad_sequence")
AUTH_IN_TRANSACTION = Reply(
    "503 5.5.1 AUTH not permitted during a mail transaction", "bad_sequence"
)
AUTH_UNKNOWN_MECHANISM = Reply("504 5.5.4 Unrecognized authentication type", "syntax")
AUTH_BAD_BASE64 = Reply("501 5.5.2 Cannot decode base64", "syntax")
AUTH_ABORTED = Reply("501 5.7.0 Authentication aborted", "syntax")
AUTH_SYNTAX = Reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]", "syntax")

# --- envelope ----------------------------------------------------------------
SENDER_NOT_ALLOWED = Reply(
    "553 5.7.1 Sender address not allowed for this account", "sender_not_allowed"
)
ADDRESS_LITERAL = Reply(
    "550 5.7.1 Address literal recipients not accepted", "address_literal"
)
SIZE_EXCEEDED = Reply("552 5.3.4 Message size exceeds fixed maximum", "size")
TOO_MANY_RECIPIENTS = Reply("452 4.5.3 Too many recipients", "too_many_recipients")
QUEUE_FULL = Reply("452 4.3.1 Insufficient system storage", "queue_full")
LOW_DISK = Reply("452 4.3.1 Insufficient system storage", "low_disk")
# The header From (or Sender) is checked at the end of DATA (relayd.smtp.headerfrom).
HEADER_FROM_NOT_ALLOWED = Reply(
    "550 5.7.1 From header address not allowed for this account", "header_from_not_allowed"
)
NO_HEADER_FROM = Reply("550 5.6.0 Message has no From header", "no_header_from")
BAD_LINE_ENDING = Reply(
    "550 5.5.2 Bare CR, bare LF or NUL in message data not allowed", "bad_line_ending"
)
NON_ASCII_ADDRESS = Reply(
    "553 5.6.7 Non-ASCII address requires SMTPUTF8", "non_ascii_address"
)
BAD_SENDER_SYNTAX = Reply("501 5.1.7 Bad sender address syntax", "syntax")
BAD_RECIPIENT_SYNTAX = Reply("501 5.1.3 Bad recipient address syntax", "syntax")
MAIL_SYNTAX = Reply("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]", "syntax")
RCPT_SYNTAX = Reply("501 5.5.4 Syntax: RCPT TO:<address> [parameters]", "syntax")
PARAM_UNKNOWN = Reply("555 5.5.4 Unsupported MAIL or RCPT parameter", "syntax")
NESTED_MAIL = Reply("503 5.5.1 Nested MAIL command", "bad_sequence")
NEED_MAIL = Reply("503 5.5.1 Need MAIL command first", "bad_sequence")
NEED_RCPT = Reply("503 5.5.1 Need RCPT command first", "bad_sequence")
NEED_EHLO = Reply("503 5.5.1 Send EHLO or HELO first", "bad_sequence")
HELO_SYNTAX = Reply("501 5.5.4 Syntax: EHLO hostname", "syntax")

# --- protocol ----------------------------------------------------------------
LINE_TOO_LONG = Reply("500 5.5.2 Line too long", "line_too_long")
COMMAND_TOO_LONG = Reply("500 5.5.2 Command line too long", "line_too_long")
UNKNOWN_COMMAND = Reply("500 5.5.1 Command not recognized", "unknown_command")
SYNTAX_ERROR = Reply("501 5.5.4 Syntax error in parameters or arguments", "syntax")
NOT_IMPLEMENTED = Reply("502 5.5.1 Command not implemented", "unknown_command")
TLS_NOT_AVAILABLE = Reply("454 4.7.0 TLS not available", "tls")
TLS_ALREADY = Reply("503 5.5.1 TLS already active", "bad_sequence")
TOO_MANY_ERRORS = Reply("421 4.7.0 Too many errors, closing connection", "too_many_errors")
TOO_MANY_COMMANDS = Reply(
    "421 4.7.0 Too many commands, closing connection", "too_many_commands"
)
TOO_MANY_CONNECTIONS = Reply(
    "421 4.7.0 Too many connections from your address", "too_many_connections"
)
# The global cap (max_connections): the server is full, not this client's doing.
TOO_MANY_CONNECTIONS_GLOBAL = Reply(
    "421 4.3.2 Too many connections, try again later", "too_many_connections_global"
)
# Input before the greeting (an early talker, Postfix postscreen's PREGREET): sent
# instead of the 220, then close (RFC 5321 §3.1 allows a 554 as the greeting).
PREGREET = Reply("554 5.5.0 Protocol error: input before the greeting", "pregreet")
# A command line (or AUTH answer) ended by a bare LF: RFC 5321 §2.3.8 allows only CRLF.
BARE_LF_COMMAND = Reply(
    "500 5.5.2 Bare LF in command line not allowed", "bad_line_ending"
)
IDLE_TIMEOUT = Reply("421 4.4.2 Idle timeout, closing connection", "timeout")
DATA_TOO_SLOW = Reply("421 4.4.2 Data rate too low, closing connection", "timeout")
HELO_SYNTAX_PLAIN = Reply("501 5.5.4 Syntax: HELO hostname", "syntax")
SHUTTING_DOWN = Reply("421 4.3.2 Service shutting down, closing connection", "shutdown")

# --- local trouble -------------------------------------------------------------
LOCAL_ERROR = Reply("451 4.3.0 Local error in processing", "internal_error")
#: Cluster mode: this node lost its database for longer than its fencing interval
#: (relayd.cluster.node); the client should try another node.
FENCED_AUTH = Reply("454 4.7.0 Temporary authentication failure, try another server", "fenced")
FENCED_MAIL = Reply("451 4.3.0 Temporarily unable to accept mail, try another server",
                    "fenced")
LOCAL_ERROR_CLOSING = Reply(
    "421 4.3.0 Local error in processing, closing connection", "internal_error"
)


def greeting(hostname: str) -> Reply:
    """The 220 banner."""
    return Reply(f"220 {hostname} ESMTP relayd")


#: Every rejection reason label, for pre-creating metric rows at zero.
REJECTION_REASONS: tuple[str, ...] = tuple(
    sorted(
        {
            r.reason
            for r in globals().values()
            if isinstance(r, Reply) and r.reason
        }
    )
)
