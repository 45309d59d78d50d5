"""At-least-once: a message being transmitted when relayd is killed is attempted
again after the restart (a duplicate is acceptable, a loss never)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import message, start_sink
from tests.procs import RelayProcess
from tests.test_queue_support import StallServer

pytestmark = pytest.mark.slow


async def _killed_while_transmitting(tmp_path: Path, data: bytes,
                                     check: Callable[[RelayProcess], None] | None = None,
                                     ) -> tuple[RelayProcess, int]:
    """Send ``data``, kill -9 relayd while the next hop holds its end of DATA (after
    ``check``); return the stopped relay and the next hop's port, now free."""
    stall = await StallServer(at_data=True).start()
    port = stall.port
    relay = RelayProcess(tmp_path, stall.address,
                         "[limits]\nmax_queued_per_account = 10\n")
    await relay.start()
    client = await relay.sender()
    await client.sendmail("app@example.com", ["r@dest.test"], data)
    await client.quit()
    await asyncio.wait_for(stall.data_started.wait(), 10)
    if check is not None:
        check(relay)
    await relay.kill()
    await stall.stop()
    return relay, port


async def test_message_in_transmission_is_sent_again_after_a_crash(tmp_path: Path) -> None:
    """kill -9 while the next hop holds the end of DATA; after restart the message arrives."""
    relay, port = await _killed_while_transmitting(tmp_path, message("in flight"))
    sink = await start_sink(port=port)
    try:
        await relay.start()
        [got] = await sink.wait_for(1, timeout=20)
        assert got.rcpt_tos == ["r@dest.test"] and b"Subject: in flight" in got.data
        log = await relay.ctl("log")
        assert [e["outcome"] for e in log["entries"]] == ["delivered"]
        assert (await relay.ctl("queue", "list"))["items"] == []
        assert await relay.terminate() == 0
    finally:
        assert sink.server is not None
        sink.server.close()


async def test_large_message_in_transmission_survives_a_crash(tmp_path: Path) -> None:
    """kill -9 while a message kept in a spool file of its own (over 256 KiB) is being
    transmitted: after the restart it arrives byte for byte, and its file is removed once
    the delivery is recorded."""
    body = "".join(f"{i:07d} " + "w" * 70 + "\r\n" for i in range(6000))
    big = message("large in flight", body)

    def one_file(relay: RelayProcess) -> None:
        assert len(list((relay.data / "relayd.bodies").iterdir())) == 1

    relay, port = await _killed_while_transmitting(tmp_path, big, one_file)
    bodies = relay.data / "relayd.bodies"
    sink = await start_sink(port=port)
    try:
        await relay.start()
        [got] = await sink.wait_for(1, timeout=20)
        assert got.data.endswith(big.split(b"\r\n\r\n", 1)[1])
        for _ in range(100):
            if not list(bodies.iterdir()):
                break
            await asyncio.sleep(0.05)
        assert list(bodies.iterdir()) == []
        assert (await relay.ctl("queue", "list"))["items"] == []
        assert await relay.terminate() == 0
    finally:
        assert sink.server is not None
        sink.server.close()
