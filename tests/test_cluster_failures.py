"""Cluster mode when things break: a node cut off from PostgreSQL, a node killed, a node down
during a delete; and the operator's view of the nodes (node list, node forget).

Real PostgreSQL (tests/pg_fixtures.py), real relayd nodes (in this process, or a real
process where it must be killed), a real TCP proxy between one node and the database
(tests/tcpproxy.py) to cut it off.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from relayd.app import NotThisSpool
from tests.cluster_support import TIMING, key_file, node_config, start_node
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.pgserver import PgServer, database_name
from tests.procs import RelayProcess, free_port
from tests.rawsmtp import Raw
from tests.tcpproxy import TcpProxy
from tests.test_relayctl import relayctl

pytestmark = pytest.mark.timeout(90)


async def _health(node: RelayHandle) -> tuple[int, str]:
    url = node.metrics_url.replace("/metrics", "/health")
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        return resp.status, await resp.text()


async def _until(probe, want, within: float) -> float:  # type: ignore[no-untyped-def]
    """Poll ``probe()`` until it returns ``want``; the seconds it took (fails after ``within``)."""
    began = time.monotonic()
    while True:
        got = await probe()
        if got == want:
            return time.monotonic() - began
        assert time.monotonic() - began < within, f"still {got!r}, want {want!r}"
        await asyncio.sleep(0.05)


async def _login(node: RelayHandle, user: str, password: str) -> tuple[Raw, str]:
    raw = await Raw.open(node.host, node.port)
    return raw, await raw.login(user, password)


async def test_cut_off_node_fences_then_catches_up(pg_dsn: str, relay_factory: RelayFactory,
                                                  tmp_path: Path) -> None:
    """Node c loses PostgreSQL: within its fencing interval it refuses AUTH (454) and MAIL
    (451, also in a session authenticated before) and /health says 503. A disable made
    through node a meanwhile returns once c is declared gone, naming it. When c reaches
    the database again, it applies the disable before it opens."""
    db = urlsplit(pg_dsn)
    assert db.hostname is not None and db.port is not None
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    async with TcpProxy(db.hostname, db.port) as proxy:
        via_proxy = pg_dsn.replace(f":{db.port}/", f":{proxy.port}/")
        c = await start_node(relay_factory, via_proxy, "c", tmp_path, "127.0.0.3",
                             connect_timeout_seconds=1.0)
        await a.ctl.add_domain("example.com")
        user, password = await a.ctl.add_user("example.com")
        raw, answer = await _login(c, user, password)
        assert answer.startswith("235 ")
        assert await _health(c) == (200, "ok\n")
        proxy.cut()
        took = await _fenced(c)
        assert took < TIMING["fence_seconds"] + 1.5
        assert (await raw.cmd("MAIL FROM:<app@example.com>")).startswith("451 4.3.0 ")
        raw.close()
        raw, answer = await _login(c, user, password)
        assert answer.startswith("454 4.7.0 "), answer
        raw.close()
        began = time.monotonic()
        info = await a.ctl.ok("POST", f"/v1/users/{user}/disable")
        assert info["propagation"] == {"version": info["propagation"]["version"],
                                       "acknowledged": ["a"], "gone": ["c"]}
        assert time.monotonic() - began < TIMING["gone_seconds"] + 2.0
        proxy.restore()
        await _until(lambda: _health(c), (200, "ok\n"), within=10.0)
        raw, answer = await _login(c, user, password)
        assert answer.startswith("535 "), answer  # the disable, applied before it opened
        raw.close()


async def _fenced(node: RelayHandle) -> float:
    """Seconds until /health says fenced."""
    began = time.monotonic()
    while True:
        status, text = await _health(node)
        if status == 503:
            assert text.startswith("fenced: "), text
            return time.monotonic() - began
        assert time.monotonic() - began < 5.0, "never fenced"
        await asyncio.sleep(0.05)


async def test_node_list_and_forget(pg_dsn: str, relay_factory: RelayFactory,
                                    tmp_path: Path) -> None:
    """relayctl node list shows every node with its state; a stopped node is gone at
    once and can be forgotten; a live one cannot; an unknown name is a clear error."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    await a.ctl.add_domain("example.com")
    listed = await b.ctl.ok("GET", "/v1/nodes")
    assert [(n["name"], n["state"], n["this"], n["behind"]) for n in listed["nodes"]] == [
        ("a", "live", False, 0), ("b", "live", True, 0)]
    assert listed["version"] >= 1
    rc, out, err = await relayctl(a.ctl.path, "node", "list")
    assert rc == 0, err
    assert out.splitlines()[2].split()[:3] == ["*", "a", a.relay.cfg.smtp.listen]
    assert await a.ctl.call("POST", "/v1/nodes/b/forget") == (409, {
        "error": "node b is live (its heartbeat is recent): stop it first; only a node that"
                 " is gone can be forgotten", "code": "node_live"})
    await b.stop()
    states = {n["name"]: n["state"] for n in (await a.ctl.ok("GET", "/v1/nodes"))["nodes"]}
    assert states == {"a": "live", "b": "gone"}
    rc, out, err = await relayctl(a.ctl.path, "node", "forget", "b")
    assert (rc, out, err) == (0, "forgot node b: changes no longer wait for it\n", "")
    assert [n["name"] for n in (await a.ctl.ok("GET", "/v1/nodes"))["nodes"]] == ["a"]
    rc, out, err = await relayctl(a.ctl.path, "node", "forget", "zz")
    assert (rc, out, err) == (1, "", "relayctl: no such node: zz\n")


async def test_delete_asks_every_node(pg_dsn: str, relay_factory: RelayFactory,
                                      tmp_path: Path) -> None:
    """Mail queued on node b (its next hop is down) refuses a delete through node a, with
    the count per node; with b stopped, the delete is refused as b may hold mail; with
    --purge-queue it goes through, and b purges its spool when it starts again."""
    dead = f"127.0.0.1:{free_port()}"
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b_cfg = {"smtp": {"listen": "127.0.0.2:0"},
             "cluster": {"dsn": pg_dsn, "node_name": "b", "key_file": str(key_file(tmp_path)),
                         **TIMING}}
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = await relay_factory(b_cfg, smarthost=dead, data=b_dir)
    await a.ctl.add_domain("example.com")
    user, password = await a.ctl.add_user("example.com")
    raw, answer = await _login(b, user, password)
    assert answer.startswith("235 ")
    for i in range(2):
        assert (await raw.transaction("app@example.com", [f"r{i}@dest.test"],
                                      message(f"held {i}"))).startswith("250 ")
    raw.close()
    status, body = await a.ctl.call("POST", f"/v1/users/{user}/delete", {"confirm": user})
    assert (status, body["code"]) == (409, "queue_not_empty")
    assert "2 queued message(s) (2 on b)" in body["error"]
    await b.stop()
    status, body = await a.ctl.call("POST", f"/v1/users/{user}/delete", {"confirm": user})
    assert (status, body["code"]) == (409, "node_unreachable")
    assert "node(s) b cannot be reached" in body["error"]
    done = await a.ctl.ok("POST", f"/v1/users/{user}/delete",
                          {"confirm": user, "purge_queue": True})
    assert done["propagation"]["gone"] == ["b"]
    b = await relay_factory(b_cfg, smarthost=dead, data=b_dir)
    deleted = b.relay.directory.account(user)
    assert deleted is not None and deleted.status == "deleted"
    assert await b.relay.spool.message_count(deleted.id) == 0
    assert (await b.ctl.ok("GET", "/v1/status"))["queue"] == {
        "queued": 0, "waiting_limit": 0, "held": 0, "deferred": 0}


@pytest.mark.slow
async def test_killed_node_is_gone_then_catches_up_and_delivers(
        pg_dsn: str, relay_factory: RelayFactory, tmp_path: Path, sink: Sink,
        procs: list[RelayProcess]) -> None:
    """kill -9 node b (a real process, joined with --cluster-dsn and --node-name): a
    control call through a returns after the declared-gone interval and reports b; b
    restarts, applies what it missed before it accepts a login, and delivers the mail
    its spool kept."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    toml = (f'[cluster]\nkey_file = "{key_file(tmp_path)}"\nheartbeat_seconds = 0.2\n'
            'fence_seconds = 1.0\ngone_seconds = 2.0\n')
    b_tmp = tmp_path / "bproc"
    b_tmp.mkdir()
    dead = f"127.0.0.1:{free_port()}"
    b = RelayProcess(b_tmp, dead, toml, args=["--cluster-dsn", pg_dsn, "--node-name", "b"])
    procs.append(b)
    await b.start()
    await a.ctl.add_domain("example.com")
    user, password = await a.ctl.add_user("example.com")
    other, other_pw = await a.ctl.add_user("example.com")
    raw = await Raw.open("127.0.0.1", b.port)
    assert (await raw.login(user, password)).startswith("235 ")
    for i in range(3):
        assert (await raw.transaction("app@example.com", [f"k{i}@dest.test"],
                                      message(f"kept {i}"))).startswith("250 ")
    raw.close()
    await b.kill()
    began = time.monotonic()
    info = await a.ctl.ok("POST", f"/v1/users/{other}/disable")
    took = time.monotonic() - began
    assert info["propagation"]["gone"] == ["b"]
    assert took < TIMING["gone_seconds"] + 2.0
    b.smarthost = sink.address
    await b.start()
    raw = await Raw.open("127.0.0.1", b.port)
    assert (await raw.login(other, other_pw)).startswith("535 ")
    raw.close()
    await sink.wait_for(3, timeout=20)
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == [f"k{i}@dest.test" for i in range(3)]


async def test_node_behind_a_pruned_log_reloads(pg_dsn: str, relay_factory: RelayFactory,
                                                pg_server: PgServer, tmp_path: Path) -> None:
    """Node c, cut off while a disable is made and the change log is pruned past it,
    reloads the whole directory when it is back: the disable holds on c too."""
    db = urlsplit(pg_dsn)
    assert db.hostname is not None and db.port is not None
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    async with TcpProxy(db.hostname, db.port) as proxy:
        c = await start_node(relay_factory, pg_dsn.replace(f":{db.port}/", f":{proxy.port}/"),
                             "c", tmp_path, "127.0.0.3", connect_timeout_seconds=1.0)
        await a.ctl.add_domain("example.com")
        user, password = await a.ctl.add_user("example.com")
        proxy.cut()
        await _fenced(c)
        await a.ctl.ok("POST", f"/v1/users/{user}/disable")
        pg_server.psql("DELETE FROM changes", database_name(pg_dsn))  # pruned past c
        proxy.restore()
        await _until(lambda: _health(c), (200, "ok\n"), within=10.0)
        raw, answer = await _login(c, user, password)
        assert answer.startswith("535 "), answer
        raw.close()
        assert c.relay.directory.account(user).status == "disabled"  # type: ignore[union-attr]


async def test_postgres_restart_under_load(pg_dsn: str, relay_factory: RelayFactory,
                                           pg_server: PgServer, tmp_path: Path,
                                           sink: Sink) -> None:
    """PostgreSQL restarts while two nodes take mail: every message gets its 250 (the hot
    path never waits for the database) and is delivered; both nodes reconnect and follow
    changes again (a disable afterwards is acknowledged by both)."""
    slow = {"fence_seconds": 4.0, "gone_seconds": 8.0}
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1", **slow)
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2", **slow)
    await a.ctl.add_domain("example.com")
    user, password = await a.ctl.add_user("example.com")
    other, _ = await a.ctl.add_user("example.com")

    async def submit(node: RelayHandle, tag: str, count: int) -> int:
        raw, answer = await _login(node, user, password)
        assert answer.startswith("235 ")
        accepted = 0
        for i in range(count):
            reply = await raw.transaction("app@example.com", [f"{tag}{i}@dest.test"],
                                          message(f"{tag} {i}"))
            accepted += reply.startswith("250 ")
            await asyncio.sleep(0.005)
        raw.close()
        return accepted

    load = asyncio.gather(submit(a, "a", 100), submit(b, "b", 100))
    await asyncio.sleep(0.1)
    await asyncio.to_thread(pg_server.restart)
    assert await load == [100, 100]
    await sink.wait_for(200, timeout=30)
    assert len({m.rcpt_tos[0] for m in sink.messages}) == 200

    async def live() -> list[str]:  # both heartbeats resumed (under load it takes a while)
        nodes = (await b.ctl.ok("GET", "/v1/nodes"))["nodes"]
        return sorted(n["name"] for n in nodes if n["state"] == "live")
    await _until(live, ["a", "b"], within=30.0)
    info = await b.ctl.ok("POST", f"/v1/users/{other}/disable")
    assert sorted(info["propagation"]["acknowledged"]) == ["a", "b"]
    for node in (a, b):
        assert await _health(node) == (200, "ok\n")


async def test_control_call_without_the_database_is_refused(
        pg_dsn: str, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """A control call on a node cut off from PostgreSQL answers 503 cluster_unavailable and
    changes nothing: the account it would have disabled still works there."""
    db = urlsplit(pg_dsn)
    assert db.hostname is not None and db.port is not None
    async with TcpProxy(db.hostname, db.port) as proxy:
        a = await start_node(relay_factory, pg_dsn.replace(f":{db.port}/", f":{proxy.port}/"),
                             "a", tmp_path, "127.0.0.1", connect_timeout_seconds=1.0,
                             fence_seconds=3.0, gone_seconds=6.0)
        await a.ctl.add_domain("example.com")
        user, password = await a.ctl.add_user("example.com")
        proxy.cut()
        status, body = await a.ctl.call("POST", f"/v1/users/{user}/disable")
        assert (status, body["code"]) == (503, "cluster_unavailable"), body
        raw, answer = await _login(a, user, password)  # not fenced yet: 3 s
        assert answer.startswith("235 "), answer
        raw.close()
        proxy.restore()
        await _until(lambda: _health(a), (200, "ok\n"), within=10.0)
        assert (await a.ctl.ok("GET", f"/v1/users/{user}"))["status"] == "active"


async def test_node_with_another_key_exits_2(pg_dsn: str, relay_factory: RelayFactory,
                                             tmp_path: Path) -> None:
    """A node whose [cluster] key_file differs from the cluster's is refused at start (exit
    2, naming the key), even before any DKIM key is stored: the first node sealed a check."""
    await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    other = tmp_path / "other"
    other.mkdir()
    key = other / "other.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    config = other / "relayd.toml"
    config.write_text(f'[cluster]\nkey_file = "{key}"\n[metrics]\nlisten = ""\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd.app", "--config", str(config), "--cluster-dsn", pg_dsn,
        "--node-name", "b", "--listen", "127.0.0.2:0", "--data-dir", str(other / "var"),
        "--control-socket", str(other / "var" / "control.sock"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, err.decode()
    assert "cluster.key_file" in err.decode() and "another key" in err.decode()


async def test_a_data_directory_belongs_to_one_kind_of_node(
        pg_dsn: str, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """A single node's data directory (it holds domains) is refused as a cluster node's, and
    a cluster node's is refused to a single node: their account ids mean other accounts."""
    single = tmp_path / "single"
    single.mkdir()
    one = await relay_factory({}, data=single)
    await one.ctl.add_domain("example.com")
    await one.stop()
    cluster_cfg = node_config(pg_dsn, "a", tmp_path, "127.0.0.1")
    with pytest.raises(NotThisSpool, match="single node's spool"):
        await relay_factory(cluster_cfg, data=single)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    node = await relay_factory(cluster_cfg, data=node_dir)
    await node.stop()
    with pytest.raises(NotThisSpool, match="belongs to a node of cluster"):
        await relay_factory({}, data=node_dir)
    again = await relay_factory(cluster_cfg, data=node_dir)  # its own cluster: fine
    assert await _health(again) == (200, "ok\n")
