"""Accounts bound to source networks: attributed without AUTH, most specific wins."""

from __future__ import annotations

import aiosmtplib
import pytest

from tests.conftest import RelayHandle, Sink, message


async def test_bound_network_sends_without_auth(relay: RelayHandle, sink: Sink) -> None:
    """An unauthenticated session from a bound network is that account's."""
    await relay.ctl.add_domain("example.com")
    user, _ = await relay.ctl.add_user("example.com", ["127.0.0.0/8"])
    client = await relay.client()
    _, reply = await client.sendmail("app@example.com", ["r@dest.test"], message())
    await client.quit()
    assert reply.startswith("2.0.0 Ok: queued as")
    await sink.wait_for(1)
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert info["last_connection"] is not None


async def test_most_specific_network_wins(relay: RelayHandle) -> None:
    """With nested bindings, the longest prefix decides the account (and its domain)."""
    await relay.ctl.add_domain("wide.example")
    await relay.ctl.add_domain("narrow.example")
    await relay.ctl.add_user("wide.example", ["127.0.0.0/8"])
    await relay.ctl.add_user("narrow.example", ["127.0.0.1/32"])
    client = await relay.client()
    _, reply = await client.sendmail("a@narrow.example", ["r@dest.test"], message())
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
