"""Message-level control (issue 16 items 4 and 8): ``queue hold|release|delete ID``,
``log --message ID``, ``purged`` in the delivery log, DSNs logged as bounces.

Real SMTP in and out: the relay's next hop is a port where nothing listens (mail is
deferred) until a sink is started on it; the control socket and relayctl are real.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from control import schemas
from tests.conftest import RelayFactory, RelayHandle, Sink, decode, start_sink
from tests.procs import free_port
from tests.test_queue_support import eventually, log_entries, queue_items, submit
from tests.test_relayctl import relayctl


async def _down_relay(relay_factory: RelayFactory, port: int,
                      **kw: Any) -> tuple[RelayHandle, tuple[str, str]]:
    """A relay whose next hop (127.0.0.1:port) is down, with one account of example.com."""
    relay = await relay_factory(smarthost=f"127.0.0.1:{port}", **kw)
    if not (await relay.ctl.ok("GET", "/v1/domains"))["domains"]:
        await relay.ctl.add_domain("example.com")
    return relay, await relay.ctl.add_user("example.com")


async def _deferred(relay: RelayHandle, account: tuple[str, str],
                    rcpts: list[str] | None = None) -> str:
    """One message sent and deferred (its first attempt refused): its id."""
    [mid] = await submit(relay, account, rcpts or ["r@dest.test"])

    async def deferred() -> bool:
        return any(i["id"] == mid and i["state"] == "deferred" for i in await queue_items(relay))
    await eventually(deferred)
    return mid


async def _history(relay: RelayHandle, mid: str) -> list[dict[str, Any]]:
    return await log_entries(relay, message=mid)


async def test_hold_is_not_retried_release_delivers(relay_factory: RelayFactory) -> None:
    """A held deferred message is not attempted when the next hop is back, not even by
    ``queue retry``; released, it is delivered at once; its history shows every attempt."""
    port = free_port()
    relay, account = await _down_relay(relay_factory, port)
    mid = await _deferred(relay, account)
    item = await relay.ctl.ok("POST", f"/v1/queue/{mid.lower()}/hold")
    assert (item["id"], item["state"], item["held_by"]) == (mid, "held", "operator")
    assert [(i["id"], i["state"], i["held_by"]) for i in await queue_items(relay, state="held")] \
        == [(mid, "held", "operator")]
    assert await queue_items(relay, state="deferred") == []
    again = await relay.ctl.ok("POST", f"/v1/queue/{mid}/hold")  # holding again: no change
    assert again["held_by"] == "operator"

    sink = await start_sink(Sink(), port)
    try:
        assert (await relay.ctl.ok("POST", "/v1/queue/retry", {}))["count"] == 0
        relay.relay.scheduler.wake_retry()
        await asyncio.sleep(0.5)
        assert sink.messages == []
        assert [e["outcome"] for e in await _history(relay, mid)] == ["deferred"]

        released = await relay.ctl.ok("POST", f"/v1/queue/{mid}/release")
        assert released["id"] == mid and released["held_by"] is None
        [got] = await sink.wait_for(1)
        assert got.rcpt_tos == ["r@dest.test"]

        async def both() -> list[dict[str, Any]] | None:
            h = await _history(relay, mid)
            return h if len(h) == 2 else None
        history = await eventually(both)
        assert [e["outcome"] for e in history] == ["deferred", "delivered"]  # oldest first
        assert all(e["message_id"] == mid and e["kind"] == "message" for e in history)
        assert await queue_items(relay) == []
        assert (await relay.ctl.ok("GET", f"/v1/users/{account[0]}"))["total_sent"] == 1
    finally:
        assert sink.server is not None
        sink.server.close()


async def test_hold_survives_a_restart(relay_factory: RelayFactory, tmp_path: Path) -> None:
    """The hold is in the spool: after a restart a held message (due retry, and one never
    attempted) is neither retried nor dispatched, until released."""
    port = free_port()
    relay, account = await _down_relay(relay_factory, port)
    retry_mid = await _deferred(relay, account)
    fresh_mid = await _deferred(relay, account, ["s@dest.test"])
    for mid in (retry_mid, fresh_mid):
        await relay.ctl.ok("POST", f"/v1/queue/{mid}/hold")
    await relay.stop()
    db = sqlite3.connect(relay.data_dir / "relayd.sqlite3")
    with db:  # one due at once, the other never attempted (as if the first attempt never ran)
        db.execute("UPDATE recipients SET next_attempt=0 WHERE message_id=?",
                   (int(retry_mid, 16),))
        db.execute("UPDATE recipients SET status='queued', attempts=0, next_attempt=NULL"
                   " WHERE message_id=?", (int(fresh_mid, 16),))
    db.close()

    sink = await start_sink(Sink(), port)
    try:
        relay = await relay_factory(smarthost=f"127.0.0.1:{port}",
                                    extra={"spool": {"reconcile_seconds": 0.2}})
        await asyncio.sleep(0.8)  # retry loop, dispatch loop and reconciliations ran
        assert sink.messages == []
        items = {i["id"]: (i["state"], i["held_by"]) for i in await queue_items(relay)}
        assert items == {retry_mid: ("held", "operator"), fresh_mid: ("held", "operator")}
        await relay.ctl.ok("POST", f"/v1/queue/{fresh_mid}/release")
        [got] = await sink.wait_for(1)
        assert got.rcpt_tos == ["s@dest.test"]
        await asyncio.sleep(0.3)
        assert len(sink.messages) == 1  # the other one is still held
        await relay.ctl.ok("POST", f"/v1/queue/{retry_mid}/release")
        await sink.wait_for(2)
        await eventually(lambda: _empty(relay))
    finally:
        assert sink.server is not None
        sink.server.close()


async def _empty(relay: RelayHandle) -> bool:
    return await queue_items(relay) == []


async def test_delete_removes_for_good_and_logs_purged(relay_factory: RelayFactory) -> None:
    """queue delete: gone from the queue and the account's count, never delivered, each
    recipient logged ``purged``; the metric counts them."""
    port = free_port()
    relay, account = await _down_relay(relay_factory, port)
    mid = await _deferred(relay, account, ["a@dest.test", "b@dest.test"])
    keep = await _deferred(relay, account)
    assert (await relay.ctl.ok("POST", f"/v1/queue/{mid}/delete"))["count"] == 1
    assert [i["id"] for i in await queue_items(relay)] == [keep]
    assert (await relay.ctl.ok("GET", f"/v1/users/{account[0]}"))["queued"] == 1
    history = await _history(relay, mid)
    assert [e["outcome"] for e in history] == ["deferred", "deferred", "purged", "purged"]
    assert {e["recipient"] for e in history[2:]} == {"a@dest.test", "b@dest.test"}
    assert all("queue delete" in e["text"] for e in history[2:])
    assert {e["message_id"] for e in await log_entries(relay, status="purged")} == {mid}
    status, err = await relay.ctl.call("POST", f"/v1/queue/{mid}/delete")
    assert (status, err["code"]) == (404, "not_found")

    sink = await start_sink(Sink(), port)
    try:
        await relay.ctl.ok("POST", "/v1/queue/retry", {})
        [got] = await sink.wait_for(1)
        assert got.rcpt_tos == ["r@dest.test"]  # only the one kept
        await asyncio.sleep(0.2)
        assert len(sink.messages) == 1
    finally:
        assert sink.server is not None
        sink.server.close()
    async with aiohttp.ClientSession() as s, s.get(relay.metrics_url) as resp:
        text = await resp.text()
    assert 'relayd_delivery_attempts_total{outcome="purged"} 2.0' in text


async def test_purge_user_delete_and_domain_delete(relay_factory: RelayFactory) -> None:
    """queue purge and user delete --purge-queue log ``purged``; a domain delete removes
    no mail (its deferred mail keeps its schedule: no ``purged`` row) until its account
    is deleted with --purge-queue."""
    port = free_port()
    relay, a = await _down_relay(relay_factory, port)
    b = await relay.ctl.add_user()
    await relay.ctl.add_domain("example.org")
    c = await relay.ctl.add_user("example.org")
    ma = await _deferred(relay, a)
    mb = await _deferred(relay, b)
    [mc] = await submit(relay, c, ["c@dest.test"], sender="app@example.org")
    await eventually(lambda: _has(relay, mc, "deferred"))

    assert (await relay.ctl.ok("POST", "/v1/queue/purge", {"user": a[0]}))["count"] == 1
    await relay.ctl.ok("POST", f"/v1/users/{b[0]}/delete",
                       {"confirm": b[0], "purge_queue": True})
    dd = await relay.ctl.ok("POST", "/v1/domains/example.org/delete", {"confirm": "example.org"})
    assert dd["accounts_disabled"] == 1
    purged = {e["message_id"]: e for e in await log_entries(relay, status="purged")}
    assert set(purged) == {ma, mb}
    assert "queue purge" in purged[ma]["text"] and purged[ma]["username"] == a[0]
    assert "account deleted" in purged[mb]["text"] and purged[mb]["username"] == b[0]
    assert await _has(relay, mc, "deferred")  # the domain delete removed nothing

    await relay.ctl.ok("POST", f"/v1/users/{c[0]}/delete", {"confirm": c[0], "purge_queue": True})
    assert [e["outcome"] for e in await _history(relay, mc)] == ["deferred", "purged"]
    assert await queue_items(relay) == []


async def _count(relay: RelayHandle, mid: str, n: int) -> bool:
    return len(await _history(relay, mid)) >= n


async def _has(relay: RelayHandle, mid: str, state: str) -> bool:
    return any(i["id"] == mid and i["state"] == state for i in await queue_items(relay))


async def test_account_hold_and_operator_hold(relay_factory: RelayFactory) -> None:
    """Mail of a disabled account is ``held`` by ``account``; an operator's hold of it
    outlasts ``user enable``; released, it goes (a first attempt)."""
    port = free_port()
    relay, account = await _down_relay(relay_factory, port)
    user = account[0]
    await relay.ctl.ok("POST", f"/v1/users/{user}/limits", {"per_minute": 1})
    await _deferred(relay, account)
    [mid] = await submit(relay, account, ["w@dest.test"])  # over the limit: never attempted
    await eventually(lambda: _has(relay, mid, "waiting_limit"))
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    [item] = [i for i in await queue_items(relay) if i["id"] == mid]
    assert (item["state"], item["held_by"]) == ("held", "account")
    await relay.ctl.ok("POST", f"/v1/queue/{mid}/hold")
    await relay.ctl.ok("POST", f"/v1/users/{user}/enable")
    await relay.ctl.ok("POST", f"/v1/users/{user}/limits", {"per_minute": 0})
    sink = await start_sink(Sink(), port)
    try:
        await asyncio.sleep(0.4)
        assert sink.messages == []
        [item] = [i for i in await queue_items(relay) if i["id"] == mid]
        assert (item["state"], item["held_by"]) == ("held", "operator")
        released = await relay.ctl.ok("POST", f"/v1/queue/{mid}/release")
        assert released["held_by"] is None
        [got] = await sink.wait_for(1)
        assert got.rcpt_tos == ["w@dest.test"]
    finally:
        assert sink.server is not None
        sink.server.close()


async def test_dsn_is_logged_as_bounce_and_not_counted(relay: RelayHandle, sink: Sink,
                                                       account: tuple[str, str]) -> None:
    """A DSN relayd generated is logged with kind ``bounce`` and is not in total sent."""
    sink.script.append("554 5.7.1 rejected by policy")
    [mid] = await submit(relay, account, ["r@dest.test"])
    [dsn] = await sink.wait_for(1)
    assert dsn.mail_from == "<>"

    async def bounce() -> list[dict[str, Any]]:
        return [e for e in await log_entries(relay) if e["kind"] == "bounce"]
    [entry] = await eventually(bounce)
    assert (entry["outcome"], entry["recipient"]) == ("delivered", "app@example.com")
    assert entry["message_id"] != mid
    assert [e["outcome"] for e in await _history(relay, mid)] == ["failed"]
    await submit(relay, account, ["ok@dest.test"])
    await sink.wait_for(2)

    async def sent() -> int:
        info = await relay.ctl.ok("GET", f"/v1/users/{account[0]}")
        return int(info["total_sent"]) if info["queued"] == 0 else -1
    await eventually(lambda: _equals(sent, 1))
    await asyncio.sleep(0.1)
    row = await relay.relay.spool.fetchone("SELECT total_sent FROM accounts WHERE username=?",
                                           (account[0],))
    assert row[0] == 1


async def _equals(probe: Any, want: int) -> bool:
    return bool(await probe() == want)


async def test_control_api_errors(relay: RelayHandle, account: tuple[str, str]) -> None:
    """A malformed id is a 400 naming it, an unknown one a 404; ``log?message=`` too."""
    for action in ("hold", "release", "delete"):
        status, err = await relay.ctl.call("POST", f"/v1/queue/not-an-id/{action}")
        assert (status, err["code"]) == (400, "bad_request"), action
        assert "16 hex digits" in err["error"]
        status, err = await relay.ctl.call("POST", f"/v1/queue/{'0' * 16}/{action}")
        assert (status, err["code"]) == (404, "not_found"), action
    status, err = await relay.ctl.call("GET", "/v1/log", query={"message": "xyz"})
    assert status == 400 and "message" in err["error"]
    got = await relay.ctl.ok("GET", "/v1/log", message="00000000000000AB")
    assert decode(got, schemas.LogList).entries == []


async def test_relayctl_outputs(relay_factory: RelayFactory) -> None:
    """relayctl queue hold/release/delete and log --message: text and --json; one-line
    errors with the CLI's exit codes (2: not an id, 1: refused)."""
    port = free_port()
    relay, account = await _down_relay(relay_factory, port)
    sock = relay.ctl.path
    mid = await _deferred(relay, account)

    rc, out, err = await relayctl(sock, "queue", "hold", mid.lower())
    assert rc == 0, err
    assert out.strip() == f"{mid} ({account[0]}): held (operator)"
    rc, out, _ = await relayctl(sock, "queue", "list")
    assert "held (operator)" in out
    rc, out, err = await relayctl(sock, "--json", "queue", "release", mid)
    assert rc == 0, err
    item = decode(json.loads(out), schemas.QueueItem)
    assert item.id == mid and item.state == "deferred" and item.held_by is None
    await eventually(lambda: _count(relay, mid, 2))  # released: attempted again at once
    rc, out, err = await relayctl(sock, "--json", "log", "--message", mid)
    assert rc == 0, err
    lst = decode(json.loads(out), schemas.LogList)
    assert [(e.message_id, e.outcome, e.kind) for e in lst.entries] == \
        [(mid, "deferred", "message")] * 2
    rc, out, err = await relayctl(sock, "queue", "delete", mid)
    assert rc == 0 and out.strip() == f"deleted {mid}: its recipients are logged as purged"
    rc, out, err = await relayctl(sock, "log", "--message", mid)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["TIME", "MESSAGE", "USER"]
    assert "deferred" in lines[2] and "purged" in lines[3] and len(lines) == 4
    rc, out, err = await relayctl(sock, "log", "--status", "purged")
    assert rc == 0 and mid in out

    for args in (("queue", "hold", "xyz"), ("queue", "delete", "12"),
                 ("log", "--message", "not-hex-digits!!")):
        rc, out, err = await relayctl(sock, *args)
        assert rc == 2 and out == "", args
        assert len(err.strip().splitlines()) == 1 and "not a message id" in err, err
    for action in ("hold", "release", "delete"):
        rc, out, err = await relayctl(sock, "queue", action, mid)
        assert rc == 1 and out == ""
        assert err.strip() == f"relayctl: no such queued message: {mid}", err
