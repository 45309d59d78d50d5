"""What operators see of accounts (SEMANTICS §3, §4.2): user show, user list filters and
sorts, the dormant listing, and last-connection times (batched to the database)."""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message


async def login(relay: RelayHandle, user: str, pw: str) -> None:
    """One successful AUTH on a fresh connection."""
    c = await relay.client(user, pw)
    await c.quit()


async def send(relay: RelayHandle, user: str, pw: str, n: int,
               sender: str = "app@example.com") -> None:
    """Submit ``n`` messages on one authenticated connection."""
    c = await relay.client(user, pw)
    for i in range(n):
        await c.sendmail(sender, [f"r{i}@dest.test"], message(f"m{i}", sender=sender))
    await c.quit()


async def names(relay: RelayHandle, path: str, **query: object) -> list[str]:
    """The usernames of a user listing, in order."""
    lst = await relay.ctl.ok("GET", path, **query)
    return [u["username"] for u in lst["users"]]


async def test_user_show_fields(relay: RelayHandle, sink: Sink) -> None:
    """user show has status, reason, last connection, total sent, queued, networks, limits."""
    await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user(networks=["192.0.2.0/24"])
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert (info["last_connection"], info["total_sent"], info["queued"]) == (None, 0, 0)
    before = time.time()
    await send(relay, user, pw, 1)
    after = time.time()
    await sink.wait_for(1)
    await relay.ctl.ok("POST", f"/v1/users/{user}/limits", {"per_hour": 50})
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert set(info) == {"username", "domain", "status", "disabled_reason", "created_at",
                         "last_connection", "total_sent", "queued", "networks", "limits"}
    assert (info["username"], info["domain"]) == (user, "example.com")
    assert (info["status"], info["disabled_reason"]) == ("disabled", "manual")
    assert before <= info["last_connection"] <= after
    assert info["created_at"] <= before
    assert (info["total_sent"], info["queued"]) == (1, 0)
    assert info["networks"] == ["192.0.2.0/24"]
    assert info["limits"] == {"per_minute": None, "per_hour": 50, "per_day": None}


async def test_failed_auth_does_not_count_as_a_connection(relay_factory: RelayFactory) -> None:
    """A wrong password leaves the last connection unset; a network-attributed session sets
    it."""
    relay = await relay_factory()
    await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user()
    c = await relay.client()
    await c.ehlo()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await c.auth_plain(user, pw + "x")
    c.close()
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["last_connection"] is None
    bound, _ = await relay.ctl.add_user(networks=["127.0.0.1/32"])
    c = await relay.client()
    await c.ehlo()
    await c.mail("app@example.com")
    c.close()
    assert (await relay.ctl.ok("GET", f"/v1/users/{bound}"))["last_connection"] is not None


async def test_user_list_filters(relay: RelayHandle) -> None:
    """user list filters by domain and by status, and never lists deleted accounts."""
    await relay.ctl.add_domain("example.com")
    await relay.ctl.add_domain("other.example")
    u1, _ = await relay.ctl.add_user()
    u2, _ = await relay.ctl.add_user()
    u3, _ = await relay.ctl.add_user("other.example")
    gone, _ = await relay.ctl.add_user()
    await relay.ctl.ok("POST", f"/v1/users/{gone}/delete", {"confirm": gone})
    await relay.ctl.ok("POST", f"/v1/users/{u2}/disable")
    assert await names(relay, "/v1/users") == sorted([u1, u2, u3])
    assert await names(relay, "/v1/users", domain="example.com") == sorted([u1, u2])
    assert await names(relay, "/v1/users", status="disabled") == [u2]
    assert await names(relay, "/v1/users", status="active", domain="example.com") == [u1]
    status, body = await relay.ctl.call("GET", "/v1/users", query={"status": "deleted"})
    assert status == 400 and "active or disabled" in body["error"]


async def test_user_list_sorts(relay: RelayHandle, sink: Sink) -> None:
    """user list sorts by name, by last use (most recent first, never last) and by sent."""
    await relay.ctl.add_domain("example.com")
    a, pa = await relay.ctl.add_user()
    b, pb = await relay.ctl.add_user()
    never, _ = await relay.ctl.add_user()
    await send(relay, b, pb, 2)
    await send(relay, a, pa, 1)
    await sink.wait_for(3)
    assert await names(relay, "/v1/users", sort="name") == sorted([a, b, never])
    assert await names(relay, "/v1/users", sort="last-used") == [a, b, never]
    assert await names(relay, "/v1/users", sort="sent") == [b, a, never]
    status, _ = await relay.ctl.call("GET", "/v1/users", query={"sort": "size"})
    assert status == 400


async def test_dormant_order_and_thresholds(relay: RelayHandle, sink: Sink) -> None:
    """user dormant lists never-used accounts first, then oldest last connection, honouring
    --days and --max-sent."""
    await relay.ctl.add_domain("example.com")
    never, _ = await relay.ctl.add_user()
    old, p_old = await relay.ctl.add_user()
    busy, p_busy = await relay.ctl.add_user()
    await login(relay, old, p_old)
    await send(relay, busy, p_busy, 1)
    await sink.wait_for(1)
    await _until_sent(relay, busy, 1)
    assert await names(relay, "/v1/dormant", days=0) == [never, old, busy]
    assert await names(relay, "/v1/dormant", days=0, max_sent=0) == [never, old]
    assert await names(relay, "/v1/dormant") == [never]  # default: 90 days
    # seed an age: the last login of ``old`` two days ago (only the clock is faked)
    relay.relay.directory.accounts_by_name[old].last_connection = time.time() - 2 * 86400
    assert await names(relay, "/v1/dormant", days=1) == [never, old]
    assert await names(relay, "/v1/dormant", days=3) == [never]
    lst = await relay.ctl.ok("GET", "/v1/dormant", days=0)
    assert [u["total_sent"] for u in lst["users"]] == [0, 0, 1]


async def _until_sent(relay: RelayHandle, user: str, n: int) -> None:
    for _ in range(200):
        if (await relay.ctl.ok("GET", f"/v1/users/{user}"))["total_sent"] >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{user} never reached total_sent={n}")


async def test_last_connection_is_written_in_batches(relay_factory: RelayFactory) -> None:
    """Logins update the last connection in memory at once and in the database only at the
    next flush, all accounts in one batch."""
    relay = await relay_factory({"spool": {"last_connection_flush_seconds": 3600}})
    await relay.ctl.add_domain("example.com")
    creds = [await relay.ctl.add_user() for _ in range(3)]
    for user, pw in creds * 2:
        await login(relay, user, pw)
    shown = {u: (await relay.ctl.ok("GET", f"/v1/users/{u}"))["last_connection"]
             for u, _ in creds}
    assert None not in shown.values()
    rows = await relay.relay.spool.fetchall("SELECT last_connection FROM accounts")
    assert [r[0] for r in rows] == [None, None, None]
    assert await relay.relay.lifecycle.flush_last_connections() == 3
    assert await relay.relay.lifecycle.flush_last_connections() == 0  # nothing changed
    rows = await relay.relay.spool.fetchall("SELECT username, last_connection FROM accounts")
    assert {r[0]: r[1] for r in rows} == shown
