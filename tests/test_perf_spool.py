"""The spool's fast paths keep what it stores: one-trip group commits, blob I/O for large data."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from relayd.spool import BLOB_STREAM_MIN, AttemptResult, NewMessage, Spool


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
    """Accepts, delivery results and write() callbacks queued together all commit, in order."""
    spool = Spool(str(tmp_path / "spool.db"))
    await spool.open()
    try:
        m = _msg(spool, b"x\r\n")
        await spool.accept(m)
        seen: list[str] = []

        async def call(db: object) -> str:
            seen.append("call")
            return "ok"

        res = AttemptResult(message_id=m.id, idx=0, recipient="r0@dest.test", username="u",
                            domain="example.com", next_hop="h", code=250, text="ok",
                            outcome="delivered", ts=2.0)
        m2 = _msg(spool, b"y\r\n")
        out = await asyncio.gather(spool.accept(m2), spool.record([res], [m.id]),
                                   spool.write(call))
        assert out == [None, [m.id], "ok"] and seen == ["call"]
        assert await spool.load_data(m.id) is None
        assert await spool.load_data(m2.id) == b"y\r\n"
    finally:
        await spool.close()
