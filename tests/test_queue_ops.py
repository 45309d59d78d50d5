"""Operator queue and log operations through the control socket: list, show,
purge, retry, and the delivery-log filters, retention and pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.conftest import RelayHandle, Sink
from tests.test_queue_support import (
    FakeClock,
    eventually,
    install_clock,
    log_entries,
    queue_items,
    submit,
)

LATER = "later@dest.test"


@dataclass
class Setup:
    """What ``_setup`` made."""

    clock: FakeClock
    a: str
    b: str
    waiting: list[str]  # A's two messages waiting for the limit
    deferred: list[str]  # B's deferred message
    a_password: str


async def _setup(relay: RelayHandle, sink: Sink) -> Setup:
    """Account A: 1 delivered + 2 waiting for its limit; account B: 1 deferred, 1 failed."""
    clock = install_clock(relay)
    sink.rcpt_script[LATER] = "451 4.3.0 try later"
    sink.rcpt_script["gone@dest.test"] = "550 5.1.1 no such user"
    await relay.ctl.add_domain("example.com")
    a = await relay.ctl.add_user("example.com")
    b = await relay.ctl.add_user("example.com")
    await relay.ctl.ok("POST", f"/v1/users/{a[0]}/limits", {"per_minute": 1})
    a_ids = await submit(relay, a, ["ok@dest.test"], count=3)
    b_ids = await submit(relay, b, [LATER])
    await submit(relay, b, ["gone@dest.test"])

    async def settled() -> bool:
        items = await queue_items(relay)
        states = sorted(i["state"] for i in items)
        entries = await log_entries(relay)
        return states == ["deferred", "waiting_limit", "waiting_limit"] and len(entries) >= 4

    await eventually(settled)
    return Setup(clock, a[0], b[0], a_ids[1:], b_ids, a[1])


async def test_queue_list_filters(relay: RelayHandle, sink: Sink) -> None:
    """``queue list --user`` and ``--state`` select exactly the matching messages."""
    st = await _setup(relay, sink)
    a, b, waiting, deferred = st.a, st.b, st.waiting, st.deferred
    assert sorted(i["id"] for i in await queue_items(relay, user=a)) == waiting
    assert [i["id"] for i in await queue_items(relay, user=b)] == deferred
    assert sorted(i["id"] for i in await queue_items(relay, state="waiting_limit")) == waiting
    assert [i["id"] for i in await queue_items(relay, state="deferred")] == deferred
    assert await queue_items(relay, state="held") == []
    assert await queue_items(relay, user=b, state="waiting_limit") == []
    status, _ = await relay.ctl.call("GET", "/v1/queue", query={"state": "bogus"})
    assert status == 400


async def test_queue_show(relay: RelayHandle, sink: Sink) -> None:
    """``queue show ID`` gives one message's state, recipients, attempts and last error."""
    st = await _setup(relay, sink)
    b, [mid] = st.b, st.deferred
    item = await relay.ctl.ok("GET", f"/v1/queue/{mid}")
    assert (item["username"], item["state"], item["recipients"], item["attempts"]) == (
        b, "deferred", [LATER], 1)
    assert item["last_error"] == "4.3.0 try later"
    status, _ = await relay.ctl.call("GET", "/v1/queue/00000000000000AA")
    assert status == 404


async def test_queue_purge_by_user(relay: RelayHandle, sink: Sink) -> None:
    """``queue purge --user A`` removes A's mail for good and leaves B's queued."""
    st = await _setup(relay, sink)
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": st.a})
    assert r["count"] == 2
    assert [i["id"] for i in await queue_items(relay)] == st.deferred
    st.clock.advance(60)  # A's window reopens for one message: it must be a new one
    await submit(relay, (st.a, st.a_password), ["fresh@dest.test"])
    await eventually(lambda: _arrived(sink, "fresh@dest.test"))
    assert [m.rcpt_tos for m in sink.messages if m.rcpt_tos != ["app@example.com"]] == [
        ["ok@dest.test"], ["fresh@dest.test"]]


async def test_queue_purge_by_state(relay: RelayHandle, sink: Sink) -> None:
    """``queue purge --state`` removes only mail in that state."""
    st = await _setup(relay, sink)
    a, b, waiting = st.a, st.b, st.waiting
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": a, "state": "queued"})
    assert r["count"] == 0  # A's mail is waiting for its limit, not queued
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": b, "state": "deferred"})
    assert r["count"] == 1
    assert sorted(i["id"] for i in await queue_items(relay)) == waiting
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": a, "state": "waiting_limit"})
    assert r["count"] == 2 and await queue_items(relay) == []


async def test_queue_retry_by_user(relay: RelayHandle, sink: Sink) -> None:
    """``queue retry --user`` makes only that account's deferred mail due now."""
    st = await _setup(relay, sink)
    a, b, [mid] = st.a, st.b, st.deferred
    del sink.rcpt_script[LATER]
    r = await relay.ctl.ok("POST", "/v1/queue/retry", {"user": a})
    assert r["count"] == 0
    assert [i["id"] for i in await queue_items(relay, state="deferred")] == [mid]
    r = await relay.ctl.ok("POST", "/v1/queue/retry", {"user": b})
    assert r["count"] == 1
    got = await eventually(lambda: _arrived(sink, LATER))
    assert got
    await eventually(lambda: _no_deferred(relay))


async def _arrived(sink: Sink, rcpt: str) -> bool:
    return any(m.rcpt_tos == [rcpt] for m in sink.messages)


async def _no_deferred(relay: RelayHandle) -> bool:
    return await queue_items(relay, state="deferred") == []


async def test_log_filters(relay: RelayHandle, sink: Sink) -> None:
    """``log --user/--status/--since/--limit`` return exactly the matching attempts."""
    st = await _setup(relay, sink)
    clock, a, b, waiting, [mid] = st.clock, st.a, st.b, st.waiting, st.deferred

    def view(entries: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        return sorted((e["username"], e["recipient"], e["outcome"]) for e in entries)

    assert view(await log_entries(relay, user=a)) == [(a, "ok@dest.test", "delivered")]
    assert view(await log_entries(relay, user=b)) == [
        (b, "app@example.com", "delivered"),  # the DSN for gone@ belongs to the account too
        (b, "gone@dest.test", "failed"), (b, LATER, "deferred")]
    assert view(await log_entries(relay, status="deferred")) == [(b, LATER, "deferred")]
    assert view(await log_entries(relay, status="failed")) == [(b, "gone@dest.test", "failed")]
    delivered = await log_entries(relay, status="delivered")
    assert {e["recipient"] for e in delivered} == {"ok@dest.test", "app@example.com"}  # + DSN
    queued = await log_entries(relay, status="queued", user=a)
    assert sorted(e["message_id"] for e in queued) == waiting
    assert len(await log_entries(relay, limit=2)) == 2
    [entry] = await log_entries(relay, status="deferred")
    assert entry["message_id"] == mid and entry["code"] == 451
    assert entry["next_hop"] == sink.address and entry["domain"] == "example.com"
    assert await log_entries(relay, since=clock.now + 1) == []
    assert len(await log_entries(relay, since=clock.now - 1)) == 4


async def test_log_kept_after_account_deletion(relay: RelayHandle, sink: Sink,
                                               account: tuple[str, str]) -> None:
    """Deleting the account keeps its delivery history, with the username as text."""
    user, _ = account
    await submit(relay, account, ["r@dest.test"])
    await sink.wait_for(1)
    await eventually(lambda: log_entries(relay, user=user))
    await eventually(lambda: _idle(relay))
    await relay.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    [entry] = await log_entries(relay, user=user)
    assert (entry["username"], entry["outcome"]) == (user, "delivered")


async def _idle(relay: RelayHandle) -> bool:
    row = await relay.relay.spool.fetchone("SELECT COUNT(*) FROM messages")
    return bool(row[0] == 0)


async def test_log_pruned_after_retention(relay: RelayHandle, sink: Sink,
                                          account: tuple[str, str]) -> None:
    """Entries older than ``delivery_log_retention_days`` are pruned, newer ones kept."""
    clock = install_clock(relay)
    await submit(relay, account, ["old@dest.test"])
    await eventually(lambda: log_entries(relay))
    clock.advance(20 * 86400)
    await submit(relay, account, ["new@dest.test"])
    await eventually(lambda: _n_log(relay, 2))
    clock.advance(11 * 86400)  # the first is now 31 days old, the second 11
    assert await relay.relay.lifecycle.prune_delivery_log() == 1
    assert [e["recipient"] for e in await log_entries(relay)] == ["new@dest.test"]


async def _n_log(relay: RelayHandle, n: int) -> bool:
    return len(await log_entries(relay)) >= n
