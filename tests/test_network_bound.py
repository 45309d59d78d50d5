"""Accounts bound to source networks: attributed without AUTH, most specific wins."""

from __future__ import annotations

import sqlite3

import aiosmtplib
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message


async def test_bound_network_sends_without_auth(relay: RelayHandle, sink: Sink) -> None:
    """An unauthenticated session from a bound network is that account's."""
    await relay.ctl.add_domain("example.com")
    user, _ = await relay.ctl.add_user("example.com", ["127.0.0.0/24"])
    client = await relay.client()
    _, reply = await client.sendmail("app@example.com", ["r@dest.test"], message())
    await client.quit()
    assert reply.startswith("2.0.0 Ok: queued as")
    await sink.wait_for(1)
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert info["last_connection"] is not None


async def test_most_specific_network_wins(relay_factory: RelayFactory) -> None:
    """With nested bindings (stored by an older version: overlaps are refused now), the
    longest prefix decides the account (and its domain)."""
    relay = await relay_factory()
    await relay.ctl.add_domain("wide.example")
    await relay.ctl.add_domain("narrow.example")
    wide, _ = await relay.ctl.add_user("wide.example")
    narrow, _ = await relay.ctl.add_user("narrow.example")
    await relay.stop()
    db = sqlite3.connect(relay.data_dir / "relayd.sqlite3")
    with db:
        db.executemany("INSERT INTO account_networks(account_id, cidr)"
                       " SELECT id, ? FROM accounts WHERE username=?",
                       [("127.0.0.0/8", wide), ("127.0.0.1/32", narrow)])
    db.close()
    relay = await relay_factory()
    client = await relay.client()
    _, reply = await client.sendmail("a@narrow.example", ["r@dest.test"],
                                     message(sender="a@narrow.example"))
    assert reply.startswith("2.0.0")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await client.sendmail("a@wide.example", ["r@dest.test"], message())
    assert info.value.code == 553
    await client.quit()


async def test_bound_account_still_checks_the_sender(relay: RelayHandle) -> None:
    """A network-bound session may only use its account's domain."""
    await relay.ctl.add_domain("example.com")
    await relay.ctl.add_user("example.com", ["127.0.0.1/32"])
    client = await relay.client()
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await client.sendmail("a@elsewhere.example", ["r@dest.test"], message())
    assert info.value.code == 553
    await client.quit()
