"""Delivery status notifications (bounces), RFC 3464 / RFC 6522.

Owns: the bytes of the bounce message sent back to a message's envelope sender
when one or more of its recipients failed permanently (a 5xx reply, or the
queue lifetime ran out), and the rule of when not to send one.

The message is complete and CRLF-terminated, ready for the spool:

- headers: From ``MAILER-DAEMON@<reporting_mta>``, To the original sender,
  Subject "Undelivered Mail Returned to Sender", Date, Message-ID,
  ``Auto-Submitted: auto-replied`` (RFC 3834), MIME-Version;
- ``multipart/report; report-type=delivery-status`` with three parts:
  1. ``text/plain``: a human explanation listing each failed recipient;
  2. ``message/delivery-status``: per-message fields (Reporting-MTA,
     X-Relayd-Queue-ID, Arrival-Date when known) then one block per recipient
     (Final-Recipient, Action: failed, Status, Remote-MTA, Diagnostic-Code,
     Last-Attempt-Date). The Diagnostic-Code's type (RFC 3464 §2.3.6) is
     ``smtp`` only for a remote server's reply; a failure relayd decided itself
     (no remote answer: DNS, refused destination, expiry, suppression) has
     ``X-Relayd`` (``OWN_DIAGNOSTIC``), so no reader takes it for a server's words;
  3. ``text/rfc822-headers``: the original message's header section.

The MIME boundary is derived from the DSN's Message-ID and checked against the
content, so the output is deterministic for the same input and never collides
with the enclosed headers.

``should_bounce``: never for the null sender (``""`` or ``"<>"``) and never for
a message that is itself a bounce, so two relays cannot bounce at each other.

Untrusted input: the remote reply text (diagnostic), the remote MTA name, the
recipient and sender addresses, and the original headers. Every field that goes
into a header line is reduced to one line of printable ASCII: CR, LF and other
control characters become spaces, runs of whitespace collapse, non-ASCII
characters become ``?``, and the text is cut at 900 characters. The original
headers have their line endings normalised to CRLF and are cut at the end of
the header section if a whole message was passed.

Pure: time (``now``) and ids are passed in. Settings read: none; the caller
passes the reporting MTA name (``server.hostname``) and postmaster address.
See also: relayd.queue.dispatch (decides that a recipient failed), relayd.queue.backoff
(``expired``), relayd.store.spool (queues the bounce with the null sender).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from email.utils import formatdate

SUBJECT = "Undelivered Mail Returned to Sender"
MAX_FIELD = 900
NULL_SENDERS = frozenset({"", "<>"})

_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_UNSAFE_RE = re.compile(r"[^\x21-\x7e]+")  # anything but visible ASCII
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")


#: The diagnostic type of a failure no remote server answered (RFC 3464 §2.3.6).
OWN_DIAGNOSTIC = "X-Relayd"


@dataclass(frozen=True)
class Failure:
    """One failed recipient: its address, status (e.g. 5.1.1), reply and next hop.

    ``diagnostic_type`` is ``smtp`` for a remote server's reply, ``OWN_DIAGNOSTIC``
    for relayd's own verdict (DNS, refused destination, expiry, suppression).
    """

    recipient: str
    status: str
    diagnostic: str
    remote_mta: str | None = None
    diagnostic_type: str = "smtp"


def should_bounce(original_sender: str, is_bounce: bool) -> bool:
    """True when a failure should be reported to the sender (never to <> or for a bounce)."""
    return original_sender.strip() not in NULL_SENDERS and not is_bounce


def clean_field(text: str, limit: int = MAX_FIELD) -> str:
    """Reduce untrusted text to one line of printable ASCII, at most ``limit`` characters."""
    ascii_only = _NON_ASCII_RE.sub("?", text)
    one_line = _UNSAFE_RE.sub(" ", ascii_only).strip()
    return one_line[:limit].rstrip()


def clean_status(status: str) -> str:
    """The status if it is a valid enhanced status code (RFC 3463), else 5.0.0."""
    status = status.strip()
    return status if _STATUS_RE.fullmatch(status) else "5.0.0"


def _address(text: str) -> str:
    """An address for a header or DSN field: one safe token, no angle brackets."""
    return clean_field(text).replace(" ", "").replace("<", "").replace(">", "")


def _msg_id(dsn_message_id: str, reporting_mta: str) -> str:
    ident = _address(dsn_message_id)
    if "@" not in ident:
        ident = f"{ident}@{_address(reporting_mta)}"
    return f"<{ident}>"


def _header_section(original_headers: bytes) -> bytes:
    """The original header section, CRLF line endings, ending in exactly one CRLF."""
    lines = _LINE_END_RE.split(original_headers)
    kept: list[bytes] = []
    for line in lines:
        if line == b"":
            break  # end of the header section (or of the input)
        kept.append(line)
    return b"".join(line + b"\r\n" for line in kept)


def _boundary(seed: str, content: bytes) -> str:
    digest = hashlib.sha256(seed.encode("ascii", "replace")).hexdigest()[:24]
    n = 0
    while True:
        boundary = f"=_relayd_{digest}_{n}"
        if boundary.encode("ascii") not in content:
            return boundary
        n += 1


def _human_text(reporting_mta: str, postmaster: str, queue_id: str, failures: list[Failure]) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more of its",
        "recipients; each is listed below with the reason. The headers",
        "of your message are attached.",
        "",
        f"For further assistance, please send mail to {postmaster}",
        f"and include the queue id {queue_id}.",
        "",
        "The mail system",
        "",
    ]
    for failure in failures:
        recipient = _address(failure.recipient)
        diagnostic = clean_field(failure.diagnostic)
        if failure.remote_mta:
            remote = clean_field(failure.remote_mta)
            lines.append(f"<{recipient}>: host {remote} said: {diagnostic}")
        else:
            lines.append(f"<{recipient}>: {diagnostic}")
    return "\r\n".join(lines) + "\r\n"


def remote_mta_name(hop: str) -> str:
    """The Remote-MTA of a next hop as logged (``mx.example[IP]:PORT``, ``IP:PORT``,
    ``[IPv6]:PORT``): the host name RFC 3464's ``dns`` type wants, as Postfix writes
    it (``mx.example``), else the address as an SMTP address literal (``[IP]``)."""
    name, bracket, rest = hop.partition("[")
    if bracket and name:
        return name
    if bracket:  # [IPv6]:PORT
        return "[" + rest.partition("]")[0] + "]"
    host, colon, port = hop.rpartition(":")
    return f"[{host}]" if colon and port.isdigit() else hop


def _delivery_status(
    reporting_mta: str,
    queue_id: str,
    received_at: float | None,
    failures: list[Failure],
    now: float,
) -> str:
    blocks = [
        [
            f"Reporting-MTA: dns; {reporting_mta}",
            f"X-Relayd-Queue-ID: {queue_id}",
        ]
    ]
    if received_at is not None:
        blocks[0].append(f"Arrival-Date: {formatdate(received_at, usegmt=True)}")
    for failure in failures:
        block = [
            f"Final-Recipient: rfc822; {_address(failure.recipient)}",
            "Action: failed",
            f"Status: {clean_status(failure.status)}",
        ]
        if failure.remote_mta:
            block.append(f"Remote-MTA: dns; {clean_field(remote_mta_name(failure.remote_mta))}")
        kind = "smtp" if failure.diagnostic_type == "smtp" else OWN_DIAGNOSTIC
        block.append(f"Diagnostic-Code: {kind}; {clean_field(failure.diagnostic)}")
        block.append(f"Last-Attempt-Date: {formatdate(now, usegmt=True)}")
        blocks.append(block)
    # Blocks are separated by one blank line; the last one ends with its CRLF.
    return "\r\n".join("".join(line + "\r\n" for line in block) for block in blocks)


def build_dsn(
    *,
    reporting_mta: str,
    postmaster: str,
    original_sender: str,
    original_message_id: str,
    original_headers: bytes,
    failures: list[Failure],
    now: float,
    dsn_message_id: str,
    received_at: float | None = None,
) -> bytes:
    """The complete CRLF bounce message reporting ``failures`` to ``original_sender``."""
    if not failures:
        raise ValueError("a DSN needs at least one failed recipient")
    mta = _address(reporting_mta)
    queue_id = clean_field(original_message_id)
    headers_part = _header_section(original_headers)
    human = _human_text(mta, clean_field(postmaster), queue_id, failures).encode("ascii")
    status = _delivery_status(mta, queue_id, received_at, failures, now).encode("ascii")
    message_id = _msg_id(dsn_message_id, mta)
    boundary = _boundary(message_id, human + status + headers_part)

    rfc822_cte = b"7bit" if headers_part.isascii() else b"8bit"
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{_address(original_sender)}>",
        f"Subject: {SUBJECT}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    dash = f"--{boundary}".encode("ascii")
    out = [
        "\r\n".join(top).encode("ascii") + b"\r\n",
        dash + b"\r\n",
        b"Content-Description: Notification\r\n",
        b'Content-Type: text/plain; charset="us-ascii"\r\n',
        b"Content-Transfer-Encoding: 7bit\r\n\r\n",
        human,
        b"\r\n" + dash + b"\r\n",
        b"Content-Description: Delivery report\r\n",
        b"Content-Type: message/delivery-status\r\n\r\n",
        status,
        b"\r\n" + dash + b"\r\n",
        b"Content-Description: Undelivered Message Headers\r\n",
        b"Content-Type: text/rfc822-headers\r\n",
        b"Content-Transfer-Encoding: " + rfc822_cte + b"\r\n\r\n",
        headers_part,
        b"\r\n" + dash + b"--\r\n",
    ]
    return b"".join(out)
