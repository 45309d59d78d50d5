"""Micro-benchmark: relayd.smtp.address against aiosmtpd's stock MAIL argument parsing.

aiosmtpd 1.4.6 handles ``MAIL FROM:`` with ``SMTP._strip_command_keyword``,
``SMTP._getaddr`` (``email._header_value_parser.get_angle_addr``) and
``SMTP._getparams``; the "aiosmtpd" cases call exactly those methods. The
"raw" case times ``get_angle_addr`` alone, the floor of the stock path.

Run: ``pytest bench/micro/test_bench_address.py --benchmark-enable``
"""

from __future__ import annotations

from email._header_value_parser import get_angle_addr
from types import SimpleNamespace
from typing import cast

import pytest
from aiosmtpd.smtp import SMTP
from pytest_benchmark.fixture import BenchmarkFixture

from relayd.smtp.address import parse_mail_from, parse_rcpt_to

COMMON = "FROM:<user@example.com>"
WITH_PARAMS = "FROM:<user.name@mail.example.com> SIZE=12345 BODY=8BITMIME"
QUOTED = 'FROM:<"john doe"@[192.0.2.1]>'

# The methods used below read nothing from self but local_part_limit.
_stub = cast(SMTP, SimpleNamespace(local_part_limit=0))


def _aiosmtpd_mail(arg: str) -> tuple[str | None, object]:
    """aiosmtpd's smtp_MAIL argument handling, minus the I/O."""
    rest = SMTP._strip_command_keyword(_stub, "FROM:", arg)
    assert rest is not None
    address, addrparams = SMTP._getaddr(_stub, rest)
    assert address is not None and addrparams is not None
    params = SMTP._getparams(_stub, addrparams.upper().split())
    return address, params


@pytest.mark.benchmark(group="mail-common")
def test_relayd_common(benchmark: BenchmarkFixture) -> None:
    """relayd: FROM:<user@example.com> (fast path)."""
    assert benchmark(parse_mail_from, COMMON, smtputf8_offered=True).address == "user@example.com"


@pytest.mark.benchmark(group="mail-common")
def test_aiosmtpd_common(benchmark: BenchmarkFixture) -> None:
    """aiosmtpd: FROM:<user@example.com>."""
    assert benchmark(_aiosmtpd_mail, COMMON)[0] == "user@example.com"


@pytest.mark.benchmark(group="mail-common")
def test_raw_get_angle_addr_common(benchmark: BenchmarkFixture) -> None:
    """email._header_value_parser.get_angle_addr alone on <user@example.com>."""
    addr, _ = benchmark(get_angle_addr, "<user@example.com>")
    assert addr.addr_spec == "user@example.com"


@pytest.mark.benchmark(group="mail-params")
def test_relayd_params(benchmark: BenchmarkFixture) -> None:
    """relayd: a sender with SIZE and BODY (fast path plus parameter checks)."""
    path = benchmark(parse_mail_from, WITH_PARAMS, smtputf8_offered=True)
    assert path.params == {"SIZE": "12345", "BODY": "8BITMIME"}


@pytest.mark.benchmark(group="mail-params")
def test_aiosmtpd_params(benchmark: BenchmarkFixture) -> None:
    """aiosmtpd: a sender with SIZE and BODY."""
    assert benchmark(_aiosmtpd_mail, WITH_PARAMS)[0] == "user.name@mail.example.com"


@pytest.mark.benchmark(group="mail-quoted")
def test_relayd_quoted(benchmark: BenchmarkFixture) -> None:
    """relayd: quoted local part at an address literal (full parser)."""
    path = benchmark(parse_mail_from, QUOTED, smtputf8_offered=True)
    assert path.address == '"john doe"@[192.0.2.1]'


@pytest.mark.benchmark(group="mail-quoted")
def test_aiosmtpd_quoted(benchmark: BenchmarkFixture) -> None:
    """aiosmtpd: quoted local part at an address literal."""
    assert benchmark(_aiosmtpd_mail, QUOTED)[0] is not None


@pytest.mark.benchmark(group="rcpt-common")
def test_relayd_rcpt_common(benchmark: BenchmarkFixture) -> None:
    """relayd: TO:<user@example.com> (fast path)."""
    path = benchmark(parse_rcpt_to, "TO:<user@example.com>", smtputf8=False)
    assert path.domain == "example.com"
