"""Durability: mail acknowledged with 250 survives a hard kill and is delivered after restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import message, start_sink
from tests.procs import RelayProcess, free_port

pytestmark = pytest.mark.slow


async def test_kill_between_acceptance_and_delivery(tmp_path: Path) -> None:
    """A message accepted while the next hop is down is delivered after kill -9 and restart."""
    sink_port = free_port()
    relay = RelayProcess(tmp_path, f"127.0.0.1:{sink_port}")
    await relay.start()
    client = await relay.sender()
    ids = []
    for i in range(3):
        _, reply = await client.sendmail("app@example.com", [f"r{i}@dest.test"],
                                         message(f"restart {i}"))
        ids.append(reply.rsplit(" ", 1)[1])
    await client.quit()
    await relay.kill()

    sink = await start_sink(port=sink_port)
    try:
        await relay.start()
        got = await sink.wait_for(3, timeout=20)
        assert sorted(m.rcpt_tos[0] for m in got) == ["r0@dest.test", "r1@dest.test",
                                                      "r2@dest.test"]
        assert all(b"Subject: restart" in m.data for m in got)
        assert await relay.terminate() == 0
    finally:
        assert sink.server is not None
        sink.server.close()
