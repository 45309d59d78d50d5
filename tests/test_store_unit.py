"""The store built directly on a file (no running relay): the directory store's methods
and the spool's named queue methods."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd.store import removal
from relayd.store.directory import (
    DirectoryStore,
    DomainExists,
    NetworkBinding,
    NewAccount,
    NewDomain,
    QueueNotEmpty,
    SqliteDirectory,
)
from relayd.store.records import AttemptResult, NewMessage
from relayd.store.spool import Spool


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(str(tmp_path / "spool.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _domain(name: str, selector: str, key: bytes | None = b"KEY") -> NewDomain:
    return NewDomain(name=name, selector=selector, algorithm="rsa", private_key=key,
                     ed25519_selector=selector + "e", ed25519_key=b"ED", created_at=10.0)


def _no_check(bindings: list[NetworkBinding]) -> None:
    pass


def _msg(spool: Spool, account_id: int, rcpts: int = 1) -> NewMessage:
    return NewMessage(id=spool.ids.next(), account_id=account_id, username=f"u{account_id}",
                      domain="example.com", sender="a@example.com",
                      recipients=[f"r{i}@dest.test" for i in range(rcpts)], data=b"x\r\n",
                      received_at=1.0)


def _deferred(m: NewMessage, idx: int, due: float) -> AttemptResult:
    return AttemptResult(message_id=m.id, idx=idx, recipient=m.recipients[idx],
                         username=m.username, domain=m.domain, next_hop="h", code=451,
                         text="later", outcome="deferred", ts=2.0, next_attempt=due)


async def test_sqlite_directory_is_a_directory_store(spool: Spool) -> None:
    """SqliteDirectory has every method of the protocol (what a second store must offer)."""
    store: DirectoryStore = SqliteDirectory(spool)
    names = [n for n in vars(DirectoryStore) if not n.startswith("_")]
    assert len(names) >= 15
    assert all(callable(getattr(store, n)) for n in names)


async def test_domains_are_added_listed_and_deleted(spool: Spool) -> None:
    """A domain comes back with its keys; a second live one of the same name is refused;
    deleting destroys the keys, disables its accounts and frees the name; its selectors
    stay used."""
    store = SqliteDirectory(spool)
    did = await store.add_domain(_domain("a.example", "s1"))
    await store.add_domain(_domain("b.example", "s2"))
    with pytest.raises(DomainExists):
        await store.add_domain(_domain("a.example", "s3"))
    rec = await store.domain(did)
    assert rec is not None and (rec.name, rec.private_key, rec.ed25519_key) == (
        "a.example", b"KEY", b"ED")
    assert [d.name for d in await store.live_domains()] == ["a.example", "b.example"]
    acct = await store.add_account(NewAccount("u1", did, "h", 11.0, []), _no_check)
    await store.delete_domain(did, 20.0)
    rec = await store.domain(did)
    assert rec is not None and rec.deleted and rec.private_key is None
    assert rec.ed25519_key is None
    [a] = await store.accounts()
    assert (a.id, a.status, a.disabled_reason) == (acct, "disabled", "domain_deleted")
    assert [d.name for d in await store.live_domains()] == ["b.example"]
    assert await store.selectors_used(["s1"]) and await store.selectors_used(["x", "s1e"])
    assert not await store.selectors_used(["s9"])
    again = await store.add_domain(_domain("a.example", "s4"))
    assert again != did and len(await store.domains()) == 3


async def test_account_changes_are_stored(spool: Spool) -> None:
    """Status, password, limits, networks and last connections are what the calls set."""
    store = SqliteDirectory(spool)
    did = await store.add_domain(_domain("a.example", "s1"))
    aid = await store.add_account(NewAccount("u1", did, "h1", 11.0, ["10.0.0.0/24"]),
                                  _no_check)
    await store.set_status(aid, "disabled", "manual")
    await store.set_password(aid, "h2")
    await store.set_limits(aid, 5, None, 100)
    await store.add_network(aid, "10.1.0.0/24", _no_check)
    await store.remove_network(aid, "10.0.0.0/24")
    await store.save_last_connections([(42.5, aid)])
    [a] = await store.accounts()
    assert (a.username, a.domain_id, a.password_hash, a.status, a.disabled_reason) == (
        "u1", did, "h2", "disabled", "manual")
    assert (a.per_minute, a.per_hour, a.per_day) == (5, None, 100)
    assert a.networks == ["10.1.0.0/24"] and a.last_connection == 42.5
    assert a.created_at == 11.0 and a.total_sent == 0


async def test_binding_check_sees_other_accounts_and_can_refuse(spool: Spool) -> None:
    """The check runs in the write's transaction with the other live accounts' bindings;
    what it raises reaches the caller and nothing is written."""
    store = SqliteDirectory(spool)
    did = await store.add_domain(_domain("a.example", "s1"))
    a1 = await store.add_account(NewAccount("u1", did, "h", 1.0, ["10.0.0.0/24"]), _no_check)
    seen: list[list[NetworkBinding]] = []

    def refuse(bindings: list[NetworkBinding]) -> None:
        seen.append(bindings)
        raise ValueError("overlap")

    with pytest.raises(ValueError, match="overlap"):
        await store.add_account(NewAccount("u2", did, "h", 2.0, ["10.0.0.0/25"]), refuse)
    assert seen == [[NetworkBinding("10.0.0.0/24", "u1", "a.example")]]
    assert [a.username for a in await store.accounts()] == ["u1"]
    seen.clear()
    with pytest.raises(ValueError):
        await store.add_network(a1, "10.9.0.0/24", refuse)
    assert seen == [[]]  # its own bindings are not the others'
    [a] = await store.accounts()
    assert a.networks == ["10.0.0.0/24"]


async def test_delete_account_refuses_stored_mail_unless_purged(spool: Spool) -> None:
    """Without purge_queue a stored message refuses the delete (counted in the transaction);
    with it, messages, networks, hash and stats go and the purged ids come back."""
    store = SqliteDirectory(spool)
    did = await store.add_domain(_domain("a.example", "s1"))
    aid = await store.add_account(NewAccount("u1", did, "h", 1.0, ["10.0.0.0/24"]), _no_check)
    other = await store.add_account(NewAccount("u2", did, "h", 1.0, []), _no_check)
    m, keep = _msg(spool, aid), _msg(spool, other)
    await spool.accept(m)
    await spool.accept(keep)
    with pytest.raises(QueueNotEmpty) as info:
        await store.delete_account(aid, 5.0, purge_queue=False)
    assert info.value.count == 1
    assert await spool.message_count(aid) == 1
    assert await store.delete_account(aid, 5.0, purge_queue=True) == [m.id]
    assert await spool.message_count(aid) == 0 and await spool.message_count(other) == 1
    gone = next(a for a in await store.accounts() if a.id == aid)
    assert (gone.status, gone.password_hash, gone.networks, gone.per_minute) == (
        "deleted", None, [], None)


async def test_retry_queue_methods(spool: Spool) -> None:
    """Deferred recipients: counted, listed, found when due, leased until the lease ends,
    released, made due now, purged."""
    m1, m2 = _msg(spool, 1, rcpts=2), _msg(spool, 2)
    await spool.accept(m1)
    await spool.accept(m2)
    assert await spool.queued_count() == 2 and await spool.next_retry_at() is None
    await spool.record([_deferred(m1, 0, 100.0), _deferred(m1, 1, 50.0)])
    assert await spool.deferred_count() == 1 and await spool.queued_count() == 1
    assert await spool.next_retry_at() == 50.0
    assert await spool.due_retries(49.0) == []
    [due] = await spool.due_retries(100.0)
    assert due.id == m1.id and [(r.idx, r.rcpt, r.attempts) for r in due.recipients] == [
        (1, "r1@dest.test", 1), (0, "r0@dest.test", 1)]  # earliest due first
    await spool.lease([(m1.id, 0), (m1.id, 1)], 1000.0)
    assert await spool.due_retries(500.0) == []
    await spool.release_leases(60.0)
    assert await spool.next_retry_at() == 60.0
    assert await spool.retry_now(7.0, account_id=2) == 0
    assert await spool.retry_now(7.0, account_id=1) == 2
    [d] = await spool.deferred_messages()
    assert (d.id, d.attempts, d.next_attempt, sorted(d.recipients), d.last_error) == (
        m1.id, 1, 7.0, ["r0@dest.test", "r1@dest.test"], "later")
    assert await spool.deferred_messages(2) == []
    assert await removal.purge(spool, 1, "deferred") == [m1.id]
    assert await spool.deferred_count() == 0 and await spool.message_count(2) == 1


async def test_queued_mail_is_deferred_and_purged_by_id(spool: Spool, tmp_path: Path) -> None:
    """defer_queued moves never-attempted recipients to the retry queue, due now;
    purge_messages deletes exactly the ids given; reconcile_ids lists the queued ones."""
    a, b, c = (_msg(spool, 1) for _ in range(3))
    for m in (a, b, c):
        await spool.accept(m)
    await spool.defer_queued([a.id], 3.0)
    assert await spool.next_retry_at() == 3.0
    assert sorted(await spool.reconcile_ids([], 4.0, probe=True)) == sorted([b.id, c.id])
    assert await removal.purge_messages(spool, [b.id]) == [b.id]
    assert [m.id for m in await spool.queued_messages()] == [c.id]
    assert await spool.load_data(b.id) is None and await spool.load_data(c.id) == b"x\r\n"
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key='reconciled_at'").fetchone() == (
            "4.0",)


async def test_the_writer_is_one_thread_with_wal_and_full_sync(spool: Spool) -> None:
    """The spool's connections keep WAL and synchronous=FULL (2), and every call of one
    connection runs on the same thread."""
    import threading
    assert spool._w is not None
    assert await spool._transact(lambda c: c.execute("PRAGMA journal_mode").fetchone()) == (
        "wal",)
    assert await spool._transact(lambda c: c.execute("PRAGMA synchronous").fetchone()) == (2,)
    threads = {await spool._w.run(threading.get_ident) for _ in range(5)}
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_queued_entries_list_never_attempted_recipients_newest_first(
        spool: Spool) -> None:
    """``relayctl log --status queued`` from the spool: one row per recipient never
    attempted, newest message first, filtered by account name and reception time."""
    old, new = _msg(spool, 1, rcpts=2), _msg(spool, 2)
    new.received_at = 5.0
    for m in (old, new):
        await spool.accept(m)
    await spool.record([_deferred(old, 1, 9.0)], [old.id])  # attempted: no longer queued
    rows = await spool.queued_entries(None, None, 10)
    assert rows == [(5.0, new.id, "u2", "example.com", "r0@dest.test", "", None, "", "queued"),
                    (1.0, old.id, "u1", "example.com", "r0@dest.test", "", None, "", "queued")]
    assert [r[1] for r in await spool.queued_entries("u1", None, 10)] == [old.id]
    assert [r[1] for r in await spool.queued_entries(None, 5.0, 10)] == [new.id]
    assert [r[1] for r in await spool.queued_entries("", None, 1)] == [new.id]


async def test_the_delivery_log_has_a_connection_and_thread_of_its_own(
        spool: Spool, tmp_path: Path) -> None:
    """The delivery log's file is opened through relayd.store.db (its own thread, not the
    spool's writer's), created 0640, and takes the results of the spool's commits."""
    import threading

    from relayd.store.deliverylog import DeliveryLog
    log = DeliveryLog(str(tmp_path / "log.db"))
    await log.open()
    try:
        spool.on_results = log.append
        assert log._conn is not None and spool._w is not None
        name = await log._conn.run(lambda: threading.current_thread().name)
        writer = await spool._w.run(lambda: threading.current_thread().ident)
        assert name == "relayd-log"
        assert await log._conn.run(threading.get_ident) != writer
        assert oct((tmp_path / "log.db").stat().st_mode & 0o777) == "0o640"
        m = _msg(spool, 1)
        await spool.accept(m)
        await spool.record([_deferred(m, 0, 9.0)], [m.id])
        assert [(r[1], r[8]) for r in await log.entries(None, None, None, 10)] == [
            (m.id, "deferred")]
    finally:
        await log.close()
