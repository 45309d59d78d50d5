"""The delivery log in a file of its own: written after the result commit, bounded by age and
by size in small batches, and moved out of a spool written by an earlier relayd (schema 4)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from relayd.store.deliverylog import DeliveryLog
from relayd.store.records import AttemptResult
from relayd.store.schema import MIGRATIONS, SCHEMA_VERSION
from relayd.store.spool import Spool, SpoolError
from tests.conftest import RelayFactory, RelayHandle, Sink
from tests.test_queue_support import eventually, log_entries, submit


def _rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def _tables(db: Path) -> set[str]:
    return {r[0] for r in _rows(db, "SELECT name FROM sqlite_master WHERE type='table'")}


def _result(n: int, ts: float, text: str = "ok") -> AttemptResult:
    return AttemptResult(message_id=1000 + n, idx=0, recipient=f"r{n}@dest.test", username="u",
                         domain="example.com", next_hop="h", code=250, text=text,
                         outcome="delivered", ts=ts)


async def test_a_delivery_is_logged_in_the_log_file_not_in_the_spool(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """Over a real delivery: the row is in relayd-log.sqlite3, the spool has no log table,
    and ``/v1/log`` answers from the file."""
    await submit(relay, account, ["a@dest.test", "b@dest.test"])
    entries = await eventually(lambda: _n_entries(relay, 2))
    assert sorted(e["recipient"] for e in entries) == ["a@dest.test", "b@dest.test"]
    assert {e["outcome"] for e in entries} == {"delivered"}
    log_file = relay.data_dir / "relayd-log.sqlite3"
    assert sorted(r[0] for r in _rows(log_file, "SELECT recipient FROM delivery_log")) == \
        ["a@dest.test", "b@dest.test"]
    assert "delivery_log" not in _tables(relay.data_dir / "relayd.sqlite3")
    assert oct(log_file.stat().st_mode & 0o777) == "0o640"


async def _n_entries(relay: RelayHandle, n: int) -> list[dict[str, Any]] | None:
    entries = await log_entries(relay)
    return entries if len(entries) >= n else None


async def _filled(tmp_path: Path, n: int, ts: float, batch_rows: int) -> DeliveryLog:
    log = DeliveryLog(str(tmp_path / "log.db"), batch_rows=batch_rows, pause=0.0)
    await log.open()
    log.append([_result(i, ts + i, text="x" * 200) for i in range(n)])
    await log.flush()
    return log


async def test_prune_by_age_runs_in_batches_and_keeps_the_newer_rows(tmp_path: Path) -> None:
    """Rows older than the cutoff go, at most ``batch_rows`` per transaction; newer rows stay."""
    log = await _filled(tmp_path, 1000, ts=1000.0, batch_rows=50)
    try:
        assert await log.prune(cutoff=1000.0 + 700, max_bytes=1 << 30) == 700
        assert log.prune_batches == 14  # 700 rows, 50 a transaction
        kept = await log.entries(None, None, None, 5000)
        assert len(kept) == 300 and min(r[0] for r in kept) == 1700.0
        assert await log.prune(cutoff=1000.0 + 700, max_bytes=1 << 30) == 0
        assert log.prune_batches == 14
    finally:
        await log.close()


async def test_prune_by_size_removes_the_oldest_until_under_the_bound(tmp_path: Path) -> None:
    """Over ``max_bytes``, the oldest rows go (in batches) until the log fits; the file
    shrinks with them (incremental vacuum)."""
    log = await _filled(tmp_path, 3000, ts=time.time(), batch_rows=100)
    try:
        big = await log.size_bytes()
        limit = big // 4
        deleted = await log.prune(cutoff=0.0, max_bytes=limit)
        assert 0 < deleted < 3000
        assert log.prune_batches >= 2 and log.prune_batches == -(-deleted // 100)
        assert await log.size_bytes() <= limit
        kept = await log.entries(None, None, None, 5000)
        assert len(kept) == 3000 - deleted
        assert max(r[1] for r in kept) == 1000 + 2999  # the newest row stays
        assert min(r[1] for r in kept) == 1000 + deleted  # the oldest went first
        pages = _rows(tmp_path / "log.db", "PRAGMA page_count")[0][0]
        page_size = _rows(tmp_path / "log.db", "PRAGMA page_size")[0][0]
        assert pages * page_size <= limit  # the freed pages went back to the file system
        assert _rows(tmp_path / "log.db", "PRAGMA freelist_count")[0][0] == 0
    finally:
        await log.close()


async def test_rows_are_written_between_prune_batches(tmp_path: Path) -> None:
    """A long prune does not hold the log's writer: rows appended while it runs are
    committed before it ends."""
    log = await _filled(tmp_path, 5000, ts=1000.0, batch_rows=10)
    try:
        prune = asyncio.create_task(log.prune(cutoff=1_000_000.0, max_bytes=1 << 30))
        await eventually(lambda: _true(log.prune_batches >= 3))
        log.append([_result(9999, ts=2_000_000.0)])
        await log.flush()
        assert not prune.done()
        assert (await log.entries(None, None, 1_999_999.0, 10))[0][4] == "r9999@dest.test"
        assert await prune == 5000
        assert log.prune_batches == 500
    finally:
        await log.close()


async def _true(value: bool) -> bool:
    return value


def _old_spool(path: Path, rows: int, ts: float) -> None:
    """A spool as relayd wrote it before the log had its own file (schema 4)."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript("".join(MIGRATIONS[v] for v in (1, 2, 3, 4)) + "PRAGMA user_version=4;")
    conn.executemany(
        "INSERT INTO delivery_log(id, ts, message_id, username, domain, recipient, next_hop,"
        " code, text, outcome) VALUES (?,?,?,?,?,?,?,?,?,?)",
        [(i + 1, ts + i * 0.001, 500 + i, "old-user", "example.com", f"r{i}@dest.test",
          "mx.dest.test", 250, "2.0.0 ok", "delivered") for i in range(rows)])
    conn.commit()
    conn.close()


async def test_upgrade_moves_the_old_table_in_batches_then_drops_it(tmp_path: Path) -> None:
    """Schema 4 to 5: every row reaches the log file (ids and columns kept), then the
    spool's table is gone; without a log to move to, the spool is left as it was."""
    spool_path = tmp_path / "spool.db"
    _old_spool(spool_path, 120_000, ts=5000.0)

    with pytest.raises(SpoolError, match="delivery log"):
        alone = Spool(str(spool_path))
        await alone.open()
    assert _rows(spool_path, "PRAGMA user_version")[0][0] == 4
    assert _rows(spool_path, "SELECT COUNT(*) FROM delivery_log")[0][0] == 120_000

    log = DeliveryLog(str(tmp_path / "log.db"))
    await log.open()
    moved: list[int] = []

    async def move(path: str) -> int:
        moved.append(await log.move_from_spool(path))
        return moved[-1]

    spool = Spool(str(spool_path), move_log=move)
    await spool.open()
    await spool.close()
    try:
        assert moved == [120_000]
        assert _rows(spool_path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
        assert "delivery_log" not in _tables(spool_path)
        got = _rows(tmp_path / "log.db", "SELECT id, ts, message_id, recipient, outcome FROM"
                    " delivery_log WHERE id IN (1, 60000, 120000) ORDER BY id")
        assert got == [(1, 5000.0, 500, "r0@dest.test", "delivered"),
                       (60000, 5000.0 + 59999 * 0.001, 60499, "r59999@dest.test", "delivered"),
                       (120000, 5000.0 + 119999 * 0.001, 120499, "r119999@dest.test",
                        "delivered")]
        assert _rows(tmp_path / "log.db", "SELECT COUNT(*) FROM delivery_log")[0][0] == 120_000
    finally:
        await log.close()


async def test_relayd_started_on_an_old_spool_answers_its_log(
        relay_factory: RelayFactory, tmp_path: Path) -> None:
    """relayd started on a schema-4 spool: ``/v1/log`` lists the old rows (same filters)."""
    now = time.time()
    _old_spool(tmp_path / "var" / "relayd.sqlite3", 30, ts=now - 3600)
    relay = await relay_factory()
    entries = await log_entries(relay, user="old-user", limit=5)
    assert [e["recipient"] for e in entries] == [f"r{i}@dest.test" for i in (29, 28, 27, 26, 25)]
    assert entries[0]["next_hop"] == "mx.dest.test" and entries[0]["code"] == 250
    assert len(await log_entries(relay, status="delivered", limit=100)) == 30
    assert "delivery_log" not in _tables(tmp_path / "var" / "relayd.sqlite3")
