"""Issue 16 item 3: the audit trail and account labels, through the real relayctl and the
real control socket of a relay in this process (single node, SQLite)."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from control import schemas
from tests.conftest import RelayFactory, RelayHandle, decode
from tests.test_relayctl import relayctl

pytestmark = pytest.mark.timeout(120)

UID = os.getuid()


async def ok(sock: str | Path, *args: str) -> str:
    rc, out, err = await relayctl(sock, *args)
    assert rc == 0, (args, err)
    return out


async def trail(sock: str | Path, *args: str) -> list[dict[str, Any]]:
    """``relayctl --json audit ARGS``'s entries (checked against the schema)."""
    out = await ok(sock, "--json", "audit", *args)
    decode(json.loads(out), schemas.AuditList)
    entries: list[dict[str, Any]] = json.loads(out)["entries"]
    return entries


async def new_user(sock: str | Path, *extra: str) -> tuple[str, str]:
    cred = json.loads(await ok(sock, "--json", "user", "add", "--domain", "example.com",
                               *extra))
    return cred["username"], cred["password"]


async def test_every_account_change_has_its_entry(relay: RelayHandle) -> None:
    """Each changing user command leaves one entry, newest first, with the operator's uid
    (this process's, read from the socket peer), the reason and what changed; never the
    password."""
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com", "--reason", "new customer")
    user, password = await new_user(sock, "--label", "billing app", "--reason", "ticket 12")
    await ok(sock, "user", "disable", user, "--reason", "leaked credentials")
    await ok(sock, "user", "enable", user)
    reset = json.loads(await ok(sock, "--json", "user", "reset-password", user,
                                "--reason", "rotate"))
    await ok(sock, "user", "limits", user, "--per-day", "100", "--reason", "plan")
    await ok(sock, "user", "networks", "add", user, "192.0.2.0/28")
    await ok(sock, "user", "networks", "remove", user, "192.0.2.0/28", "--reason", "moved")
    await ok(sock, "user", "label", user, "invoices", "--reason", "renamed")

    entries = await trail(sock, "--user", user)
    assert [e["action"] for e in entries] == [
        "label_changed", "networks_changed", "networks_changed", "limits_changed",
        "password_reset", "enabled", "disabled", "created"]
    assert {e["uid"] for e in entries} == {UID}
    assert all(e["name"] == user and e["domain"] == "example.com" and e["kind"] == "account"
               and e["node"] is None for e in entries)
    by_action = {e["action"]: e for e in entries}
    assert by_action["disabled"]["reason"] == "leaked credentials"
    assert by_action["enabled"]["reason"] == ""
    assert by_action["created"]["reason"] == "ticket 12"
    assert by_action["created"]["details"]["label"] == "billing app"
    assert by_action["limits_changed"]["details"] == {
        "old": {"per_minute": None, "per_hour": None, "per_day": None},
        "new": {"per_minute": None, "per_hour": None, "per_day": 100}}
    assert entries[1]["details"] == {"change": "remove", "cidr": "192.0.2.0/28"}
    assert entries[1]["reason"] == "moved"
    assert by_action["label_changed"]["details"] == {"old": "billing app", "new": "invoices"}
    name = pwd.getpwuid(UID).pw_name
    assert {e["operator"] for e in entries} == {name}
    text = json.dumps(entries)
    assert password not in text and reset["password"] not in text and "argon2" not in text
    dom = await trail(sock, "--domain", "example.com")
    own = next(e for e in dom if e["kind"] == "domain")
    assert own["action"] == "added" and own["reason"] == "new customer"
    assert len(dom) == len(entries) + 1  # the domain's own entry and its account's

    rc, out, err = await relayctl(sock, "audit", "--user", user)
    assert rc == 0, err
    first = out.splitlines()[1]  # newest first, after the header
    assert f"uid {UID} ({name})" in first and "label_changed" in first and "renamed" in first
    assert "per_day=default->100" in out


async def test_user_show_prints_the_last_entries(relay: RelayHandle) -> None:
    """user show: the label and the last 5 entries (when, who, action, reason); its JSON
    is the account only (`audit --user NAME --limit 5` gives the entries)."""
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com")
    user, _ = await new_user(sock, "--label", "crm")
    for i in range(3):
        await ok(sock, "user", "disable", user, "--reason", f"incident {i}")
        await ok(sock, "user", "enable", user, "--reason", f"fixed {i}")
    info = json.loads(await ok(sock, "--json", "user", "show", user))
    assert info["label"] == "crm" and "audit" not in info
    last = await trail(sock, "--user", user, "--limit", "5")
    assert [e["action"] for e in last] == ["enabled", "disabled", "enabled", "disabled",
                                           "enabled"]
    assert last[0]["reason"] == "fixed 2"
    out = await ok(sock, "user", "show", user)
    assert "label:           crm" in out and f"uid {UID}" in out
    assert "recent changes" in out and "reason: incident 2" in out
    assert out.index("fixed 2") < out.index("incident 2") < out.index("fixed 1")
    assert "incident 0" not in out  # only the last five
    # a change that changes nothing writes nothing
    await ok(sock, "user", "enable", user, "--reason", "again")
    assert (await trail(sock, "--user", user))[0]["reason"] == "fixed 2"


async def test_the_trail_survives_delete_and_restart(relay_factory: RelayFactory) -> None:
    """Deleting an account keeps its trail (with the delete's entry); so does a restart."""
    relay = await relay_factory()
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com")
    user, _ = await new_user(sock)
    await ok(sock, "user", "delete", user, "--confirm", user, "--reason", "customer left")
    before = await trail(sock, "--user", user)
    assert [e["action"] for e in before] == ["deleted", "created"]
    assert before[0]["reason"] == "customer left"
    await relay.stop()

    again = await relay_factory()
    rc, _, err = await relayctl(again.ctl.path, "user", "show", user)
    assert rc == 1 and "no such user" in err
    assert await trail(again.ctl.path, "--user", user) == before
    await ok(again.ctl.path, "domain", "delete", "example.com", "--confirm", "example.com",
             "--reason", "contract ended")
    dom = await trail(again.ctl.path, "--domain", "example.com")
    assert dom[0]["action"] == "deleted" and dom[0]["reason"] == "contract ended"


async def test_domain_changes_and_the_accounts_a_delete_disables(relay: RelayHandle) -> None:
    """domain add, set and delete are audited; the delete also records each account it
    disables, in the same write."""
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com")
    user, _ = await new_user(sock)
    await ok(sock, "domain", "set", "example.com", "--check-header-from", "off",
             "--reason", "several brands")
    await ok(sock, "domain", "delete", "example.com", "--confirm", "example.com")
    dom = await trail(sock, "--domain", "example.com")
    assert [(e["kind"], e["action"]) for e in dom] == [
        ("account", "disabled"), ("domain", "deleted"), ("domain", "settings_changed"),
        ("account", "created"), ("domain", "added")]
    assert dom[0]["name"] == user and dom[0]["details"] == {"why": "domain_deleted"}
    assert dom[2]["details"] == {"old": {"check_header_from": True},
                                 "new": {"check_header_from": False}}
    assert dom[2]["reason"] == "several brands"


async def test_since_user_and_limit_filter(relay: RelayHandle) -> None:
    """--since leaves out older entries, --user another account's, --limit says it stopped."""
    sock = relay.ctl.path
    lc = relay.relay.lifecycle
    lc.clock = lambda: time.time() - 10 * 86400  # ten days ago
    await ok(sock, "domain", "add", "example.com")
    old_user, _ = await new_user(sock)
    lc.clock = time.time
    user, _ = await new_user(sock)
    await ok(sock, "user", "disable", old_user)
    recent = await trail(sock, "--since", "7d")
    assert [(e["action"], e["name"]) for e in recent] == [("disabled", old_user),
                                                         ("created", user)]
    assert len(await trail(sock)) == 4
    assert [e["name"] for e in await trail(sock, "--user", user)] == [user]
    rc, out, err = await relayctl(sock, "audit", "--limit", "2")
    assert rc == 0 and len(out.splitlines()) == 3
    assert "stopped at the limit of 2" in err
    rc, out, err = await relayctl(sock, "audit", "--limit", "5")
    assert rc == 0 and "stopped at the limit" not in err
    rc, out, err = await relayctl(sock, "--json", "audit", "--limit", "2")
    assert rc == 0 and len(json.loads(out)["entries"]) == 2  # stdout: the JSON only


async def test_reason_and_label_are_bounded(relay: RelayHandle) -> None:
    """A reason or label too long, or with a control character, is a 400 naming the field;
    relayctl refuses a long one itself; nothing changed, nothing recorded."""
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com")
    user, _ = await new_user(sock)
    long = "x" * (schemas.REASON_MAX + 1)
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/disable", {"reason": long})
    assert status == 400 and "reason" in body["error"]
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/disable",
                                        {"reason": "a\nb"})
    assert status == 400 and "reason" in body["error"]
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/label",
                                        {"label": "y" * (schemas.LABEL_MAX + 1)})
    assert status == 400 and "label" in body["error"]
    rc, _, err = await relayctl(sock, "user", "disable", user, "--reason", long)
    assert rc == 2 and "reason" in err
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert info["status"] == "active" and "label" not in info
    assert [e["action"] for e in await trail(sock, "--user", user)] == ["created"]


async def test_labels_set_cleared_and_listed(relay: RelayHandle) -> None:
    """--label at add, `user label` to change or --clear it; a LABEL column in user list."""
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com")
    user, _ = await new_user(sock, "--label", "newsletter")
    other, _ = await new_user(sock)
    out = await ok(sock, "user", "list")
    assert "LABEL" in out.splitlines()[0]
    assert "newsletter" in next(line for line in out.splitlines() if user in line)
    assert "newsletter" not in next(line for line in out.splitlines() if other in line)
    await ok(sock, "user", "label", other, "shop")
    lst = json.loads(await ok(sock, "--json", "user", "list"))
    assert {u["username"]: u.get("label") for u in lst["users"]} == {
        user: "newsletter", other: "shop"}
    assert (await ok(sock, "user", "label", user, "--clear")).strip() == f"{user}: label (none)"
    assert "label" not in await relay.ctl.ok("GET", f"/v1/users/{user}")
    rc, _, err = await relayctl(sock, "user", "label", user)
    assert rc == 2 and "--clear" in err
    assert next(e["details"] for e in await trail(sock, "--user", user)) == {
        "old": "newsletter", "new": ""}


async def test_a_change_never_lands_without_its_entry(relay: RelayHandle) -> None:
    """If the entry cannot be written, the change is not made either (one transaction):
    the account stays active and its old password keeps working."""
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com")
    user, password = await new_user(sock)
    db = sqlite3.connect(relay.data_dir / "relayd.sqlite3", timeout=10)
    try:
        db.execute("CREATE TRIGGER no_audit BEFORE INSERT ON audit"
                   " BEGIN SELECT RAISE(ABORT, 'audit refused'); END")
        db.commit()
        rc, _, err = await relayctl(sock, "user", "disable", user, "--reason", "x")
        assert rc == 1 and "internal error" in err
        rc, _, err = await relayctl(sock, "user", "label", user, "new")
        assert rc == 1
        row = db.execute("SELECT status, label FROM accounts WHERE username=?",
                         (user,)).fetchone()
        assert row == ("active", "")
        db.execute("DROP TRIGGER no_audit")
        db.commit()
    finally:
        db.close()
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert info["status"] == "active" and "label" not in info
    client = await relay.client(user, password)  # the old credentials still work
    await client.quit()
    assert [e["action"] for e in await trail(sock, "--user", user)] == ["created"]


async def test_rotation_webhook_and_key_changes_have_their_entries(relay: RelayHandle) -> None:
    """The changes issue 16 added beside the trail are audited too, with their reasons:
    reset --keep-old (its grace), expire-old-password, a webhook set and removed (never its
    secret), a DKIM key created, activated and cancelled."""
    sock = relay.ctl.path
    await ok(sock, "domain", "add", "example.com")
    user, _ = await new_user(sock)
    await ok(sock, "user", "reset-password", user, "--keep-old", "1h", "--reason", "rollout")
    await ok(sock, "user", "expire-old-password", user, "--reason", "rollout done")
    entries = await trail(sock, "--user", user)
    assert [(e["action"], e["reason"]) for e in entries[:2]] == [
        ("old_password_expired", "rollout done"), ("password_reset", "rollout")]
    assert entries[1]["details"] == {"keep_old_seconds": 3600.0}

    hook = json.loads(await ok(sock, "--json", "domain", "set", "example.com", "--webhook",
                               "http://127.0.0.1:9/events", "--reason", "app events"))
    await ok(sock, "domain", "set", "example.com", "--webhook", "off")
    await ok(sock, "domain", "rotate-key", "example.com", "--reason", "yearly")
    await ok(sock, "domain", "rotate-key", "example.com", "--activate")
    await ok(sock, "domain", "rotate-key", "example.com", "--reason", "again")
    await ok(sock, "domain", "rotate-key", "example.com", "--cancel", "--reason", "oops")
    mine = [e for e in await trail(sock, "--domain", "example.com") if e["kind"] == "domain"]
    assert [(e["action"], e["reason"]) for e in mine[:6]] == [
        ("key_cancelled", "oops"), ("key_created", "again"), ("key_activated", ""),
        ("key_created", "yearly"), ("webhook_removed", ""), ("webhook_set", "app events")]
    assert mine[5]["details"]["url"] == "http://127.0.0.1:9/events"
    assert hook["webhook_secret"] not in json.dumps(mine)
