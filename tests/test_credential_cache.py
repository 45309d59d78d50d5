"""The credential cache: repeated logins skip argon2, wrong passwords never pass."""

from __future__ import annotations

import aiosmtplib
import pytest

from tests.conftest import RelayHandle


async def _login(relay: RelayHandle, user: str, password: str) -> int:
    client = await relay.client()
    try:
        await client.ehlo()
        resp = await client.auth_plain(user, password)
        return resp.code
    except aiosmtplib.SMTPAuthenticationError as exc:
        return exc.code
    finally:
        await client.quit()


async def test_second_login_does_not_call_the_hasher(relay: RelayHandle,
                                                     account: tuple[str, str]) -> None:
    """After one full verification, further logins are answered without argon2."""
    hasher = relay.relay.hasher
    assert await _login(relay, *account) == 235
    after_first = hasher.verifications
    assert after_first == 1
    for _ in range(5):
        assert await _login(relay, *account) == 235
    assert hasher.verifications == after_first


async def test_cached_account_still_rejects_a_wrong_password(relay: RelayHandle,
                                                             account: tuple[str, str]) -> None:
    """A cached account still gets 535 for a wrong password (checked with argon2)."""
    assert await _login(relay, *account) == 235
    before = relay.relay.hasher.verifications
    assert await _login(relay, account[0], account[1] + "x") == 535
    assert relay.relay.hasher.verifications == before + 1
    assert await _login(relay, *account) == 235


async def test_unknown_user_costs_one_verification(relay: RelayHandle) -> None:
    """An unknown user is checked against a dummy hash, so its timing matches a real one."""
    before = relay.relay.hasher.verifications
    assert await _login(relay, "nobody", "pw") == 535
    assert relay.relay.hasher.verifications == before + 1


def test_invalidate_drops_the_entry() -> None:
    """``invalidate`` forgets an account's cached verification."""
    import asyncio

    from relayd.config import CredentialsConfig
    from relayd.directory.accounts import Account, Domain
    from relayd.directory.credentials import CredentialCache, Hasher

    async def run() -> None:
        hasher = Hasher(CredentialsConfig(argon2_time_cost=1, argon2_memory_cost_kib=1024,
                                          argon2_parallelism=1))
        cache = CredentialCache(hasher)
        acct = Account(1, "u", Domain(1, "example.com", "s"), hasher.hash_sync("pw"))
        assert (await cache.check(acct, b"pw")).ok
        assert len(cache) == 1
        cache.invalidate(1)
        assert len(cache) == 0
        outcome = await cache.check(acct, b"pw")
        assert outcome.ok and not outcome.cache_hit
        hasher.close()

    asyncio.run(run())


@pytest.mark.parametrize("password", ["", "x" * 1000])
async def test_odd_passwords_are_just_wrong(relay: RelayHandle, account: tuple[str, str],
                                            password: str) -> None:
    """Empty or very long passwords get 535 like any wrong password."""
    assert await _login(relay, account[0], password) == 535
