"""End to end: an authenticated client submits over loopback; the message reaches
the receiving server with envelope and body intact, DKIM-signed, and is logged."""

from __future__ import annotations

import aiosmtplib

from tests.conftest import RelayHandle, Sink, message


async def test_authenticated_message_arrives_intact(relay: RelayHandle, sink: Sink,
                                                    account: tuple[str, str]) -> None:
    """A 250 after DATA is followed by delivery of the same envelope and body."""
    user, password = account
    client = await relay.client(user, password)
    body = "Line one.\r\n.leading dot line\r\n\r\nLast line.\r\n"
    errors, reply = await client.sendmail("app@example.com", ["a@dest.test", "b@dest.test"],
                                          message(body=body))
    await client.quit()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    [got] = await sink.wait_for(1)
    assert got.mail_from == "app@example.com"
    assert sorted(got.rcpt_tos) == ["a@dest.test", "b@dest.test"]
    assert got.data.endswith(b"Subject: test\r\nMessage-ID: <test@example.com>\r\n\r\n" +
                             body.encode())
    assert got.data.startswith(b"DKIM-Signature: ")
    assert b"Received: from " in got.data


async def test_delivery_is_in_the_log(relay: RelayHandle, sink: Sink,
                                      account: tuple[str, str]) -> None:
    """The delivery log shows the delivered recipient with the next hop's reply."""
    user, password = account
    client = await relay.client(user, password)
    _, reply = await client.sendmail("app@example.com", ["c@dest.test"], message())
    await client.quit()
    msg_id = reply.rsplit(" ", 1)[1]
    await sink.wait_for(1)
    for _ in range(50):
        log = await relay.ctl.ok("GET", "/v1/log", user=user)
        if log["entries"]:
            break
        import asyncio
        await asyncio.sleep(0.05)
    [entry] = log["entries"]
    assert entry["message_id"] == msg_id
    assert entry["outcome"] == "delivered"
    assert entry["code"] == 250
    assert entry["next_hop"] == sink.address


async def test_many_messages_on_one_connection(relay: RelayHandle, sink: Sink,
                                               account: tuple[str, str]) -> None:
    """A client can send many messages over one authenticated connection."""
    user, password = account
    client = await relay.client(user, password)
    for i in range(20):
        await client.sendmail("app@example.com", [f"r{i}@dest.test"], message(f"m{i}"))
    await client.quit()
    got = await sink.wait_for(20)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(f"r{i}@dest.test" for i in range(20))


async def test_subdomain_sender_is_allowed(relay: RelayHandle, sink: Sink,
                                           account: tuple[str, str]) -> None:
    """MAIL FROM in a subdomain of the account's domain is accepted."""
    user, password = account
    client = await relay.client(user, password)
    _, reply = await client.sendmail("news@mail.example.com", ["x@dest.test"], message())
    await client.quit()
    assert reply.startswith("2.0.0")


async def test_ehlo_advertises_extensions(relay: RelayHandle) -> None:
    """EHLO lists SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES and AUTH on loopback."""
    client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False)
    await client.connect()
    await client.ehlo()
    for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes", "auth"):
        assert client.supports_extension(ext), ext
    assert sorted(client.server_auth_methods) == ["login", "plain"]
    await client.quit()
