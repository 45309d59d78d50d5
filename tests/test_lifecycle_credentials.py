"""Account lifecycle and credentials (SEMANTICS §3, §4): disable, enable, reset-password
and delete take effect before the control call returns, for AUTH and for network-bound
accounts; plan slots count active and disabled accounts, not deleted ones."""

from __future__ import annotations

import aiosmtplib
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.test_queue_support import queued, until


async def auth_reply(relay: RelayHandle, user: str, password: str) -> str:
    """The relay's reply to AUTH PLAIN on a fresh connection, as 'CODE TEXT'."""
    c = await relay.client()
    try:
        await c.ehlo()
        try:
            resp = await c.auth_plain(user, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            return f"{exc.code} {exc.message}"
        return f"{resp.code} {resp.message}"
    finally:
        c.close()


async def test_disable_refuses_auth_and_enable_restores_same_password(
        lrelay: RelayHandle) -> None:
    """After disable returns AUTH gets 535 5.7.8; after enable the same password works."""
    user, pw = await lrelay.ctl.add_user()
    assert (await auth_reply(lrelay, user, pw)).startswith("235")
    info = await lrelay.ctl.ok("POST", f"/v1/users/{user}/disable")
    assert (info["status"], info["disabled_reason"]) == ("disabled", "manual")
    assert await auth_reply(lrelay, user, pw) == "535 5.7.8 Authentication credentials invalid"
    info = await lrelay.ctl.ok("POST", f"/v1/users/{user}/enable")
    assert (info["status"], info["disabled_reason"]) == ("active", "")
    assert (await auth_reply(lrelay, user, pw)).startswith("235")


async def test_disabled_reply_is_the_same_as_a_wrong_password(lrelay: RelayHandle) -> None:
    """A disabled account's correct password gets exactly the wrong-password reply."""
    user, pw = await lrelay.ctl.add_user()
    wrong = await auth_reply(lrelay, user, pw + "x")
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/disable")
    assert await auth_reply(lrelay, user, pw) == wrong


async def test_reset_password_old_fails_new_works(lrelay: RelayHandle) -> None:
    """After reset-password returns, the old password gets 535 and the new one 235."""
    user, old = await lrelay.ctl.add_user()
    assert (await auth_reply(lrelay, user, old)).startswith("235")  # now in the cache
    cred = await lrelay.ctl.ok("POST", f"/v1/users/{user}/reset-password")
    assert set(cred) == {"username", "password"} and cred["username"] == user
    assert cred["password"] != old
    assert (await auth_reply(lrelay, user, old)).startswith("535 5.7.8")
    assert (await auth_reply(lrelay, user, cred["password"])).startswith("235")
    info = await lrelay.ctl.ok("GET", f"/v1/users/{user}")
    assert info["status"] == "active"


async def test_reset_password_ends_authenticated_sessions(lrelay: RelayHandle) -> None:
    """A session authenticated with the old password gets 530 at its next MAIL."""
    user, old = await lrelay.ctl.add_user()
    c = await lrelay.client(user, old)
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/reset-password")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await c.mail("app@example.com")
    assert exc.value.code == 530
    c.close()


async def test_delete_refuses_auth_for_good(lrelay: RelayHandle) -> None:
    """A deleted account gets 535 for its old password; it cannot be shown, enabled or reset."""
    user, pw = await lrelay.ctl.add_user()
    assert (await auth_reply(lrelay, user, pw)).startswith("235")
    r = await lrelay.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    assert r == {"username": user, "purged": 0}
    assert await auth_reply(lrelay, user, pw) == "535 5.7.8 Authentication credentials invalid"
    for method, path in (("GET", ""), ("POST", "/enable"), ("POST", "/reset-password"),
                         ("POST", "/disable")):
        status, body = await lrelay.ctl.call(method, f"/v1/users/{user}{path}")
        assert status == 404 and body["code"] == "not_found", (path, status, body)
    users = await lrelay.ctl.ok("GET", "/v1/users")
    assert user not in [u["username"] for u in users["users"]]


async def test_delete_needs_matching_confirmation(lrelay: RelayHandle) -> None:
    """Delete with a confirmation that is not the username is refused and changes nothing."""
    user, pw = await lrelay.ctl.add_user()
    status, body = await lrelay.ctl.call("POST", f"/v1/users/{user}/delete",
                                         {"confirm": user[:-1]})
    assert status == 400 and body["code"] == "confirm_mismatch"
    assert (await auth_reply(lrelay, user, pw)).startswith("235")


async def test_plan_slots_count_disabled_and_free_on_delete(
        relay_factory: RelayFactory) -> None:
    """With max_accounts=2 a third account is refused (even with one disabled) until one is
    deleted."""
    r = await relay_factory({"limits": {"max_accounts": 2}})
    await r.ctl.add_domain("example.com")
    first, _ = await r.ctl.add_user()
    await r.ctl.add_user()
    await r.ctl.ok("POST", f"/v1/users/{first}/disable")
    status, body = await r.ctl.call("POST", "/v1/users", {"domain": "example.com"})
    assert status == 409 and body["code"] == "plan_limit"
    assert "2 of 2" in body["error"] and "disabled accounts occupy a slot" in body["error"]
    await r.ctl.ok("POST", f"/v1/users/{first}/delete", {"confirm": first})
    third, _ = await r.ctl.add_user()
    assert third != first
    status, body = await r.ctl.call("POST", "/v1/users", {"domain": "example.com"})
    assert status == 409 and body["code"] == "plan_limit"


async def test_delete_keeps_delivery_log_and_removes_stats(lrelay: RelayHandle,
                                                           sink: Sink) -> None:
    """After delete the delivery log still lists the account's deliveries by username."""
    user, pw = await lrelay.ctl.add_user()
    c = await lrelay.client(user, pw)
    _, reply = await c.sendmail("app@example.com", ["r@dest.test"], message())
    await c.quit()
    await sink.wait_for(1)
    msg_id = reply.rsplit(" ", 1)[1]
    # the account's queued count drops to zero once the delivery is recorded
    await until(lambda: queued(lrelay, user), 0)
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    log = await lrelay.ctl.ok("GET", "/v1/log", user=user)
    assert [(e["message_id"], e["outcome"]) for e in log["entries"]] == [(msg_id, "delivered")]
    row = await lrelay.relay.spool.fetchone(
        "SELECT status, total_sent, last_connection, password_hash FROM accounts"
        " WHERE username=?", (user,))
    assert tuple(row) == ("deleted", 0, None, None)



async def test_network_bound_account_disable_enable_delete(lrelay: RelayHandle) -> None:
    """A network-bound session is refused at MAIL right after disable, works after enable,
    and is refused again after delete."""
    user, _ = await lrelay.ctl.add_user(networks=["127.0.0.0/24"])
    c = await lrelay.client()
    await c.ehlo()
    assert (await c.mail("app@example.com")).code == 250
    await c.rset()
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/disable")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await c.mail("app@example.com")
    assert exc.value.code == 530
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/enable")
    assert (await c.mail("app@example.com")).code == 250
    await c.rset()
    await lrelay.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await c.mail("app@example.com")
    assert exc.value.code == 530
    c.close()


async def test_network_binding_add_and_remove_apply_at_once(lrelay: RelayHandle) -> None:
    """user networks add attributes the next MAIL; remove ends it on the same session."""
    user, _ = await lrelay.ctl.add_user()
    c = await lrelay.client()
    await c.ehlo()
    with pytest.raises(aiosmtplib.SMTPSenderRefused):
        await c.mail("app@example.com")
    info = await lrelay.ctl.ok("POST", f"/v1/users/{user}/networks",
                               {"action": "add", "cidr": "127.0.0.1/32"})
    assert info["networks"] == ["127.0.0.1/32"]
    assert (await c.mail("app@example.com")).code == 250
    await c.rset()
    info = await lrelay.ctl.ok("POST", f"/v1/users/{user}/networks",
                               {"action": "remove", "cidr": "127.0.0.1/32"})
    assert info["networks"] == []
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await c.mail("app@example.com")
    assert exc.value.code == 530
    c.close()
