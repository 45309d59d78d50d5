"""Bad input over a real socket: smuggling, over-long lines, oversize data, bad envelopes
and handler faults each get the exact reply of SEMANTICS.md §6, and nothing is forwarded."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relayd.smtp.server import RelaySMTP
from relayd.smtp.session import Framer
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.rawsmtp import Raw

pytestmark = pytest.mark.timeout(60)

BAD_ENDING = "550 5.5.2 Bare CR, bare LF or NUL in message data not allowed"
SMUGGLED = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")


async def _in_transaction(relay: RelayHandle, account: tuple[str, str],
                          rcpts: tuple[str, ...] = ("rcpt@dest.test",)) -> Raw:
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    for r in rcpts:
        assert await raw.cmd(f"RCPT TO:<{r}>") == "250 2.1.5 Ok"
    assert await raw.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    return raw


async def _only_legit_arrives(raw: Raw, sink: Sink) -> None:
    """Send one good message on the same session; the sink must get exactly that one."""
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<legit@dest.test>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    assert (await raw.cmd(message("legit") + b".")).startswith("250 2.0.0 Ok: queued as ")
    await raw.cmd("QUIT")
    got = await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert [m.rcpt_tos for m in got] == [["legit@dest.test"]]
    assert b"smuggled" not in got[0].data


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n"],
                         ids=["LF.LF", "LF.CRLF", "CR.CR", "CRLF.LF", "CR.CRLF"])
async def test_smuggling_terminators_are_refused(relay: RelayHandle, sink: Sink,
                                                 account: tuple[str, str],
                                                 fake_end: bytes) -> None:
    """A fake end of data with bare CR/LF gets 550 5.5.2 and the commands after it never run."""
    raw = await _in_transaction(relay, account)
    await raw.send(b"Subject: hi\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\n")
    assert await raw.reply() == BAD_ENDING
    assert await raw.pending() == b""  # no reply to the smuggled MAIL, RCPT or DATA
    await _only_legit_arrives(raw, sink)


async def test_nul_byte_in_data_is_refused(relay: RelayHandle, sink: Sink,
                                           account: tuple[str, str]) -> None:
    """A NUL byte anywhere in the message data gets 550 5.5.2 and is not forwarded."""
    raw = await _in_transaction(relay, account)
    await raw.send(b"Subject: smuggled\r\n\r\nbo\0dy\r\n.\r\n")
    assert await raw.reply() == BAD_ENDING
    await _only_legit_arrives(raw, sink)


async def test_empty_message_sent_after_354(relay: RelayHandle, sink: Sink,
                                            account: tuple[str, str]) -> None:
    """A lone "." as the first line of data, sent after the 354, ends an empty message
    (accepted where the header From check is off: an empty message has no From)."""
    await relay.ctl.ok("POST", "/v1/domains/example.com/settings", {"check_header_from": False})
    raw = await _in_transaction(relay, account)
    reply = await raw.cmd(".")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    raw.close()


async def test_data_line_over_1000_octets_is_refused(relay: RelayHandle, sink: Sink,
                                                     account: tuple[str, str]) -> None:
    """A data line of 1001 octets with its CRLF gets 500 5.5.2; 1000 octets is accepted."""
    raw = await _in_transaction(relay, account)
    await raw.send(b"Subject: smuggled\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n")
    assert await raw.reply() == "500 5.5.2 Line too long"
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<legit@dest.test>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    # 998 octets + CRLF, dot-stuffed (the transparency dot does not count).
    body = b"From: app@example.com\r\nSubject: legit\r\n\r\n." + b"." * 997 + b"y\r\n.\r\n"
    assert (await raw.cmd(body[:-2])).startswith("250 2.0.0 Ok: queued as ")
    [got] = await sink.wait_for(1)
    assert got.data.endswith(b"\r\n\r\n" + b"." * 997 + b"y\r\n")


async def test_command_over_512_octets_is_refused(relay: RelayHandle) -> None:
    """A command line of 513 octets gets 500 5.5.2; one of 512 octets is answered normally."""
    raw = await Raw.open(relay.host, relay.port)
    assert await raw.cmd("NOOP " + "x" * 506) == "500 5.5.2 Command line too long"
    assert await raw.cmd("NOOP " + "x" * 505) == "250 2.0.0 Ok"
    raw.close()


async def test_mail_line_may_use_the_extension_allowance(relay: RelayHandle,
                                                        account: tuple[str, str]) -> None:
    """MAIL may exceed 512 octets (up to 2048: SIZE, AUTH= parameters); past that, 500 5.5.2."""
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    auth = "AUTH=<" + "a" * 480 + "@example.com>"
    line = f"MAIL FROM:<app@example.com> SIZE=1000 BODY=8BITMIME {auth}"
    assert 512 < len(line) + 2 <= 2048
    assert await raw.cmd(line) == "250 2.1.0 Ok"
    assert await raw.cmd("RSET") == "250 2.0.0 Ok"
    long_line = "MAIL FROM:<app@example.com> " + "AUTH=<" + "a" * 2100 + ">"
    assert await raw.cmd(long_line) == "500 5.5.2 Command line too long"
    raw.close()


async def test_huge_command_line_is_discarded_without_buffering(relay: RelayHandle) -> None:
    """A 1 MB line without LF gets one 500 5.5.2, and the session goes on."""
    raw = await Raw.open(relay.host, relay.port)
    for _ in range(16):
        await raw.send(b"X" * 65536)
    assert await raw.cmd("") == "500 5.5.2 Command line too long"
    assert await raw.cmd("NOOP") == "250 2.0.0 Ok"
    assert max(s.session.buffered for s in relay.relay.ctx.sessions) < 65536
    raw.close()


async def test_declared_size_over_limit_gets_552(relay_factory: RelayFactory) -> None:
    """MAIL with SIZE above max_message_size_bytes gets 552 5.3.4."""
    relay = await relay_factory({"smtp": {"max_message_size_bytes": 100000}})
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<app@example.com> SIZE=100001") == \
        "552 5.3.4 Message size exceeds fixed maximum"
    assert await raw.cmd("MAIL FROM:<app@example.com> SIZE=100000") == "250 2.1.0 Ok"
    raw.close()


async def test_oversize_data_is_discarded_while_reading(relay_factory: RelayFactory,
                                                        sink: Sink,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """5 MB of data against a 100 kB limit gets 552 5.3.4 and is never held in memory whole."""
    relay = await relay_factory({"smtp": {"max_message_size_bytes": 100000}})
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    peak = 0
    received = RelaySMTP.data_received

    def watched(self: RelaySMTP, data: bytes) -> None:
        nonlocal peak
        received(self, data)
        peak = max(peak, self.session.buffered)

    monkeypatch.setattr(RelaySMTP, "data_received", watched)
    raw = await _in_transaction(relay, account)
    line = b"y" * 78 + b"\r\n"
    chunk = line * (65536 // len(line))
    for _ in range(5 * 1024 * 1024 // len(chunk)):
        await raw.send(chunk)
    await raw.send(b".\r\n")
    assert await raw.reply(20) == "552 5.3.4 Message size exceeds fixed maximum"
    assert peak < 100000 + 2 * 65536, peak
    assert await raw.cmd("NOOP") == "250 2.0.0 Ok"
    raw.close()
    await asyncio.sleep(0.3)
    assert sink.messages == []


async def test_too_many_recipients_gets_452(relay_factory: RelayFactory, sink: Sink) -> None:
    """The recipient past max_recipients gets 452 4.5.3; the message goes to the others."""
    relay = await relay_factory({"smtp": {"max_recipients": 3}})
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    for r in ("a", "b", "c"):
        assert await raw.cmd(f"RCPT TO:<{r}@dest.test>") == "250 2.1.5 Ok"
    assert await raw.cmd("RCPT TO:<d@dest.test>") == "452 4.5.3 Too many recipients"
    assert (await raw.cmd("DATA")).startswith("354 ")
    assert (await raw.cmd(message() + b".")).startswith("250 2.0.0 Ok: queued as ")
    [got] = await sink.wait_for(1)
    assert sorted(got.rcpt_tos) == ["a@dest.test", "b@dest.test", "c@dest.test"]
    raw.close()


async def test_non_ascii_address_without_smtputf8_gets_553(relay: RelayHandle,
                                                          account: tuple[str, str]) -> None:
    """A non-ASCII recipient or sender without the SMTPUTF8 parameter gets 553 5.6.7."""
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<jos\u00e9@example.com>") == \
        "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<jos\u00e9@dest.test>") == \
        "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    raw.close()


async def test_smtputf8_addresses_arrive_end_to_end(relay: RelayHandle, sink: Sink,
                                                    account: tuple[str, str]) -> None:
    """With SMTPUTF8, non-ASCII sender and recipient are accepted and delivered unchanged."""
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<jos\u00e9@example.com> SMTPUTF8") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<\u00fc\u00f1\u00ee@d\u00e9st.test>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    body = ("From: Jos\u00e9 <jos\u00e9@example.com>\r\nSubject: caf\u00e9\r\n\r\n"
            "Cr\u00e8me br\u00fbl\u00e9e.\r\n.").encode()
    assert (await raw.cmd(body)).startswith("250 2.0.0 Ok: queued as ")
    [got] = await sink.wait_for(1)
    assert got.mail_from == "jos\u00e9@example.com"
    assert got.rcpt_tos == ["\u00fc\u00f1\u00ee@d\u00e9st.test"]
    assert got.data.endswith("Cr\u00e8me br\u00fbl\u00e9e.\r\n".encode())
    raw.close()


async def test_utf8_sender_of_an_idn_account_domain(relay: RelayHandle, sink: Sink) -> None:
    """An account of ``xn--bcher-kva.example`` may send as ``app@bücher.example`` (the
    U-label form of its domain) in the envelope and in the header From; a look-alike
    ``bucher.example`` is still refused."""
    await relay.ctl.add_domain("xn--bcher-kva.example")
    user, password = await relay.ctl.add_user("xn--bcher-kva.example")
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(user, password)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<app@bucher.example>") == \
        "553 5.7.1 Sender address not allowed for this account"
    assert await raw.cmd("MAIL FROM:<app@b\u00fccher.example> SMTPUTF8") == "250 2.1.0 Ok"
    assert await raw.cmd("RCPT TO:<r@dest.test>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    body = "From: <app@b\u00fccher.example>\r\nSubject: idn\r\n\r\nhi\r\n.".encode()
    assert (await raw.cmd(body)).startswith("250 2.0.0 Ok: queued as ")
    [got] = await sink.wait_for(1)
    assert got.mail_from == "app@b\u00fccher.example"
    raw.close()


@pytest.mark.parametrize(("command", "reply"), [
    ("MAIL FROM:<app@>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<app@example..com>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:app@example.com", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<app@example.com> SIZE=12x", "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"),
    ("MAIL FROM:<app@example.com> FOO=1", "555 5.5.4 Unsupported MAIL or RCPT parameter"),
    ("MAIL TO:<app@example.com>", "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"),
])
async def test_malformed_sender_gets_the_syntax_reply(relay: RelayHandle,
                                                      account: tuple[str, str],
                                                      command: str, reply: str) -> None:
    """A malformed MAIL command gets the RFC 5321 / RFC 3463 syntax reply."""
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd(command) == reply
    raw.close()


@pytest.mark.parametrize(("command", "reply"), [
    ("RCPT TO:<@dest.test>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<a b@dest.test>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<a@dest.test", "501 5.1.3 Bad recipient address syntax"),
])
async def test_malformed_recipient_gets_the_syntax_reply(relay: RelayHandle,
                                                         account: tuple[str, str],
                                                         command: str, reply: str) -> None:
    """A malformed RCPT command gets the RFC 5321 / RFC 3463 syntax reply."""
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd(command) == reply
    raw.close()


async def test_handler_fault_at_mail_gets_451_without_detail(
        relay: RelayHandle, account: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside a command handler becomes 451 4.3.0 with no detail, and the
    session goes on."""
    def boom(account_id: int) -> int:
        raise RuntimeError("secret detail /var/lib/relayd")

    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    monkeypatch.setattr(relay.relay.scheduler, "queued_count", boom)
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "451 4.3.0 Local error in processing"
    monkeypatch.undo()
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    raw.close()


async def test_spool_fault_at_end_of_data_gets_451_never_250(
        relay: RelayHandle, sink: Sink, account: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When the spool raises at commit, end of DATA gets 451 4.3.0, never 250, and nothing
    is delivered."""
    async def fail(msg: Any) -> None:
        raise OSError(28, "No space left on device: /var/lib/relayd/relayd.sqlite3")

    monkeypatch.setattr(relay.relay.spool, "accept", fail)
    raw = await _in_transaction(relay, account)
    assert await raw.cmd(message() + b".") == "451 4.3.0 Local error in processing"
    assert await raw.cmd("NOOP") == "250 2.0.0 Ok"
    raw.close()
    await asyncio.sleep(0.3)
    assert sink.messages == []


async def test_session_fault_outside_a_handler_gets_421(
        relay: RelayHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault in the command loop itself gets 421 4.3.0 and a close, never a trace or a
    silent hang."""
    def broken(self: Framer, limit: int) -> bytes | None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(Framer, "readline", broken)
    raw = await Raw.open(relay.host, relay.port)
    assert raw.greeting == "220 relay.test ESMTP relayd"
    assert await raw.reply() == "421 4.3.0 Local error in processing, closing connection"
    assert await raw.closed_by_server()


def test_long_line_check_matches_a_line_split() -> None:
    """policy.has_long_line agrees with a plain split on lines around the 998-octet limit."""
    import random

    from relayd.smtp.policy import has_long_line

    def reference(d: bytes) -> bool:
        return any(len(x) > 998 and not (len(x) == 999 and x[:1] == b".")
                   for x in d.split(b"\r\n"))

    rng = random.Random(7)
    for _ in range(2000):
        lines = [(b"." if rng.random() < 0.3 else b"") +
                 b"x" * rng.choice([0, 1, 997, 998, 999, 1000, 2000, 50])
                 for _ in range(rng.randint(0, 6))]
        data = b"\r\n".join(lines) + (b"\r\n" if rng.random() < 0.8 else b"")
        assert has_long_line(data) == reference(data), [len(x) for x in lines]
    # Long mail of short lines with one line near the limit somewhere (the strided scan).
    for _ in range(3000):
        lines = [b"y" * rng.randint(0, 120) for _ in range(rng.randint(0, 60))]
        if lines and rng.random() < 0.7:
            at = rng.randrange(len(lines))
            lines[at] = (b"." if rng.random() < 0.5 else b"") + b"z" * rng.choice(
                [996, 997, 998, 999, 1000, 1001, 1500])
        data = b"\r\n".join(lines) + (b"\r\n" if rng.random() < 0.8 else b"")
        assert has_long_line(data) == reference(data), [len(x) for x in lines]
