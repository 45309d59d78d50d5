"""The spool's fast paths keep what it stores: one-trip group commits, blob I/O for large data."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from relayd.store import removal
from relayd.store.bodies import BLOB_STREAM_MIN, EXTERNAL_MIN
from relayd.store.deliverylog import DeliveryLog
from relayd.store.records import AttemptResult, NewMessage
from relayd.store.spool import Spool


def _msg(spool: Spool, data: bytes, rcpts: int = 1) -> NewMessage:
    return NewMessage(id=spool.ids.next(), account_id=1, username="u", domain="example.com",
                      sender="a@example.com", recipients=[f"r{i}@dest.test" for i in range(rcpts)],
                      data=data, received_at=1.0)


async def test_large_message_is_stored_and_loaded_byte_for_byte(tmp_path: Path) -> None:
    """A message above BLOB_STREAM_MIN (written and read with blob I/O) comes back unchanged."""
    spool = Spool(str(tmp_path / "spool.db"))
    await spool.open()
    try:
        data = os.urandom(3 * 1024 * 1024 + 17)
        assert len(data) > BLOB_STREAM_MIN
        small = _msg(spool, b"Subject: s\r\n\r\nsmall\r\n")
        big = _msg(spool, data, rcpts=2)
        await asyncio.gather(spool.accept(small), spool.accept(big))
        assert await spool.load_data(big.id) == data
        assert await spool.load_data(small.id) == small.data
        row = await spool.fetchone("SELECT size FROM messages WHERE id=?", (big.id,))
        assert row[0] == len(data)
        assert await spool.load_data(big.id + 12345) is None
    finally:
        await spool.close()


async def test_one_batch_applies_accepts_results_and_callbacks_in_order(tmp_path: Path) -> None:
    """Accepts, delivery results and writer callbacks (_transact) queued together all commit,
    in order."""
    spool = Spool(str(tmp_path / "spool.db"))
    await spool.open()
    try:
        m = _msg(spool, b"x\r\n")
        await spool.accept(m)
        seen: list[str] = []

        def call(conn: object) -> str:
            seen.append("call")
            return "ok"

        res = AttemptResult(message_id=m.id, idx=0, recipient="r0@dest.test", username="u",
                            domain="example.com", next_hop="h", code=250, text="ok",
                            outcome="delivered", ts=2.0)
        m2 = _msg(spool, b"y\r\n")
        out = await asyncio.gather(spool.accept(m2), spool.record([res], [m.id]),
                                   spool._transact(call))
        assert out == [None, [m.id], "ok"] and seen == ["call"]
        assert await spool.load_data(m.id) is None
        assert await spool.load_data(m2.id) == b"y\r\n"
    finally:
        await spool.close()


async def _with_log(spool: Spool, tmp_path: Path) -> DeliveryLog:
    """The delivery log file beside ``spool``, fed by its commits (as relayd wires them)."""
    log = DeliveryLog(str(tmp_path / "log.db"))
    await log.open()
    spool.on_results = log.append
    return log


async def _logged(log: DeliveryLog) -> list[tuple[Any, ...]]:
    """(message id, recipient, outcome) of every log row, sorted."""
    return sorted((r[1], r[4], r[8]) for r in await log.entries(None, None, None, 10000))


def _result(m: NewMessage, idx: int, outcome: str = "delivered", **kw: object) -> AttemptResult:
    fields: dict[str, object] = dict(
        message_id=m.id, idx=idx, recipient=f"r{idx}@dest.test", username="u",
        domain="example.com", next_hop="h", code=250, text="ok", outcome=outcome, ts=2.0)
    fields.update(kw)
    return AttemptResult(**fields)  # type: ignore[arg-type]


async def test_complete_record_deletes_the_message_and_logs_every_recipient(
        tmp_path: Path) -> None:
    """complete=True (every pending recipient answered finally): message and recipient rows
    go, the delivery log keeps one row per recipient."""
    spool = Spool(str(tmp_path / "spool.db"))
    await spool.open()
    log = await _with_log(spool, tmp_path)
    try:
        m = _msg(spool, b"x\r\n", rcpts=2)
        await spool.accept(m)
        out = await spool.record([_result(m, 0), _result(m, 1, "failed", code=550)], [m.id],
                                 complete=True)
        assert out == [m.id]
        assert await spool.fetchall("SELECT * FROM recipients WHERE message_id=?",
                                    (m.id,)) == []
        assert await spool.load_data(m.id) is None
        assert await _logged(log) == [(m.id, "r0@dest.test", "delivered"),
                                      (m.id, "r1@dest.test", "failed")]
    finally:
        await spool.close()
        await log.close()


async def test_a_failing_record_does_not_take_the_others_of_its_batch_down(
        tmp_path: Path) -> None:
    """Records of one commit share a savepoint; when one fails, the others still commit
    (applied again one by one) and only the failing one's future fails."""
    spool = Spool(str(tmp_path / "spool.db"))
    await spool.open()
    log = await _with_log(spool, tmp_path)
    try:
        a, b, c = (_msg(spool, b"x\r\n") for _ in range(3))
        for m in (a, b, c):
            await spool.accept(m)
        bad = _result(b, 0)
        bad.outcome = None  # type: ignore[assignment]  # recipients.status is NOT NULL
        out = await asyncio.gather(spool.record([_result(a, 0)], [a.id]),
                                   spool.record([bad], [b.id]),
                                   spool.record([_result(c, 0)], [c.id], complete=True),
                                   return_exceptions=True)
        assert out[0] == [a.id] and out[2] == [c.id]
        assert isinstance(out[1], Exception)
        assert await spool.load_data(b.id) == b"x\r\n"  # untouched, still pending
        assert await spool.load_data(a.id) is None and await spool.load_data(c.id) is None
        assert [r[0] for r in await _logged(log)] == sorted([a.id, c.id])
    finally:
        await spool.close()
        await log.close()


async def test_large_data_lives_in_a_file_until_its_row_is_gone(tmp_path: Path) -> None:
    """Over EXTERNAL_MIN the data is a file beside the database (the row keeps no data);
    the file goes after the commit that deletes the row: by a delivery result, or by a
    lifecycle purge; a file whose row never committed is removed at the next open."""
    path = str(tmp_path / "spool.db")
    spool = Spool(path)
    await spool.open()
    bodies = tmp_path / "spool.bodies"
    try:
        data = os.urandom(EXTERNAL_MIN + 1)
        delivered, purged, kept = (_msg(spool, data) for _ in range(3))
        for m in (delivered, purged, kept):
            await spool.accept(m)
        assert sorted(p.name for p in bodies.iterdir()) == sorted(
            str(m.id) for m in (delivered, purged, kept))
        assert oct(bodies.stat().st_mode & 0o777) == "0o750"
        row = await spool.fetchone("SELECT external, length(data), size FROM messages"
                                   " WHERE id=?", (kept.id,))
        assert tuple(row) == (1, 0, len(data))
        assert await spool.load_data(kept.id) == data

        assert await spool.record([_result(delivered, 0)], [delivered.id],
                                  complete=True) == [delivered.id]
        assert not (bodies / str(delivered.id)).exists()

        assert await removal.purge_messages(spool, [purged.id]) == [purged.id]
        assert sorted(p.name for p in bodies.iterdir()) == [str(kept.id)]
    finally:
        await spool.close()
    (bodies / "12345").write_bytes(b"left by a crash before its row committed")
    spool = Spool(path)
    await spool.open()
    try:
        assert sorted(p.name for p in bodies.iterdir()) == [str(kept.id)]
        assert await spool.load_data(kept.id) == data
    finally:
        await spool.close()


async def test_many_accepts_of_one_commit_are_stored_row_for_row(tmp_path: Path) -> None:
    """Accepts committed together (multi-row inserts, more rows than one statement takes)
    keep every message and every recipient."""
    spool = Spool(str(tmp_path / "spool.db"))
    await spool.open()
    try:
        msgs = [_msg(spool, b"n=%d\r\n" % i, rcpts=1 + i % 3) for i in range(150)]
        await asyncio.gather(*(spool.accept(m) for m in msgs))
        assert await spool.fetchone("SELECT COUNT(*) FROM messages") == (150,)
        rows = await spool.fetchall("SELECT message_id, idx, rcpt, status FROM recipients"
                                    " ORDER BY message_id, idx")
        assert rows == [(m.id, i, r, "queued") for m in msgs for i, r in enumerate(m.recipients)]
        for m in (msgs[0], msgs[77], msgs[-1]):
            assert await spool.load_data(m.id) == m.data
    finally:
        await spool.close()


async def test_complete_records_of_one_commit_report_only_the_rows_they_removed(
        tmp_path: Path) -> None:
    """Complete records committed together are deleted in bulk; a message purged before its
    result arrived is not reported as removed by it, and every result is still logged."""
    spool = Spool(str(tmp_path / "spool.db"))
    await spool.open()
    log = await _with_log(spool, tmp_path)
    try:
        msgs = [_msg(spool, b"n=%d\r\n" % i, rcpts=2) for i in range(70)]
        await asyncio.gather(*(spool.accept(m) for m in msgs))
        gone = msgs[33]

        await removal.purge_messages(spool, [gone.id])
        removed = await asyncio.gather(*(
            spool.record([_result(m, 0), _result(m, 1)], [m.id], complete=True)
            for m in msgs))
        assert removed == [[] if m is gone else [m.id] for m in msgs]
        assert await spool.fetchone("SELECT COUNT(*) FROM messages") == (0,)
        assert await spool.fetchone("SELECT COUNT(*) FROM recipients") == (0,)
        logged = await _logged(log)
        assert len([r for r in logged if r[2] != "purged"]) == 140  # every result
        # and the purge's own rows: the purged message's two recipients
        assert sorted((r[0], r[1]) for r in logged if r[2] == "purged") == [
            (gone.id, "r0@dest.test"), (gone.id, "r1@dest.test")]
    finally:
        await spool.close()
        await log.close()
