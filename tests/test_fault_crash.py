"""kill -9 under load: every message that got a 250 arrives at the next hop at least once
after a restart on the same spool (SEMANTICS.md §5: duplicates acceptable, losses never).

The figures (sent, acknowledged, delivered, duplicated) are printed and recorded in
tests/README.md.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.conftest import message, start_sink
from tests.procs import RelayProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SESSIONS = 8
PER_SESSION = 50
KILL_AFTER_ACKS = 150
TAG = re.compile(rb"Subject: (crash-\d+-\d+)\r\n")


async def _worker(n: int, port: int, cred: dict[str, str], sent: set[str],
                  acked: set[str]) -> None:
    """One client session sending PER_SESSION messages until the relay dies."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    try:
        await client.connect()
        await client.ehlo()
        await client.auth_plain(cred["username"], cred["password"])
        for i in range(PER_SESSION):
            tag = f"crash-{n}-{i}"
            sent.add(tag)
            _, reply = await client.sendmail("app@example.com", [f"{tag}@dest.test"],
                                             message(tag, body=f"{tag}\r\n" * 20))
            if reply.startswith("2.0.0 Ok: queued as "):
                acked.add(tag)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        return  # the relay was killed: this session ends
    finally:
        client.close()


async def test_kill_9_under_load_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL mid-stream, restart on the same data dir: every 250-acknowledged message is
    delivered at least once."""
    sink_port = free_port()
    sink = await start_sink(port=sink_port)
    relay = RelayProcess(tmp_path, f"127.0.0.1:{sink_port}")
    await relay.start()
    try:
        await relay.ctl("domain", "add", "example.com")
        cred = await relay.ctl("user", "add", "--domain", "example.com")
        sent: set[str] = set()
        acked: set[str] = set()
        workers = [asyncio.create_task(_worker(n, relay.port, cred, sent, acked))
                   for n in range(SESSIONS)]
        deadline = time.monotonic() + 60
        while len(acked) < KILL_AFTER_ACKS and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await relay.kill()
        await asyncio.wait_for(asyncio.gather(*workers), 30)
        before_restart = len(sink.messages)

        await relay.start()
        deadline = time.monotonic() + 90
        while True:
            arrived = {m.group(1).decode() for d in sink.messages
                       if (m := TAG.search(d.data))}
            if acked <= arrived or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # let stragglers (possible duplicates) arrive
        counts = collections.Counter(
            m.group(1).decode() for d in sink.messages if (m := TAG.search(d.data)))
        missing = sorted(acked - set(counts))
        duplicated = sum(c - 1 for c in counts.values() if c > 1)
        unacked_delivered = len(set(counts) - acked)
        print(f"\nkill -9 under load: sessions={SESSIONS} sent={len(sent)} "
              f"acknowledged={len(acked)} delivered={len(set(counts) & acked)} "
              f"(+{unacked_delivered} sent but not acknowledged) duplicated={duplicated} "
              f"delivered_before_kill={before_restart} missing={len(missing)}")
        assert missing == [], missing[:10]
        assert len(acked) >= KILL_AFTER_ACKS
        assert len(sent) > len(acked)  # the kill happened mid-stream
        assert await relay.terminate() == 0
    finally:
        if relay.proc is not None and relay.proc.returncode is None:
            await relay.kill()
        assert sink.server is not None
        sink.server.close()
