"""The retry queue: temporary failures defer with backoff, permanent ones fail at once
and bounce, status is kept per recipient, and an idle retry queue costs nothing."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from tests.conftest import RelayFactory, RelayHandle, Sink
from tests.test_queue_support import (
    eventually,
    install_clock,
    log_entries,
    message_log,
    queue_items,
    submit,
)


async def _outcomes(relay: RelayHandle, n: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        entries = await log_entries(relay)
        return entries if len(entries) >= n else None
    entries: list[dict[str, Any]] = await eventually(enough)
    return entries


async def _spool_empty(relay: RelayHandle) -> bool:
    row = await relay.relay.spool.fetchone("SELECT COUNT(*) FROM messages")
    return bool(row[0] == 0 and relay.relay.scheduler.ledger.running == 0)


async def test_4xx_defers_then_retry_after_backoff_delivers(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """A 451 defers the recipient until the backoff has passed; the retry then delivers."""
    clock = install_clock(relay)
    sink.script.append("451 4.3.0 try later")
    [mid] = await submit(relay, account, ["r@dest.test"])
    [entry] = await _outcomes(relay, 1)
    assert (entry["outcome"], entry["code"]) == ("deferred", 451)
    [item] = await queue_items(relay, state="deferred")
    assert item["id"] == mid and item["attempts"] == 1
    delay = item["next_attempt"] - clock.now
    assert 300 * 0.8 - 1 <= delay <= 300 * 1.2 + 1  # retry_first_seconds with 20 % jitter

    clock.advance(delay - 5)  # not yet due
    relay.relay.scheduler.wake_retry()
    await asyncio.sleep(0.1)
    assert sink.messages == [] and len(await log_entries(relay)) == 1

    clock.advance(10)
    relay.relay.scheduler.wake_retry()
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["r@dest.test"]
    entries = await _outcomes(relay, 2)
    assert [e["outcome"] for e in entries] == ["delivered", "deferred"]
    await eventually(lambda: _spool_empty(relay))
    assert await queue_items(relay) == []


async def test_5xx_fails_at_once_with_one_dsn(relay: RelayHandle, sink: Sink,
                                              account: tuple[str, str]) -> None:
    """A 554 fails the recipient without retry and sends exactly one DSN to the sender."""
    sink.script.append("554 5.7.1 rejected by policy")
    [mid] = await submit(relay, account, ["r@dest.test"], sender="app@example.com")
    [dsn] = await sink.wait_for(1)
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["app@example.com"]
    assert b"multipart/report; report-type=delivery-status" in dsn.data
    assert b"Final-Recipient: rfc822; r@dest.test" in dsn.data
    assert b"554" in dsn.data and b"Status: 5.7.1" in dsn.data
    assert b"Subject: m0" in dsn.data  # the original headers are enclosed
    await eventually(lambda: _spool_empty(relay))
    failed = await message_log(relay, mid, 1)
    assert [(e["outcome"], e["code"]) for e in failed] == [("failed", 554)]
    assert len(sink.messages) == 1
    assert await queue_items(relay) == []


async def test_mixed_recipients_keep_their_own_status(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """One recipient delivered, one deferred, one failed: each is logged and queued as such."""
    clock = install_clock(relay)
    sink.rcpt_script["later@dest.test"] = "450 4.2.1 mailbox busy"
    sink.rcpt_script["bad@dest.test"] = "550 5.1.1 no such user"
    [mid] = await submit(relay, account, ["ok@dest.test", "later@dest.test", "bad@dest.test"])
    got = await sink.wait_for(2)  # the message to ok@, and the DSN for bad@
    by_rcpt = {tuple(m.rcpt_tos): m for m in got}
    assert set(by_rcpt) == {("ok@dest.test",), ("app@example.com",)}
    dsn = by_rcpt[("app@example.com",)].data
    assert b"bad@dest.test" in dsn and b"later@dest.test" not in dsn
    entries = {e["recipient"]: e for e in await message_log(relay, mid, 3)}
    assert {r: (e["outcome"], e["code"]) for r, e in entries.items()} == {
        "ok@dest.test": ("delivered", 250), "later@dest.test": ("deferred", 450),
        "bad@dest.test": ("failed", 550)}
    [item] = await queue_items(relay)
    assert (item["id"], item["state"], item["recipients"]) == (mid, "deferred",
                                                               ["later@dest.test"])
    shown = await relay.ctl.ok("GET", f"/v1/queue/{mid}")
    assert shown["last_error"] == "4.2.1 mailbox busy"

    del sink.rcpt_script["later@dest.test"]
    clock.advance(400)
    relay.relay.scheduler.wake_retry()
    got = await sink.wait_for(3)
    assert got[2].rcpt_tos == ["later@dest.test"]  # only the deferred one, no duplicate
    await eventually(lambda: _spool_empty(relay))
    assert await queue_items(relay) == []


async def test_queue_lifetime_exceeded_fails_and_bounces(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """A recipient still deferred after the queue lifetime (5 days) fails and bounces."""
    clock = install_clock(relay)
    sink.script.extend(["451 4.3.0 try later"] * 2)
    [mid] = await submit(relay, account, ["r@dest.test"])
    await _outcomes(relay, 1)
    clock.advance(5 * 86400 + 1)
    relay.relay.scheduler.wake_retry()
    [dsn] = await sink.wait_for(1)
    assert dsn.rcpt_tos == ["app@example.com"]
    assert b"Status: 4.4.7" in dsn.data  # RFC 3463: delivery time expired
    [last, _first] = await message_log(relay, mid, 2)
    assert last["outcome"] == "failed" and "queue lifetime" in last["text"]
    await eventually(lambda: _spool_empty(relay))


async def test_bounces_can_be_turned_off(relay_factory: RelayFactory, sink: Sink) -> None:
    """With ``[delivery] bounces = false`` a permanent failure sends no DSN."""
    relay = await relay_factory({"delivery": {"bounces": False}})
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    sink.script.append("550 5.1.1 no such user")
    await submit(relay, account, ["r@dest.test"])
    await _outcomes(relay, 1)
    await eventually(lambda: _spool_empty(relay))
    await submit(relay, account, ["s@dest.test"])  # a later message still flows
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["s@dest.test"]


async def test_a_bounce_never_bounces(relay: RelayHandle, sink: Sink,
                                      account: tuple[str, str]) -> None:
    """A DSN that itself fails permanently is dropped without a second DSN."""
    sink.rcpt_script["app@example.com"] = "550 5.1.1 sender mailbox gone"
    sink.script.append("554 5.7.1 rejected")
    await submit(relay, account, ["r@dest.test"])
    entries = await _outcomes(relay, 2)
    assert [(e["recipient"], e["outcome"]) for e in entries] == [
        ("app@example.com", "failed"), ("r@dest.test", "failed")]
    await eventually(lambda: _spool_empty(relay))
    await asyncio.sleep(0.1)
    assert len(await log_entries(relay)) == 2 and sink.messages == []


async def test_retry_loop_wakes_by_itself_when_due(relay_factory: RelayFactory,
                                                   sink: Sink) -> None:
    """Without any nudge, a deferred recipient is retried when its time comes."""
    relay = await relay_factory({"delivery": {"retry_first_seconds": 0.3,
                                              "retry_jitter": 0.0}})
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    sink.script.append("421 4.3.2 shutting down")
    await submit(relay, account, ["r@dest.test"])
    [got] = await sink.wait_for(1, timeout=5)
    assert got.rcpt_tos == ["r@dest.test"]


async def test_idle_retry_queue_does_not_poll(relay: RelayHandle, sink: Sink,
                                              account: tuple[str, str]) -> None:
    """With deferred mail far in the future the retry loop makes no query while idle."""
    sink.script.extend(["451 4.3.0 later"] * 20)
    await submit(relay, account, ["r@dest.test"], count=20)
    await _outcomes(relay, 20)
    spool = relay.relay.spool
    queries: list[str] = []
    real = spool.fetchall

    async def counting(sql: str, params: Any = ()) -> list[sqlite3.Row]:
        if "next_attempt" in sql:
            queries.append(sql)
        return await real(sql, params)

    spool.fetchall = counting  # type: ignore[method-assign]
    relay.relay.scheduler.wake_retry()  # one look at the queue, then sleep
    await asyncio.sleep(0.5)
    assert len(queries) <= 1


async def test_due_mail_is_found_through_the_index(relay: RelayHandle,
                                                   account: tuple[str, str]) -> None:
    """The retry queries read the ``recipients_due`` index, never scan the table."""
    db = sqlite3.connect(f"file:{relay.data_dir / 'relayd.sqlite3'}?mode=ro", uri=True)
    try:
        for sql in ("SELECT MIN(next_attempt) FROM recipients WHERE status='deferred'",
                    "SELECT r.message_id, r.idx FROM recipients r JOIN messages m"
                    " ON m.id = r.message_id WHERE r.status='deferred' AND r.next_attempt <= 1"
                    " ORDER BY r.next_attempt LIMIT 500"):
            plan = " ".join(str(row[3]) for row in db.execute("EXPLAIN QUERY PLAN " + sql))
            assert "recipients_due" in plan, plan
            assert "SCAN r " not in plan + " " and "SCAN recipients " not in plan + " ", plan
    finally:
        db.close()
