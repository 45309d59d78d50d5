"""The header From check over real SMTP and the real control socket (SEMANTICS §2, §3, §6):
refusals at the end of DATA, the null reverse-path, the per-domain switch through relayctl,
and the rejection metric."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.rawsmtp import Raw
from tests.test_ops_support import scrape, value
from tests.test_relayctl import relayctl

pytestmark = pytest.mark.timeout(60)

FOREIGN = "550 5.7.1 From header address not allowed for this account"
NO_FROM = "550 5.6.0 Message has no From header"


async def _session(relay: RelayHandle, account: tuple[str, str]) -> Raw:
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    return raw


async def test_foreign_and_missing_from_are_refused_and_counted(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """A From outside the domain: 550 5.7.1; a Sender outside it too; no From: 550 5.6.0.
    The session goes on; each refusal is counted under its reason; nothing is relayed."""
    raw = await _session(relay, account)
    spoof = message("spoof", sender="ceo@bank.example")
    assert await raw.transaction("app@example.com", ["r@dest.test"], spoof) == FOREIGN
    sender = message("sender").replace(b"To:", b"Sender: ceo@bank.example\r\nTo:")
    assert await raw.transaction("app@example.com", ["r@dest.test"], sender) == FOREIGN
    quoted = message("quoted", sender='"app@example.com" <ceo@bank.example>')
    assert await raw.transaction("app@example.com", ["r@dest.test"], quoted) == FOREIGN
    bare = b"To: r@dest.test\r\nSubject: no from\r\n\r\nbody"
    assert await raw.transaction("app@example.com", ["r@dest.test"], bare) == NO_FROM
    ok = message("ok", sender="App <app@mail.example.com>")
    assert (await raw.transaction("app@example.com", ["ok@dest.test"], ok)).startswith(
        "250 2.0.0 Ok: queued as ")
    await raw.quit()
    [got] = await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert [m.rcpt_tos for m in sink.messages] == [["ok@dest.test"]]
    assert b"DKIM-Signature:" in got.data
    samples = await scrape(relay.metrics_url)
    assert value(samples, "relayd_smtp_rejections_total",
                 reason="header_from_not_allowed") == 3
    assert value(samples, "relayd_smtp_rejections_total", reason="no_header_from") == 1


async def test_null_reverse_path_needs_a_matching_from(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """MAIL FROM:<> (an application's own bounce) is accepted from an account; its header
    From must still be in the domain."""
    raw = await _session(relay, account)
    bounce = message("bounce", sender="MAILER-DAEMON@example.com")
    assert (await raw.transaction("", ["r@dest.test"], bounce)).startswith("250 2.0.0 ")
    spoof = message("spoof", sender="MAILER-DAEMON@bank.example")
    assert await raw.transaction("", ["r@dest.test"], spoof) == FOREIGN
    await raw.quit()
    [got] = await sink.wait_for(1)
    assert got.mail_from in ("", "<>") and got.rcpt_tos == ["r@dest.test"]


async def test_null_reverse_path_needs_an_account(relay: RelayHandle) -> None:
    """Without authentication MAIL FROM:<> is refused like any MAIL."""
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.cmd("EHLO client.test")).startswith("250")
    assert await raw.cmd("MAIL FROM:<>") == "530 5.7.0 Authentication required"
    raw.close()


async def test_switch_off_through_relayctl(relay: RelayHandle, sink: Sink,
                                           account: tuple[str, str]) -> None:
    """`domain set --check-header-from off`: a foreign From is accepted and signed with
    the domain's key; `domain show` says so; on again: refused again, in a session
    that was open all along."""
    sock = relay.ctl.path
    rc, out, err = await relayctl(sock, "domain", "show", "example.com")
    assert rc == 0, err
    assert "header From check: on" in out
    raw = await _session(relay, account)
    brand = message("brand", sender="news@brand.example")
    assert await raw.transaction("app@example.com", ["r@dest.test"], brand) == FOREIGN

    rc, out, err = await relayctl(sock, "domain", "set", "example.com",
                                  "--check-header-from", "off")
    assert rc == 0, err
    assert "header From check: off" in out
    rc, out, err = await relayctl(sock, "--json", "domain", "show", "example.com")
    assert rc == 0 and json.loads(out)["check_header_from"] is False
    assert (await raw.transaction("app@example.com", ["r@dest.test"], brand)).startswith(
        "250 2.0.0 ")
    [got] = await sink.wait_for(1)
    assert b"From: news@brand.example" in got.data
    assert b"DKIM-Signature:" in got.data and b"d=example.com" in got.data

    rc, out, err = await relayctl(sock, "--json", "domain", "set", "example.com",
                                  "--check-header-from", "on")
    assert rc == 0 and json.loads(out)["check_header_from"] is True
    assert await raw.transaction("app@example.com", ["r@dest.test"], brand) == FOREIGN
    await raw.quit()


async def test_switch_survives_a_restart_and_needs_a_domain(
        relay_factory: RelayFactory, sink: Sink, tmp_path: Path) -> None:
    """The switch is stored with the domain: after a restart it is still off. An unknown
    domain is a 404; a set without a setting is a usage error."""
    base = tmp_path / "node"
    base.mkdir()
    relay = await relay_factory(data=base)
    await relay.ctl.add_domain("example.com")
    await relay.ctl.ok("POST", "/v1/domains/example.com/settings", {"check_header_from": False})
    status, body = await relay.ctl.call("POST", "/v1/domains/nope.example/settings",
                                        {"check_header_from": False})
    assert status == 404 and body["code"] == "not_found"
    status, body = await relay.ctl.call("POST", "/v1/domains/example.com/settings",
                                        {"check_header_from": "no"})
    assert status == 400
    rc, _, err = await relayctl(relay.ctl.path, "domain", "set", "example.com")
    assert rc != 0 and "--check-header-from" in err
    await relay.stop()
    again = await relay_factory(data=base)
    shown = await again.ctl.ok("GET", "/v1/domains/example.com")
    assert shown["check_header_from"] is False
    listed = await again.ctl.ok("GET", "/v1/domains")
    assert [d["check_header_from"] for d in listed["domains"]] == [False]
