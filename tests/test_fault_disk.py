"""Disk full: MAIL gets 452 4.3.1 below the free-space threshold, a failed commit at the
end of DATA gets 451 4.3.0 (never 250), and the relay recovers by itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relayd.store.spool import EXTERNAL_MIN
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.rawsmtp import Raw

pytestmark = pytest.mark.timeout(60)

STORAGE = "452 4.3.1 Insufficient system storage"


async def _session(relay: RelayHandle) -> Raw:
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com")
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(*account)).startswith("235 ")
    return raw


async def _send(raw: Raw, rcpt: str, body: bytes) -> str:
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Ok"
    assert (await raw.cmd("DATA")).startswith("354 ")
    return await raw.cmd(body + b".", timeout=20)


async def test_low_disk_refuses_mail_with_452(relay_factory: RelayFactory) -> None:
    """Free space below limits.min_free_disk_bytes: MAIL gets 452 4.3.1."""
    relay = await relay_factory({"limits": {"min_free_disk_bytes": 1 << 60}})
    raw = await _session(relay)
    assert await raw.cmd("MAIL FROM:<app@example.com>") == STORAGE
    raw.close()


async def test_mail_is_accepted_again_when_space_returns(relay: RelayHandle,
                                                        sink: Sink) -> None:
    """After low disk, MAIL is accepted again as soon as space is back, without a restart."""
    free = [0]
    relay.relay.ctx.free_disk = lambda: free[0]  # fault injection: the disk the relay sees
    raw = await _session(relay)
    assert await raw.cmd("MAIL FROM:<app@example.com>") == STORAGE
    free[0] = 1 << 40
    assert (await _send(raw, "back@dest.test", message("back"))).startswith("250 2.0.0 Ok: ")
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["back@dest.test"]
    raw.close()


async def _cap_database(relay: RelayHandle, extra_pages: int | None) -> None:
    """Limit the spool to its current size (disk full), or lift the limit (None)."""
    def cap(conn: Any) -> None:  # fault injection: on the writer's connection, its thread
        if extra_pages is None:
            conn.execute("PRAGMA max_page_count=4294967294")
            return
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count={int(pages) + extra_pages}")

    await relay.relay.spool._transact(cap)


async def test_failed_commit_gets_451_and_the_relay_recovers(relay: RelayHandle,
                                                            sink: Sink) -> None:
    """When the spool cannot grow, end of DATA gets 451 4.3.0, never 250; once it can, the
    next message is accepted and delivered, and the refused one never is."""
    raw = await _session(relay)
    await _cap_database(relay, 0)
    # ~200 kB: stored in the database (below EXTERNAL_MIN), so it needs new pages
    big = message("lost", body="z" * 70 + "\r\n") * 1200
    assert len(big) < EXTERNAL_MIN
    for _ in range(3):
        assert await _send(raw, "full@dest.test", big) == "451 4.3.0 Local error in processing"
    await _cap_database(relay, None)
    assert (await _send(raw, "after@dest.test", message("after"))).startswith("250 2.0.0 Ok: ")
    got = await sink.wait_for(1)
    await asyncio.sleep(0.5)
    assert [m.rcpt_tos for m in got] == [["after@dest.test"]]
    raw.close()


async def test_failed_body_file_write_gets_451_and_leaves_no_file(relay: RelayHandle,
                                                                  sink: Sink) -> None:
    """A large message whose file cannot be written (here: the bodies directory is not
    one) gets 451 4.3.0, never 250, and leaves nothing behind; once the directory is
    back, the next large message is accepted, stored as a file, delivered, and its file
    removed after delivery."""
    raw = await _session(relay)
    bodies = Path(relay.relay.spool.bodies.dir)
    big = message("big", body="b" * 70 + "\r\n") * 5000  # ~800 kB: a file of its own
    assert len(big) > EXTERNAL_MIN
    moved = bodies.with_name("moved-away")
    bodies.rename(moved)
    bodies.write_bytes(b"")  # in the way: os.open(bodies/<id>) fails with ENOTDIR
    try:
        assert await _send(raw, "lost@dest.test", big) == "451 4.3.0 Local error in processing"
    finally:
        bodies.unlink()
        moved.rename(bodies)
    assert list(bodies.iterdir()) == []
    assert (await _send(raw, "kept@dest.test", big)).startswith("250 2.0.0 Ok: ")
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["kept@dest.test"]
    assert got.data.rstrip(b"\r\n").endswith(big.rstrip(b"\r\n")[-1000:])
    for _ in range(100):  # removed after the commit of the delivery result
        if not list(bodies.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert list(bodies.iterdir()) == []
    raw.close()
