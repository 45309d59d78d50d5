"""Cluster mode on a real PostgreSQL: three nodes, one directory, acknowledged invalidation.

Every node is a real relayd (in this process) with its own spool, SMTP listener on its own
loopback address and control socket; they share one throwaway PostgreSQL database
(tests/pg_fixtures.py). Clients talk SMTP to the nodes and the control API through each
node's real socket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.cluster_support import three_nodes
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.rawsmtp import Raw

pytestmark = pytest.mark.timeout(60)


async def _login(node: RelayHandle, user: str, password: str) -> tuple[Raw, str]:
    raw = await Raw.open(node.host, node.port)
    return raw, await raw.login(user, password)


async def _inside_data(node: RelayHandle, user: str, password: str) -> Raw:
    """A session on ``node``, authenticated, with its message sent but for the final dot."""
    raw, answer = await _login(node, user, password)
    assert answer.startswith("235 ")
    assert (await raw.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await raw.cmd("RCPT TO:<r@dest.test>")).startswith("250 ")
    assert (await raw.cmd("DATA")).startswith("354 ")
    await raw.send(message("in flight"))
    return raw


async def test_one_directory_for_every_node(pg_dsn: str, relay_factory: RelayFactory,
                                            tmp_path: Path, sink: Sink) -> None:
    """A domain and an account made through one node are there on every node when the
    call returns: each node signs and relays the account's mail."""
    a, b, c = await three_nodes(relay_factory, pg_dsn, tmp_path)
    await a.ctl.add_domain("example.com")
    user, password = await b.ctl.add_user("example.com")
    for node in (a, b, c):
        listed = await node.ctl.ok("GET", "/v1/users")
        assert [u["username"] for u in listed["users"]] == [user]
        assert [d["name"] for d in (await node.ctl.ok("GET", "/v1/domains"))["domains"]] == [
            "example.com"]
    for i, node in enumerate((a, b, c)):
        raw, answer = await _login(node, user, password)
        assert answer.startswith("235 "), answer
        assert (await raw.transaction("app@example.com", [f"r{i}@dest.test"],
                                      message(f"via {i}"))).startswith("250 ")
        raw.close()
    await sink.wait_for(3)
    assert all(b"DKIM-Signature:" in m.data for m in sink.messages)


async def test_disable_through_a_ends_a_session_on_b(relay_factory: RelayFactory,
                                                     pg_dsn: str, tmp_path: Path) -> None:
    """A session authenticated on node b before the disable through node a gets no 250
    for a DATA that ends after the call returned; AUTH then fails on every node. The
    answer lists the three nodes as having applied the change."""
    a, b, c = await three_nodes(relay_factory, pg_dsn, tmp_path)
    await a.ctl.add_domain("example.com")
    user, password = await a.ctl.add_user("example.com")
    raw = await _inside_data(b, user, password)
    info = await a.ctl.ok("POST", f"/v1/users/{user}/disable")
    assert info["status"] == "disabled"
    assert sorted(info["propagation"]["acknowledged"]) == ["a", "b", "c"]
    assert info["propagation"]["gone"] == []
    await raw.send(b".\r\n")
    assert (await raw.reply()).startswith("530 ")
    raw.close()
    for node in (a, b, c):
        raw, answer = await _login(node, user, password)
        assert answer.startswith("535 "), (node.host, answer)
        raw.close()


@pytest.mark.parametrize("change", ["reset-password", "delete", "domain-delete"])
async def test_rights_taken_away_everywhere(pg_dsn: str, relay_factory: RelayFactory,
                                            tmp_path: Path, change: str) -> None:
    """Reset-password, delete and domain delete through node c: a session on node a,
    authenticated and in the middle of its DATA, gets no 250 when the DATA ends after the
    call returned, and the old credentials fail on every node."""
    a, b, c = await three_nodes(relay_factory, pg_dsn, tmp_path)
    await c.ctl.add_domain("example.com")
    user, password = await c.ctl.add_user("example.com")
    raw = await _inside_data(a, user, password)
    if change == "reset-password":
        out = await c.ctl.ok("POST", f"/v1/users/{user}/reset-password")
        assert out["password"] != password
    elif change == "delete":
        out = await c.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    else:
        out = await c.ctl.ok("POST", "/v1/domains/example.com/delete",
                             {"confirm": "example.com"})
    assert sorted(out["propagation"]["acknowledged"]) == ["a", "b", "c"]
    await raw.send(b".\r\n")  # the DATA ends after the call returned: no 250
    assert (await raw.reply()).startswith("530 ")
    assert (await raw.cmd("MAIL FROM:<app@example.com>")).startswith("530 ")
    raw.close()
    for node in (a, b, c):
        raw, answer = await _login(node, user, password)
        assert answer.startswith("535 "), (change, node.host, answer)
        raw.close()
    if change == "reset-password":
        raw, answer = await _login(b, user, out["password"])
        assert answer.startswith("235 ")
        raw.close()


async def test_plan_slots_race_between_nodes(pg_dsn: str, relay_factory: RelayFactory,
                                             tmp_path: Path) -> None:
    """With room for 3 accounts, 4 concurrent adds through two nodes: exactly 3 succeed
    (the slots are counted in the write, which the control-plane version orders)."""
    names = "ab"
    nodes = [await relay_factory(
        {"smtp": {"listen": f"127.0.0.{i}:0"}, "limits": {"max_accounts": 3},
         "cluster": {"dsn": pg_dsn, "node_name": n, "key_file": str(_key(tmp_path)),
                     "heartbeat_seconds": 0.2, "fence_seconds": 1.0, "gone_seconds": 2.0}},
        data=_dir(tmp_path, n)) for i, n in enumerate(names, start=1)]
    await nodes[0].ctl.add_domain("example.com")
    results = await asyncio.gather(*(
        nodes[i % 2].ctl.call("POST", "/v1/users", {"domain": "example.com"})
        for i in range(4)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201, 201, 201, 409]
    refused = next(body for status, body in results if status == 409)
    assert refused["code"] == "plan_limit"
    for node in nodes:
        assert len((await node.ctl.ok("GET", "/v1/users"))["users"]) == 3


def _key(tmp: Path) -> Path:
    from tests.cluster_support import key_file

    return key_file(tmp)


def _dir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir(exist_ok=True)
    return path


async def test_totals_and_last_connection_merged(pg_dsn: str, relay_factory: RelayFactory,
                                                 tmp_path: Path, sink: Sink) -> None:
    """Mail delivered by two nodes adds up in one total, and the last connection is the
    latest of them, whichever node is asked; dormant listing agrees."""
    a, b, c = await three_nodes(relay_factory, pg_dsn, tmp_path)
    await a.ctl.add_domain("example.com")
    user, password = await a.ctl.add_user("example.com")
    for node, count in ((a, 2), (b, 3)):
        raw, answer = await _login(node, user, password)
        assert answer.startswith("235 ")
        for i in range(count):
            assert (await raw.transaction("app@example.com", [f"t{i}@dest.test"],
                                          message(f"t{i}"))).startswith("250 ")
        raw.close()
    await sink.wait_for(5)
    last_b = b.relay.directory.account(user).last_connection  # type: ignore[union-attr]
    assert last_b is not None
    for _ in range(100):  # each node adds its deliveries at its next flush (0.2 s here)
        shown = await c.ctl.ok("GET", f"/v1/users/{user}")
        if shown["total_sent"] == 5:
            break
        await asyncio.sleep(0.05)
    assert shown["total_sent"] == 5
    assert shown["last_connection"] == pytest.approx(last_b)
    listed = await a.ctl.ok("GET", "/v1/users", sort="sent")
    assert [(u["username"], u["total_sent"]) for u in listed["users"]] == [(user, 5)]
    dormant = await c.ctl.ok("GET", "/v1/dormant", days=1)
    assert dormant["users"] == []
