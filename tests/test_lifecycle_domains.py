"""Sending domains (SEMANTICS §2): a new selector and DNS records on every add, and an
irreversible delete that disables the domain's accounts for good, at once."""

from __future__ import annotations

import asyncio
import itertools

import aiosmtplib
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message

ZERO = {"messages": 0, "recipients": 0}  # an empty queue in a domain delete's answer


def records(dom: dict) -> dict[tuple[str, str], str]:
    """The DNS records of a domain answer as {(type, owner): value}."""
    return {(r["type"], r["name"]): r["value"] for r in dom["dns_records"]}


async def test_domain_add_lists_dkim_and_spf_records(relay: RelayHandle) -> None:
    """domain add answers a never-used selector, its DKIM TXT record and an SPF hint."""
    dom = await relay.ctl.add_domain("example.com")
    sel = dom["selector"]
    assert sel.startswith("rd") and sel.islower()
    recs = records(dom)
    dkim_txt = recs[("TXT", f"{sel}._domainkey.example.com")]
    assert dkim_txt.startswith("v=DKIM1; k=rsa; p=")
    assert recs[("TXT", "example.com")] == "v=spf1 a:relay.test ~all"
    shown = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert (shown["selector"], records(shown)) == (sel, recs)


async def test_cname_target_gives_a_cname_record(relay_factory: RelayFactory) -> None:
    """With dns.cname_target the DKIM record to publish is a CNAME into the operator's zone."""
    relay = await relay_factory({"dns": {"cname_target": "dkim.operator.test."}})
    dom = await relay.ctl.add_domain("example.com")
    sel = dom["selector"]
    recs = records(dom)
    target = f"{sel}._domainkey.example.com.dkim.operator.test"
    assert recs[("CNAME", f"{sel}._domainkey.example.com")] == target
    assert recs[("TXT", target)].startswith("v=DKIM1; k=rsa; p=")
    assert ("TXT", f"{sel}._domainkey.example.com") not in recs


async def test_domain_delete_needs_the_name_again(relay: RelayHandle) -> None:
    """domain delete with a confirmation that differs is refused and deletes nothing."""
    await relay.ctl.add_domain("example.com")
    status, body = await relay.ctl.call("POST", "/v1/domains/example.com/delete",
                                        {"confirm": "example.org"})
    assert status == 400 and body["code"] == "confirm_mismatch"
    await relay.ctl.ok("GET", "/v1/domains/example.com")


async def test_domain_delete_disables_accounts_for_good(relay_factory: RelayFactory) -> None:
    """After domain delete its accounts are disabled (domain_deleted), AUTH gets 535,
    sessions get 530, and enable is refused; the accounts can still be listed and deleted."""
    relay = await relay_factory({"smtp": {"auth_failures_before_delay": 100}})
    await relay.ctl.add_domain("example.com")
    await relay.ctl.add_domain("other.example")
    u1, p1 = await relay.ctl.add_user()
    u2, _ = await relay.ctl.add_user(networks=["127.0.0.1/32"])
    bystander, bp = await relay.ctl.add_user("other.example")
    session = await relay.client(u1, p1)
    r = await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
    assert r == {"name": "example.com", "accounts_disabled": 2, "messages_held": 0,
                 "held": ZERO, "retrying": ZERO, "purged": ZERO}
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:
        await session.mail("app@example.com")
    assert exc.value.code == 530
    session.close()
    fresh = await relay.client()
    await fresh.ehlo()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as auth:
        await fresh.auth_plain(u1, p1)
    assert (auth.value.code, auth.value.message) == (
        535, "5.7.8 Authentication credentials invalid")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as exc:  # network binding gone too
        await fresh.mail("app@example.com")
    assert exc.value.code == 530
    fresh.close()
    for u in (u1, u2):
        info = await relay.ctl.ok("GET", f"/v1/users/{u}")
        assert (info["status"], info["disabled_reason"]) == ("disabled", "domain_deleted")
        status, body = await relay.ctl.call("POST", f"/v1/users/{u}/enable")
        assert status == 409 and body["code"] == "domain_deleted", body
    listed = await relay.ctl.ok("GET", "/v1/users", status="disabled")
    assert sorted(u["username"] for u in listed["users"]) == sorted([u1, u2])
    await relay.ctl.ok("POST", f"/v1/users/{u2}/delete", {"confirm": u2})
    # the other domain is untouched
    other = await relay.client(bystander, bp)
    _, reply = await other.sendmail("a@other.example", ["r@dest.test"],
                                message(sender="a@other.example"))
    assert reply.startswith("2.0.0")
    await other.quit()


async def test_domain_delete_destroys_the_key_and_keeps_history(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """domain delete removes the private key from the spool; the delivery log stays."""
    user, pw = account
    c = await relay.client(user, pw)
    await c.sendmail("app@example.com", ["r@dest.test"], message())
    await c.quit()
    await sink.wait_for(1)
    # The sink has the message; its result is committed by the next group commit.
    for _ in range(200):
        if (await relay.ctl.ok("GET", "/v1/log", user=user))["entries"]:
            break
        await asyncio.sleep(0.05)
    await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
    row = await relay.relay.spool.fetchone(
        "SELECT private_key, ed25519_key, deleted_at FROM domains WHERE name='example.com'")
    assert row[0] is None and row[1] is None and row[2] is not None
    status, _ = await relay.ctl.call("GET", "/v1/domains/example.com")
    assert status == 404
    assert (await relay.ctl.ok("GET", "/v1/domains"))["domains"] == []
    log = await relay.ctl.ok("GET", "/v1/log", user=user)
    assert [e["domain"] for e in log["entries"]] == ["example.com"]


async def test_readded_domain_is_new(relay: RelayHandle, account: tuple[str, str]) -> None:
    """Adding a deleted name again gives a new selector and key; old accounts stay disabled
    and new ones send."""
    old_user, _ = account
    old = await relay.ctl.ok("GET", "/v1/domains/example.com")
    await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
    new = await relay.ctl.add_domain("example.com")
    assert new["selector"] != old["selector"]
    assert set(records(new).values()).isdisjoint(
        v for (t, _), v in records(old).items() if not v.startswith("v=spf1"))
    info = await relay.ctl.ok("GET", f"/v1/users/{old_user}")
    assert info["disabled_reason"] == "domain_deleted"
    status, _ = await relay.ctl.call("POST", f"/v1/users/{old_user}/enable")
    assert status == 409
    assert (await relay.ctl.ok("GET", "/v1/domains/example.com"))["accounts"] == 0
    user, pw = await relay.ctl.add_user()
    c = await relay.client(user, pw)
    _, reply = await c.sendmail("app@example.com", ["r@dest.test"], message())
    assert reply.startswith("2.0.0")
    await c.quit()


async def test_selector_collision_draws_again(relay: RelayHandle) -> None:
    """A drawn selector already used by a (deleted) domain is never handed out again."""
    tokens = itertools.chain(["aaaaaaaaaa", "aaaaaaaaaa"],
                             (f"b{i:09d}" for i in itertools.count()))
    relay.relay.lifecycle.selector_token = lambda: next(tokens)
    first = await relay.ctl.add_domain("example.com")
    assert first["selector"].endswith("-aaaaaaaaaa")
    await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
    second = await relay.ctl.add_domain("example.com")
    assert second["selector"].endswith("-b000000000")


async def test_domain_add_refuses_a_live_duplicate_and_bad_names(relay: RelayHandle) -> None:
    """A live domain cannot be added twice, and an invalid name is refused."""
    await relay.ctl.add_domain("example.com")
    status, body = await relay.ctl.call("POST", "/v1/domains", {"name": "Example.COM."})
    assert status == 409 and body["code"] == "exists"
    status, body = await relay.ctl.call("POST", "/v1/domains", {"name": "not a domain"})
    assert status == 400 and body["code"] == "invalid_domain"
