"""Retry leases: a crash during a retry does not turn the lease into 15 minutes of
backoff, and a spool written before the lease marker existed (schema 1) migrates."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from relayd.queue.scheduler import RETRY_LEASE_SECONDS
from relayd.store.schema import MIGRATIONS, SCHEMA_VERSION
from relayd.store.spool import Spool
from tests.conftest import message, start_sink
from tests.procs import RelayProcess, free_port
from tests.test_queue_support import StallServer


def _rows(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


async def test_schema_1_spool_migrates_and_keeps_its_mail(tmp_path: Path) -> None:
    """A version-1 spool opens at the current version (lease column, external-data column,
    never-attempted index) with its message intact and read from the database."""
    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[1] + "PRAGMA user_version=1;")
    conn.execute("INSERT INTO messages(id, account_id, username, domain, sender, received_at,"
                 " size, is_bounce, data) VALUES (7, 1, 'u', 'example.com', 'a@example.com',"
                 " 1.0, 5, 0, x'68656c6c6f')")
    conn.execute("INSERT INTO recipients(message_id, idx, rcpt, status, attempts, next_attempt)"
                 " VALUES (7, 0, 'r@dest.test', 'deferred', 2, 123.0)")
    conn.commit()
    conn.close()

    spool = Spool(str(path))
    await spool.open()
    try:
        version = await spool.fetchone("PRAGMA user_version")
        [stored] = await spool.pending_messages()
        [rcpt] = stored.recipients
        leased = await spool.fetchone("SELECT leased FROM recipients WHERE message_id=7")
        external = await spool.fetchone("SELECT external FROM messages WHERE id=7")
        data = await spool.load_data(7)
        index = await spool.fetchone("SELECT name FROM sqlite_master WHERE type='index'"
                                     " AND name='recipients_queued'")
    finally:
        await spool.close()
    assert version[0] == SCHEMA_VERSION  # every step ran (the version: relayd.store.schema)
    assert index is not None
    assert external[0] == 0
    assert (rcpt.rcpt, rcpt.status, rcpt.attempts, rcpt.next_attempt) == \
        ("r@dest.test", "deferred", 2, 123.0)
    assert leased[0] == 0
    assert data == b"hello"


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_retry_interrupted_by_a_crash_goes_again_at_start(tmp_path: Path) -> None:
    """kill -9 while a retry holds its lease; after restart the retry runs at once."""
    port = free_port()
    relay = RelayProcess(tmp_path, f"127.0.0.1:{port}")  # nothing listens yet: deferred
    await relay.start()
    stall: StallServer | None = None
    sink = None
    try:
        client = await relay.sender()
        await client.sendmail("app@example.com", ["r@dest.test"], message("retried"))
        await client.quit()
        db = relay.data / "relayd.sqlite3"
        for _ in range(200):
            if _rows(db, "SELECT 1 FROM recipients WHERE status='deferred'"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("first attempt was not deferred")

        stall = await StallServer(at_data=True).start(port)  # the retry stalls at end of DATA
        await asyncio.wait_for(stall.data_started.wait(), 10)
        [(leased, next_attempt)] = _rows(db, "SELECT leased, next_attempt FROM recipients")
        assert leased == 1 and next_attempt > time.time() + RETRY_LEASE_SECONDS / 2
        await relay.kill()
        await stall.stop()
        stall = None

        sink = await start_sink(port=port)
        started = time.monotonic()
        await relay.start()
        [got] = await sink.wait_for(1, timeout=20)
        assert time.monotonic() - started < 10
        assert got.rcpt_tos == ["r@dest.test"] and b"Subject: retried" in got.data
        assert (await relay.ctl("queue", "list"))["items"] == []
        assert await relay.terminate() == 0
    finally:
        if relay.proc is not None and relay.proc.returncode is None:
            await relay.kill()
        if stall is not None:
            await stall.stop()
        if sink is not None and sink.server is not None:
            sink.server.close()
