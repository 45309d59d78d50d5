"""The replies of SEMANTICS.md §6 for authentication and sender checks, over a real socket."""

from __future__ import annotations

import aiosmtplib
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message


async def _auth_error(relay: RelayHandle, user: str,
                      password: str) -> aiosmtplib.SMTPAuthenticationError:
    client = await relay.client()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
        await client.login(user, password)
    await client.quit()
    return info.value


async def test_wrong_password_gets_535(relay: RelayHandle, account: tuple[str, str]) -> None:
    """A wrong password gets 535 5.7.8 Authentication credentials invalid."""
    err = await _auth_error(relay, account[0], "not-the-password")
    assert err.code == 535
    assert err.message == "5.7.8 Authentication credentials invalid"


async def test_unknown_user_gets_the_same_535(relay: RelayHandle) -> None:
    """An unknown user gets exactly the same reply as a wrong password."""
    err = await _auth_error(relay, "nobody-at-all", "whatever")
    assert (err.code, err.message) == (535, "5.7.8 Authentication credentials invalid")


async def test_auth_login_mechanism_works(relay: RelayHandle, account: tuple[str, str]) -> None:
    """AUTH LOGIN with the right credentials gets 235."""
    client = await relay.client()
    await client.ehlo()
    resp = await client.auth_login(account[0], account[1])
    assert resp.code == 235
    await client.quit()


async def test_mail_without_auth_gets_530(relay: RelayHandle, account: tuple[str, str]) -> None:
    """MAIL without authentication (and no network binding) gets 530 5.7.0."""
    client = await relay.client()
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await client.sendmail("app@example.com", ["x@dest.test"], message())
    assert info.value.code == 530
    assert info.value.message == "5.7.0 Authentication required"
    await client.quit()


async def test_foreign_sender_gets_553(relay: RelayHandle, account: tuple[str, str],
                                       sink: Sink) -> None:
    """A sender outside the account's domain gets 553 5.7.1, and nothing is delivered."""
    client = await relay.client(*account)
    for sender in ("app@other.org", "app@example.com.evil.org", "app@notexample.com"):
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
            await client.sendmail(sender, ["x@dest.test"], message())
        assert info.value.code == 553
        assert info.value.message == "5.7.1 Sender address not allowed for this account"
        await client.rset()
    await client.quit()
    assert sink.messages == []


async def test_auth_refused_on_plaintext_outside_allowed_networks(
        relay_factory: RelayFactory) -> None:
    """Where plaintext AUTH is not allowed, AUTH is not advertised and gets 538 5.7.11."""
    relay = await relay_factory({"smtp": {"plaintext_auth_networks": []}})
    client = await relay.client()
    await client.ehlo()
    assert not client.supports_extension("auth")
    resp = await client.execute_command(b"AUTH", b"PLAIN", b"AGZvbwBiYXI=")
    assert (resp.code, resp.message) == (
        538, "5.7.11 Encryption required for requested authentication mechanism")
    await client.quit()
