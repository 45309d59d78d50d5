"""Micro-benchmarks: the header From check at the end of DATA (relayd.smtp.headerfrom).

It runs once per message on the event loop. Cases, each ``policy.header_from_allowed``
as relayd.smtp.server calls it (the data preceded by the session's CRLF), on a
message of about 1 KB of body:

- typical: an application's header section (10 fields, ``From: App <app@example.com>``);
- long_header: 40 fields of 80 octets, From last (the scan for the two fields dominates);
- display_names: a From with three mailboxes, quoted display names, a comment and an
  encoded word, plus a Sender (the tokenizer dominates);
- big_body: the typical header section before a 1 MB body (the body is never scanned
  past the first empty line);
- email_parser: the stdlib ``email`` parse of the typical message's headers and its
  From's addresses, for comparison (what the check does not do).

Run: .venv/bin/pytest bench/micro/test_bench_headerfrom.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

from email import policy as email_policy
from email.parser import BytesHeaderParser

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from relayd.directory.accounts import Account, Domain
from relayd.smtp import policy

ACCOUNT = Account(1, "u", Domain(1, "example.com", "s1"), "h")
BODY = b"Hello, this is the body of the message.\r\n" * 25

TYPICAL = (b"\r\nReturn-Path: <app@example.com>\r\nDate: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
           b"From: App <app@example.com>\r\nTo: Someone <someone@dest.test>\r\n"
           b"Subject: Your invoice 42 is ready\r\nMessage-ID: <42.x@example.com>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 7bit\r\nX-Mailer: app 1.0\r\n\r\n") + BODY
LONG = (b"\r\n" + b"".join(b"X-Field-%02d: " % i + b"v" * 66 + b"\r\n" for i in range(40))
        + b"From: app@example.com\r\n\r\n" + BODY)
NAMES = (b"\r\nFrom: \"Doe, John (Billing)\" <john@example.com>, =?utf-8?q?J=C3=B6rg?=\r\n"
         b" <jorg@mail.example.com>, support@example.com (Support <desk>)\r\n"
         b"Sender: \"The App\" <app@example.com>\r\nSubject: x\r\n\r\n") + BODY
BIG = TYPICAL + b"x" * 78 + b"\r\n" * (1024 * 1024 // 80)


@pytest.mark.benchmark(group="header-from")
@pytest.mark.parametrize("data", [TYPICAL, LONG, NAMES, BIG],
                         ids=["typical", "long_header", "display_names", "big_body"])
def test_header_from_check(benchmark: BenchmarkFixture, data: bytes) -> None:
    """policy.header_from_allowed on message data as the session hands it over."""
    buf = bytearray(data)
    assert benchmark(policy.header_from_allowed, ACCOUNT, buf, 2) is None


@pytest.mark.benchmark(group="header-from")
def test_email_parser_for_comparison(benchmark: BenchmarkFixture) -> None:
    """The stdlib: parse the header section, then the From's addresses."""
    parser = BytesHeaderParser(policy=email_policy.default)

    def parse() -> list[str]:
        msg = parser.parsebytes(TYPICAL[2:])
        return [a.domain for a in msg["From"].addresses]
    assert benchmark(parse) == ["example.com"]
