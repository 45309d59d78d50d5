"""Issue 16 item 3 in cluster mode: the audit trail is the cluster's (PostgreSQL), so a
change made through node a is listed by `relayctl audit` on node b with a's name; a label
set through one node shows on the other; the trail outlives a delete; a change whose
entry cannot be written is not made on any node."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.cluster_support import start_node
from tests.conftest import RelayFactory
from tests.test_audit import ok, trail
from tests.test_relayctl import relayctl

pytestmark = pytest.mark.timeout(120)


async def test_a_change_on_a_is_listed_on_b(pg_dsn: str, relay_factory: RelayFactory,
                                          tmp_path: Path) -> None:
    """Changes through a (with reasons) are listed on b with node a and this process's
    uid; the label set on a shows on b, changed on b shows on a; after a delete on b, a
    still lists the account's whole trail."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    sa, sb = a.ctl.path, b.ctl.path
    await ok(sa, "domain", "add", "example.com", "--reason", "onboarding")
    cred = json.loads(await ok(sa, "--json", "user", "add", "--domain", "example.com",
                               "--label", "billing"))
    user = cred["username"]
    await ok(sa, "user", "disable", user, "--reason", "abuse report")

    entries = await trail(sb, "--user", user)
    assert [(e["action"], e["node"], e["uid"]) for e in entries] == [
        ("disabled", "a", os.getuid()), ("created", "a", os.getuid())]
    assert entries[0]["reason"] == "abuse report"
    rc, out, err = await relayctl(sb, "audit", "--domain", "example.com")
    assert rc == 0, err
    assert "abuse report" in out and "onboarding" in out
    lines = out.splitlines()[1:]
    assert len(lines) == 3 and all(re.search(r"\sa\s+(account|domain)\s", line)
                                   for line in lines)  # the NODE column

    info_b = json.loads(await ok(sb, "--json", "user", "show", user))
    assert info_b["label"] == "billing" and info_b["status"] == "disabled"
    assert "abuse report" in await ok(sb, "user", "show", user)
    await ok(sb, "user", "label", user, "invoices", "--reason", "renamed")
    assert "invoices" in next(line for line in (await ok(sa, "user", "list")).splitlines()
                              if user in line)

    await ok(sb, "user", "delete", user, "--confirm", user, "--reason", "closed")
    after = await trail(sa, "--user", user)
    assert [(e["action"], e["node"]) for e in after] == [
        ("deleted", "b"), ("label_changed", "b"), ("disabled", "a"), ("created", "a")]
    assert after[1]["details"] == {"old": "billing", "new": "invoices"}


async def test_no_change_without_its_entry(pg_dsn: str, relay_factory: RelayFactory,
                                           tmp_path: Path) -> None:
    """PostgreSQL refuses the entry: the disable is refused and no node applies it."""
    import asyncpg  # the tests' own connection, as an operator's psql would be

    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    await a.ctl.add_domain("example.com")
    user, _ = await a.ctl.add_user("example.com")
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("ALTER TABLE audit ADD CONSTRAINT no_more CHECK (at < 0) NOT VALID")
        rc, _, _ = await relayctl(a.ctl.path, "user", "disable", user)
        assert rc == 1
        assert await conn.fetchval("SELECT status FROM accounts WHERE username=$1",
                                   user) == "active"
        await conn.execute("ALTER TABLE audit DROP CONSTRAINT no_more")
    finally:
        await conn.close()
    for node in (a, b):
        assert (await node.ctl.ok("GET", f"/v1/users/{user}"))["status"] == "active"
    assert [e["action"] for e in await trail(b.ctl.path, "--user", user)] == ["created"]
