"""DKIM key rotation in cluster mode: the pending key is stored (sealed) in the shared
database and shown by every node; activated through node a, node b signs with the new
selector for a message submitted after the call returns; cancel reaches every node."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster_support import start_node
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.test_dkim_e2e import (
    _nacl_for_dkimpy,  # noqa: F401 - autouse: Ed25519 in dkimpy
    published,
    signatures,
    verifies,
)

pytestmark = pytest.mark.timeout(120)

ROTATE = "/v1/domains/example.com/rotate-key"


async def send_one(node: RelayHandle, sink: Sink, user: str, pw: str, subject: str) -> bytes:
    before = len(sink.messages)
    c = await node.client(user, pw)
    await c.sendmail("app@example.com", ["r@dest.test"], message(subject))
    await c.quit()
    return (await sink.wait_for(before + 1))[before].data


async def test_activate_on_a_signs_with_the_new_selector_on_b(
        pg_dsn: str, relay_factory: RelayFactory, sink: Sink, tmp_path: Path) -> None:
    """rotate-key on a: b shows the pending key and still signs with the old one;
    --activate on a (acknowledged by both): the next message submitted to b is signed with
    the new selector and verifies with the record a printed; b shows the old one retired."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    dom = await a.ctl.add_domain("example.com")
    user, pw = await a.ctl.add_user("example.com")
    created = await a.ctl.ok("POST", ROTATE)
    assert sorted(created["propagation"]["acknowledged"]) == ["a", "b"]
    [pending] = created["selectors"]
    info_b = await b.ctl.ok("GET", "/v1/domains/example.com")
    assert [k["selector"] for k in info_b["dkim_selectors"] if k["state"] == "pending"] == [
        pending["selector"]]
    # b opened the sealed key: the same record as a printed
    assert [r for k in info_b["dkim_selectors"] if k["state"] == "pending"
            for r in k["dns_records"]] == pending["dns_records"]
    data = await send_one(b, sink, user, pw, "before")
    assert [s["s"] for s in signatures(data)] == [dom["selector"]]

    activated = await a.ctl.ok("POST", ROTATE + "/activate")
    assert sorted(activated["propagation"]["acknowledged"]) == ["a", "b"]
    data = await send_one(b, sink, user, pw, "after")
    [sig] = signatures(data)
    assert sig["s"] == pending["selector"]
    assert verifies(data, published(pending["dns_records"]), 0)
    info_b = await b.ctl.ok("GET", "/v1/domains/example.com")
    assert info_b["selector"] == pending["selector"]
    assert [k["selector"] for k in info_b["dkim_selectors"] if k["state"] == "retired"] == [
        dom["selector"]]
    data = await send_one(a, sink, user, pw, "after on a")
    assert [s["s"] for s in signatures(data)] == [pending["selector"]]


async def test_cancel_and_pending_conflict_across_nodes(
        pg_dsn: str, relay_factory: RelayFactory, sink: Sink, tmp_path: Path) -> None:
    """A rotation pending through a refuses a second one through b (409); b cancels it;
    a then has nothing to activate; a node started later loads the active key."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    dom = await a.ctl.add_domain("example.com")
    user, pw = await a.ctl.add_user("example.com")
    [pending] = (await a.ctl.ok("POST", ROTATE))["selectors"]
    status, err = await b.ctl.call("POST", ROTATE)
    assert (status, err["code"]) == (409, "key_pending") and pending["selector"] in err["error"]
    await b.ctl.ok("POST", ROTATE + "/cancel")
    status, err = await a.ctl.call("POST", ROTATE + "/activate")
    assert (status, err["code"]) == (409, "no_pending_key")
    [second] = (await b.ctl.ok("POST", ROTATE))["selectors"]
    assert second["selector"] != pending["selector"]
    await b.ctl.ok("POST", ROTATE + "/activate")
    c = await start_node(relay_factory, pg_dsn, "c", tmp_path, "127.0.0.3")
    data = await send_one(c, sink, user, pw, "on c")
    assert [s["s"] for s in signatures(data)] == [second["selector"]]
    assert verifies(data, published(second["dns_records"]), 0)
    assert not verifies(data, published(dom["dns_records"]), 0)


async def test_domain_delete_destroys_a_pending_key(pg_dsn: str, relay_factory: RelayFactory,
                                                    tmp_path: Path) -> None:
    """A domain deleted with a rotation pending: the pending key is destroyed in the
    cluster database (its selector kept, cancelled, never drawn again)."""
    import asyncpg  # the tests' own connection, as an operator's psql would be

    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    await a.ctl.add_domain("example.com")
    [pending] = (await a.ctl.ok("POST", ROTATE))["selectors"]
    conn = await asyncpg.connect(pg_dsn)
    try:
        sql = "SELECT state, private_key IS NULL FROM dkim_selectors WHERE selector=$1"
        assert tuple(await conn.fetchrow(sql, pending["selector"])) == ("pending", False)
        await a.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
        assert tuple(await conn.fetchrow(sql, pending["selector"])) == ("cancelled", True)
    finally:
        await conn.close()
