"""Bounce diagnostics (issue 17 item 6, bounces): a DSN for a failure no remote server
answered (NXDOMAIN, no address, null MX, refused destination, expiry) carries relayd's own
diagnostic type and Postfix's status codes; a remote server's reply keeps ``smtp;``.
End to end in MX mode over loopback (the tests' DNS server, the sink as every MX), plus
the rule itself on results."""

from __future__ import annotations

import asyncio
import email
import email.message
from collections.abc import AsyncIterator

import pytest

from relayd.delivery import dsn
from relayd.queue.backoff import GAVE_UP
from relayd.queue.bounces import failure_of
from relayd.store.spool import AttemptResult
from tests import test_delivery_routing as routing
from tests.conftest import Received, Sink
from tests.dnsserver import DnsServer
from tests.test_delivery_routing import ZONE, MxRelay
from tests.test_queue_support import log_entries, submit

mx_relay = routing.mx_relay  # the routing tests' relay in MX mode (uses ``dns`` below)

DSN_ZONE = {
    **ZONE,
    "noaddr.test": {"MX": ["10 gone.noaddr.test."]},  # the MX host has no address
    "private.test": {"MX": ["10 mx.private.test."]},
    "mx.private.test": {"A": ["10.1.2.3"]},  # not in mx_allowed_networks: refused
    "flaky.test": {"MX": ["10 mx1.dest.test."]},  # SERVFAIL while the test says so
}


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    """A DNS server on loopback answering from DSN_ZONE (overrides the routing tests')."""
    async with DnsServer(dict(DSN_ZONE)) as server:
        yield server


def report(got: Received) -> dict[str, str]:
    """The per-recipient block of a DSN with one failed recipient."""
    msg = email.message_from_bytes(got.data)
    [status] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    payload = status.get_payload()
    assert isinstance(payload, list) and len(payload) == 2, payload
    block = payload[1]
    assert isinstance(block, email.message.Message)
    return {k: str(v) for k, v in block.items()}


async def bounce_for(relay_start: MxRelay, sink: Sink, rcpt: str) -> dict[str, str]:
    relay = await relay_start()
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, [rcpt], sender="app@example.com")
    [got] = await sink.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["app@example.com"] and got.mail_from in ("", "<>")
    return report(got)


@pytest.mark.parametrize(("rcpt", "status", "words"), [
    ("r@nowhere.test", "5.4.4", "NXDOMAIN"),
    ("r@noaddr.test", "5.4.4", "no address records"),
    ("r@null.test", "5.1.10", "null MX"),
    ("r@private.test", "5.4.4", "10.1.2.3"),
])
async def test_relayds_own_verdicts_are_not_smtp_diagnostics(
        mx_relay: MxRelay, sink: Sink, rcpt: str, status: str, words: str) -> None:
    block = await bounce_for(mx_relay, sink, rcpt)
    assert block["Status"] == status
    diagnostic = block["Diagnostic-Code"]
    assert diagnostic.startswith(f"X-Relayd; {status} "), diagnostic
    assert words in diagnostic and "smtp;" not in diagnostic
    assert "Remote-MTA" not in block  # no remote server was talked to


async def test_a_remote_refusal_keeps_its_smtp_diagnostic(mx_relay: MxRelay, sink: Sink) -> None:
    sink.rcpt_script["r@dest.test"] = "550 5.1.1 no such user here"
    block = await bounce_for(mx_relay, sink, "r@dest.test")
    assert block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user here"
    assert block["Remote-MTA"] == "dns; mx1.dest.test"  # a host name (RFC 3464), as Postfix


def test_remote_mta_is_a_host_name_or_an_address_literal() -> None:
    assert dsn.remote_mta_name("mx1.example[192.0.2.1]:25") == "mx1.example"
    assert dsn.remote_mta_name("mx1.example[2001:db8::1]:25") == "mx1.example"
    assert dsn.remote_mta_name("192.0.2.1:2525") == "[192.0.2.1]"
    assert dsn.remote_mta_name("[2001:db8::1]:25") == "[2001:db8::1]"
    assert dsn.remote_mta_name("mx.remote.test") == "mx.remote.test"


async def test_expiry_is_relayds_own_verdict_with_4_4_7(mx_relay: MxRelay, sink: Sink,
                                                       dns: DnsServer) -> None:
    """A recipient deferred (SERVFAIL) past the queue lifetime fails with 4.4.7, reported
    as relayd's own verdict."""
    dns.servfail.add("flaky.test")
    relay = await mx_relay({"delivery": {"max_queue_lifetime_seconds": 0.2}})
    account = await relay.ctl.add_user("example.com")
    await submit(relay, account, ["r@flaky.test"], sender="app@example.com")
    for _ in range(100):  # the first attempt may come before or after the lifetime ends
        entries = [e for e in await log_entries(relay) if e["recipient"] == "r@flaky.test"]
        if any(e["outcome"] == "failed" for e in entries):
            break
        if entries:
            await asyncio.sleep(0.3)
            await relay.ctl.ok("POST", "/v1/queue/retry", {})
        await asyncio.sleep(0.1)
    [got] = await sink.wait_for(1, timeout=20)
    block = report(got)
    assert block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"].startswith("X-Relayd; 4.4.7 ")
    assert "queue lifetime exceeded" in block["Diagnostic-Code"]


def _result(hop: str, code: int | None, text: str) -> AttemptResult:
    return AttemptResult(message_id=1, idx=0, recipient="r@x.test", username="u",
                         domain="example.com", next_hop=hop, code=code, text=text,
                         outcome="failed", ts=0.0, next_attempt=None)


def test_the_diagnostic_type_follows_who_answered() -> None:
    remote = failure_of(_result("mx.x.test[192.0.2.1]:25", 550, "5.7.1 rejected"))
    assert (remote.diagnostic_type, remote.diagnostic, remote.status) == (
        "smtp", "550 5.7.1 rejected", "5.7.1")
    route = failure_of(_result("-", 556, "5.1.10 domain does not accept mail (null MX)"))
    assert route.diagnostic_type == dsn.OWN_DIAGNOSTIC and route.remote_mta is None
    assert route.diagnostic == "5.1.10 domain does not accept mail (null MX)"
    # A remote 451 until the lifetime ran out: the failure is relayd's giving up.
    expired = failure_of(_result("192.0.2.1:25", 451, f"4.4.7 4.7.1 try later {GAVE_UP}"))
    assert expired.diagnostic_type == dsn.OWN_DIAGNOSTIC and expired.status == "4.4.7"
    assert expired.remote_mta == "192.0.2.1:25"
    out = dsn.build_dsn(reporting_mta="relay.test", postmaster="postmaster@relay.test",
                        original_sender="a@b.test", original_message_id="1",
                        original_headers=b"Subject: x\r\n", failures=[remote, route],
                        now=0.0, dsn_message_id="d@relay.test")
    assert b"Diagnostic-Code: smtp; 550 5.7.1 rejected\r\n" in out
    assert b"Diagnostic-Code: X-Relayd; 5.1.10 domain does not accept mail" in out
