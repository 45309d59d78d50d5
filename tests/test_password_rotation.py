"""Credential rotation without downtime (issue 16 item 2, SEMANTICS §4): ``reset-password
--keep-old`` keeps the previous password working until its expiry, then it stops by itself
(also on the credential cache's fast path); ``expire-old-password``, disable, delete and
domain delete end it at once; at most two passwords are valid; a restart keeps the grace.
Real SMTP AUTH (the stdlib's smtplib, in a thread), the real control socket, real relayctl.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from typing import Any

import pytest

from tests.conftest import NO_THROTTLE, RelayFactory, RelayHandle
from tests.test_relayctl import relayctl


def _smtp_auth(host: str, port: int, user: str, password: str) -> int:
    """AUTH with smtplib on a fresh connection: the reply code (235 or the refusal's)."""
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo()
        try:
            code, _ = s.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        return code


async def auth(relay: RelayHandle, user: str, password: str) -> int:
    """The reply code to a real AUTH (smtplib runs in a thread: the relay's loop serves)."""
    return await asyncio.to_thread(_smtp_auth, relay.host, relay.port, user, password)


async def reset(relay: RelayHandle, user: str, keep_old: float | None = None) -> dict[str, Any]:
    body = None if keep_old is None else {"keep_old_seconds": keep_old}
    out: dict[str, Any] = await relay.ctl.ok("POST", f"/v1/users/{user}/reset-password", body)
    return out


async def test_both_work_during_the_grace_then_the_old_one_stops(lrelay: RelayHandle) -> None:
    """With --keep-old 2s: both passwords log in at once; after 2 s the old one gets 535
    by itself (no control call), the new one still 235; `user show` names the expiry
    during the grace only."""
    user, old = await lrelay.ctl.add_user()
    assert await auth(lrelay, user, old) == 235
    before = time.time()
    cred = await reset(lrelay, user, keep_old=2)
    new = cred["password"]
    assert new != old and before + 2 <= cred["old_password_expires"] <= time.time() + 2
    assert await auth(lrelay, user, new) == 235
    assert await auth(lrelay, user, old) == 235
    info = await lrelay.ctl.ok("GET", f"/v1/users/{user}")
    assert info["old_password_expires"] == cred["old_password_expires"]
    assert not any("hash" in key for key in info)
    await asyncio.sleep(max(0.0, cred["old_password_expires"] - time.time()) + 0.2)
    assert await auth(lrelay, user, old) == 535
    assert await auth(lrelay, user, new) == 235
    info = await lrelay.ctl.ok("GET", f"/v1/users/{user}")
    assert "old_password_expires" not in info


async def test_the_cache_never_accepts_an_expired_old_password(lrelay: RelayHandle) -> None:
    """The old password, once verified, is answered from the cache (no argon2), as is the
    new one, alternately; when the cache's clock passes the expiry the cached old password
    gets 535, and nothing else changed."""
    user, old = await lrelay.ctl.add_user()
    new = (await reset(lrelay, user, keep_old=3600))["password"]
    hasher, cache = lrelay.relay.hasher, lrelay.relay.cache
    assert await auth(lrelay, user, old) == 235  # argon2: the new hash, then the old one
    assert await auth(lrelay, user, new) == 235
    verified = hasher.verifications
    for _ in range(2):  # both cached: an application on each password, no argon2
        assert await auth(lrelay, user, old) == 235
        assert await auth(lrelay, user, new) == 235
    assert hasher.verifications == verified
    later = time.time() + 3601
    cache.clock = lambda: later
    assert await auth(lrelay, user, old) == 535
    assert hasher.verifications == verified + 1  # only the current hash: the old one expired
    assert await auth(lrelay, user, new) == 235
    assert hasher.verifications == verified + 1  # still cached


async def test_a_wrong_password_inside_the_grace_is_refused(lrelay: RelayHandle) -> None:
    """A wrong password fails against both hashes (two argon2 checks while an old one is
    kept, one once it is gone)."""
    user, old = await lrelay.ctl.add_user()
    await reset(lrelay, user, keep_old=3600)
    before = lrelay.relay.hasher.verifications
    assert await auth(lrelay, user, old + "x") == 535
    assert lrelay.relay.hasher.verifications == before + 2
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/expire-old-password")
    assert await auth(lrelay, user, old + "x") == 535
    assert lrelay.relay.hasher.verifications == before + 3


async def test_sessions_stay_authenticated_through_a_keep_old_reset(
        lrelay: RelayHandle) -> None:
    """A session authenticated with the old password keeps sending after reset --keep-old
    (nothing was taken away); expire-old-password ends it (530 at its next MAIL)."""
    user, old = await lrelay.ctl.add_user()
    c = await lrelay.client(user, old)
    await reset(lrelay, user, keep_old=3600)
    assert (await c.mail("app@example.com"))[0] == 250
    await c.rset()
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/expire-old-password")
    code, _ = await c.execute_command(b"MAIL", b"FROM:<app@example.com>")
    assert code == 530
    c.close()


async def test_expire_old_password_ends_the_grace_at_once(lrelay: RelayHandle) -> None:
    """After expire-old-password returns the old password (cached before) gets 535, the new
    one 235, `user show` has no old password; a second call changes nothing."""
    user, old = await lrelay.ctl.add_user()
    new = (await reset(lrelay, user, keep_old=3600))["password"]
    assert await auth(lrelay, user, old) == 235
    info = await lrelay.ctl.ok("POST", f"/v1/users/{user}/expire-old-password")
    assert info["username"] == user and "old_password_expires" not in info
    assert await auth(lrelay, user, old) == 535
    assert await auth(lrelay, user, new) == 235
    again = await lrelay.ctl.ok("POST", f"/v1/users/{user}/expire-old-password")
    assert "old_password_expires" not in again
    assert await auth(lrelay, user, new) == 235


async def test_disable_then_enable_does_not_bring_the_old_one_back(
        lrelay: RelayHandle) -> None:
    """Disable ends both passwords; enable brings back the current one only."""
    user, old = await lrelay.ctl.add_user()
    new = (await reset(lrelay, user, keep_old=3600))["password"]
    assert await auth(lrelay, user, old) == 235
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/disable")
    assert await auth(lrelay, user, old) == 535
    assert await auth(lrelay, user, new) == 535
    info = await lrelay.ctl.ok("POST", f"/v1/users/{user}/enable")
    assert "old_password_expires" not in info
    assert await auth(lrelay, user, old) == 535
    assert await auth(lrelay, user, new) == 235


@pytest.mark.parametrize("how", ["delete", "domain-delete"])
async def test_delete_and_domain_delete_end_both(lrelay: RelayHandle, how: str) -> None:
    """Delete and domain delete: neither the new nor the kept old password logs in."""
    user, old = await lrelay.ctl.add_user()
    new = (await reset(lrelay, user, keep_old=3600))["password"]
    assert await auth(lrelay, user, old) == 235
    if how == "delete":
        await lrelay.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    else:
        await lrelay.ctl.ok("POST", "/v1/domains/example.com/delete",
                            {"confirm": "example.com"})
        acct = lrelay.relay.directory.account(user)
        assert acct is not None and acct.old_password_hash == ""
    assert await auth(lrelay, user, old) == 535
    assert await auth(lrelay, user, new) == 535


async def test_at_most_two_passwords_are_valid(lrelay: RelayHandle) -> None:
    """A second reset --keep-old keeps the previous password only: the first one ends. A
    reset without --keep-old then ends every earlier one (as before this feature)."""
    user, p0 = await lrelay.ctl.add_user()
    p1 = (await reset(lrelay, user, keep_old=3600))["password"]
    assert await auth(lrelay, user, p0) == 235  # cached as the old one
    p2 = (await reset(lrelay, user, keep_old=3600))["password"]
    assert [await auth(lrelay, user, p) for p in (p0, p1, p2)] == [535, 235, 235]
    p3 = (await reset(lrelay, user))["password"]
    assert [await auth(lrelay, user, p) for p in (p0, p1, p2, p3)] == [535, 535, 535, 235]
    info = await lrelay.ctl.ok("GET", f"/v1/users/{user}")
    assert "old_password_expires" not in info


async def test_a_restart_keeps_the_grace(relay_factory: RelayFactory) -> None:
    """SQLite: the kept old password and its expiry survive a restart."""
    first = await relay_factory(NO_THROTTLE)
    await first.ctl.add_domain("example.com")
    user, old = await first.ctl.add_user()
    cred = await reset(first, user, keep_old=3600)
    await first.stop()
    second = await relay_factory(NO_THROTTLE)
    assert await auth(second, user, old) == 235
    assert await auth(second, user, cred["password"]) == 235
    info = await second.ctl.ok("GET", f"/v1/users/{user}")
    assert info["old_password_expires"] == pytest.approx(cred["old_password_expires"])
    await second.ctl.ok("POST", f"/v1/users/{user}/expire-old-password")
    await second.stop()
    third = await relay_factory(NO_THROTTLE)
    assert await auth(third, user, old) == 535
    assert await auth(third, user, cred["password"]) == 235


@pytest.mark.parametrize("value", [0, -5, 30 * 86400 + 1, "1h"])
async def test_a_grace_out_of_bounds_is_a_400_naming_the_field(lrelay: RelayHandle,
                                                               value: Any) -> None:
    """Not positive, over 30 days or not a number: 400 naming keep_old_seconds; the
    password did not change."""
    user, pw = await lrelay.ctl.add_user()
    status, body = await lrelay.ctl.call("POST", f"/v1/users/{user}/reset-password",
                                         {"keep_old_seconds": value})
    assert status == 400 and "keep_old_seconds" in body["error"], body
    assert await auth(lrelay, user, pw) == 235


async def test_a_disabled_account(lrelay: RelayHandle) -> None:
    """Reset on a disabled account says it stays disabled; --keep-old there is a 409 (no
    password of it works, so there is none to keep)."""
    user, _ = await lrelay.ctl.add_user()
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/disable")
    status, body = await lrelay.ctl.call("POST", f"/v1/users/{user}/reset-password",
                                         {"keep_old_seconds": 60})
    assert status == 409 and body["code"] == "account_disabled"
    cred = await reset(lrelay, user)
    assert "stays disabled" in cred["note"] and f"user enable {user}" in cred["note"]
    assert await auth(lrelay, user, cred["password"]) == 535
    active, _ = await lrelay.ctl.add_user()
    assert "note" not in await reset(lrelay, active)


async def test_relayctl_rotation(lrelay: RelayHandle) -> None:
    """relayctl: reset-password --keep-old (text and --json), user show (text and --json,
    never a hash), expire-old-password; the note on a disabled account."""
    sock = lrelay.ctl.path
    user, old = await lrelay.ctl.add_user()
    rc, out, err = await relayctl(sock, "user", "reset-password", user, "--keep-old", "24h")
    assert rc == 0 and err == "", err
    assert "the old password keeps working until" in out and "(in 23h" in out
    new = out.split("password: ", 1)[1].split("\n", 1)[0]
    assert await auth(lrelay, user, new) == 235 and await auth(lrelay, user, old) == 235
    rc, out, err = await relayctl(sock, "user", "show", user)
    assert rc == 0 and "old password:    works until" in out, out
    assert f"relayctl user expire-old-password {user}" in out and "argon2" not in out
    rc, out, err = await relayctl(sock, "--json", "user", "show", user)
    shown = json.loads(out)
    assert rc == 0 and shown["old_password_expires"] > time.time() + 86000
    assert "argon2" not in out
    rc, out, err = await relayctl(sock, "--json", "user", "reset-password", user,
                                  "--keep-old", "90m")
    assert rc == 0 and set(json.loads(out)) == {"username", "password", "old_password_expires"}
    rc, out, err = await relayctl(sock, "user", "expire-old-password", user)
    assert (rc, out.strip()) == (0, f"{user}: only the current password works now"), err
    rc, out, _ = await relayctl(sock, "user", "show", user)
    assert "old password" not in out
    rc, out, err = await relayctl(sock, "user", "reset-password", user)
    assert rc == 0 and "the old password no longer works" in out and "note" not in out
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/disable")
    rc, out, err = await relayctl(sock, "user", "reset-password", user)
    assert rc == 0 and f"note: the account stays disabled: `relayctl user enable {user}`" in out


@pytest.mark.parametrize(("arg", "says"), [("0h", "more than 0"), ("31d", "at most 30d"),
                                           ("-1h", "not a duration"),
                                           ("soon", "not a duration"),
                                           ("24", "not a duration")])
async def test_relayctl_refuses_a_bad_grace(lrelay: RelayHandle, arg: str, says: str) -> None:
    """A grace relayctl cannot send: one line on stderr, exit 2, nothing on stdout."""
    user, pw = await lrelay.ctl.add_user()
    rc, out, err = await relayctl(lrelay.ctl.path, "user", "reset-password", user,
                                  f"--keep-old={arg}")
    assert rc == 2 and out == "" and says in err and err.count("\n") == 1, err
    assert await auth(lrelay, user, pw) == 235


async def test_relayctl_a_server_refusal_is_one_line(lrelay: RelayHandle) -> None:
    """--keep-old on a disabled account: the server's 409 as one line, exit 1."""
    user, _ = await lrelay.ctl.add_user()
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/disable")
    rc, out, err = await relayctl(lrelay.ctl.path, "user", "reset-password", user,
                                  "--keep-old", "1h")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "disabled" in err, err
