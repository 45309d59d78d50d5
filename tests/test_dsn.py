"""RFC 3464 bounces, parsed back with Python's email package."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

from hypothesis import given
from hypothesis import strategies as st

from relayd.delivery.dsn import Failure, build_dsn, clean_field, should_bounce

NOW = 1_700_000_000.0
ORIGINAL = (
    b"From: App <app@example.com>\r\n"
    b"To: someone@remote.test\r\n"
    b"Subject: Invoice 42\r\n"
    b"Message-ID: <abc@example.com>\r\n"
    b"\r\n"
    b"body that must not be returned\r\n"
)
FAILURE = Failure("nobody@remote.test", "5.1.1", "550 5.1.1 no such user", "mx.remote.test")


def build(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "reporting_mta": "relay.example.net",
        "postmaster": "postmaster@example.net",
        "original_sender": "app@example.com",
        "original_message_id": "Q1234",
        "original_headers": ORIGINAL,
        "failures": [FAILURE],
        "now": NOW,
        "dsn_message_id": "dsn-1",
    }
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def test_output_uses_crlf_only() -> None:
    """Every line ends in CRLF; there is no bare CR or LF."""
    raw = build()
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_top_level_headers() -> None:
    """The bounce comes from MAILER-DAEMON, goes to the sender, and is marked automatic."""
    msg = parse(build())
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example.net"
    assert msg["To"].addresses[0].addr_spec == "app@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == "<dsn-1@relay.example.net>"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["MIME-Version"] == "1.0"


def test_full_message_id_is_kept() -> None:
    """A dsn_message_id that already has a domain is used as it is."""
    assert parse(build(dsn_message_id="<x.1@ids.example>"))["Message-ID"] == "<x.1@ids.example>"


def test_multipart_report_with_three_parts() -> None:
    """The body is multipart/report (delivery-status) with text, status and headers parts."""
    msg = parse(build())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not msg.defects


def test_human_part_names_recipient_and_reason() -> None:
    """The text part tells a person which recipient failed and what the remote said."""
    text = parts(parse(build()))[0].get_payload()
    assert isinstance(text, str)
    assert "<nobody@remote.test>" in text
    assert "550 5.1.1 no such user" in text
    assert "Q1234" in text


def test_per_message_fields() -> None:
    """The first status block names the reporting MTA, queue id and arrival date."""
    first = status_blocks(parse(build(received_at=NOW - 3600)))[0]
    assert first["Reporting-MTA"] == "dns; relay.example.net"
    assert first["X-Relayd-Queue-ID"] == "Q1234"
    assert parsedate_to_datetime(first["Arrival-Date"]).timestamp() == NOW - 3600


def test_per_recipient_fields() -> None:
    """Each failed recipient has Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code."""
    block = status_blocks(parse(build()))[1]
    assert block["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.remote.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"


def test_one_block_per_recipient() -> None:
    """Several failures give one per-recipient block each, in order."""
    failures = [
        FAILURE,
        Failure("late@remote.test", "4.4.7", "queue lifetime expired", None),
    ]
    blocks = status_blocks(parse(build(failures=failures)))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; nobody@remote.test",
        "rfc822; late@remote.test",
    ]
    assert blocks[2]["Remote-MTA"] is None
    assert blocks[2]["Status"] == "4.4.7"


def test_invalid_status_becomes_generic() -> None:
    """A status that is not an enhanced status code is reported as 5.0.0."""
    failure = Failure("x@remote.test", "5.1.1\r\nX-Evil: 1", "550 no", None)
    assert status_blocks(parse(build(failures=[failure])))[1]["Status"] == "5.0.0"


def test_original_headers_only() -> None:
    """The third part holds the original headers and none of the original body."""
    raw = build()
    headers_part = parts(parse(raw))[2].get_payload()
    assert isinstance(headers_part, str)
    assert "Subject: Invoice 42" in headers_part
    assert "body that must not be returned" not in raw.decode()


def test_bare_lf_in_original_headers_is_normalised() -> None:
    """Original headers with bare LF line endings come out as CRLF."""
    raw = build(original_headers=b"Subject: a\nX-Other: b\n\nthe body\n")
    assert b"Subject: a\r\nX-Other: b\r\n" in raw
    assert b"the body" not in raw


def test_remote_reply_cannot_inject_headers() -> None:
    """CR/LF in the remote reply or MTA name does not start a new header line."""
    evil = Failure(
        "victim@remote.test\r\nBcc: x@evil.test",
        "5.1.1",
        "550 no\r\nX-Injected: yes\r\n\r\n--boundary",
        "mx.evil\r\nX-Injected-Mta: yes",
    )
    raw = build(failures=[evil], original_sender="app@example.com\r\nBcc: y@evil.test")
    msg = parse(raw)
    for line in raw.split(b"\r\n"):
        assert not line.startswith((b"X-Injected", b"Bcc"))
    assert msg["Bcc"] is None
    block = status_blocks(msg)[1]
    assert block["X-Injected"] is None
    assert block["Diagnostic-Code"].startswith("smtp; 550 no X-Injected: yes")


def test_boundary_avoids_content() -> None:
    """The MIME boundary never appears inside the enclosed headers."""
    first = parse(build()).get_boundary()
    assert first is not None
    hostile = ORIGINAL.replace(b"Subject:", f"X-B: --{first}\r\nSubject:".encode())
    msg = parse(build(original_headers=hostile))
    assert msg.get_boundary() != first
    assert len(parts(msg)) == 3


def test_non_ascii_original_headers_marked_8bit() -> None:
    """8-bit original headers are declared 8bit, ASCII ones 7bit."""
    assert parts(parse(build()))[2]["Content-Transfer-Encoding"] == "7bit"
    raw = build(original_headers="Subject: café\r\n\r\n".encode())
    assert parts(parse(raw))[2]["Content-Transfer-Encoding"] == "8bit"


def test_should_bounce_normal_sender() -> None:
    """A failure of an ordinary message is reported to its sender."""
    assert should_bounce("app@example.com", is_bounce=False)


def test_should_not_bounce_null_sender() -> None:
    """Mail from the null sender is never bounced."""
    assert not should_bounce("", is_bounce=False)
    assert not should_bounce("<>", is_bounce=False)


def test_should_not_bounce_a_bounce() -> None:
    """A bounce that fails is never bounced again."""
    assert not should_bounce("app@example.com", is_bounce=True)


@given(st.text())
def test_clean_field_is_one_printable_ascii_line(text: str) -> None:
    """Any text is reduced to printable ASCII with no CR, LF or control character."""
    cleaned = clean_field(text)
    assert all(0x20 <= ord(c) < 0x7F for c in cleaned)
    assert len(cleaned) <= 900


@given(diagnostic=st.text(), mta=st.text(max_size=50), recipient=st.text(min_size=1))
def test_any_remote_text_keeps_the_structure(diagnostic: str, mta: str, recipient: str) -> None:
    """Whatever the remote says, the report parses into the same three-part structure."""
    raw = build(failures=[Failure(recipient, "5.0.0", diagnostic, mta or None)])
    assert raw.isascii()
    msg = parse(raw)
    assert len(parts(msg)) == 3
    blocks = status_blocks(msg)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
