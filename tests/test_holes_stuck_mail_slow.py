"""Issue 12 item 1, disk full: a data dir on a small tmpfs fills up while the next hop does
not answer, so the commits of the (deferred) delivery results fail. Once space is back
and the hop is up, every acknowledged message is delivered without a restart, and
``status`` counts what the database holds all along.

Needs root (mount); CI runs as root.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RelayFactory, message, start_sink
from tests.procs import free_port
from tests.rawsmtp import Raw
from tests.test_holes_stuck_mail import committed_in_db, wait_db_empty

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: Free space left on the tmpfs before the mail comes: the mail fills it.
HEADROOM = 3 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted for the test (unmounted after)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(disk)],
                   check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all the free space of ``disk`` but ``leave`` bytes."""
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - leave
    path = disk / "filler"
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, size))
    return path


async def silent_hop(port: int) -> asyncio.Server:
    """A next hop that accepts connections and never says a word (attempts time out)."""
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    return await asyncio.start_server(mute, "127.0.0.1", port)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Poll an async predicate until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)


async def test_disk_full_then_freed_delivers_every_acknowledged_message(
        small_disk: Path, relay_factory: RelayFactory) -> None:
    """Disk full while the next hop is silent (the deferred results cannot be committed),
    then space freed and the hop working: ``status`` counts every stored message, and after
    ``queue retry`` every acknowledged message is delivered, none left in the spool, no
    restart."""
    hop = free_port()
    mute = await silent_hop(hop)
    relay = await relay_factory({"limits": {"min_free_disk_bytes": 0},
                                 "delivery": {"connect_timeout_seconds": 2.0,
                                              "command_timeout_seconds": 2.0,
                                              "connections_per_host": 200},
                                 "spool": {"reconcile_seconds": 2.0}},
                                smarthost=f"127.0.0.1:{hop}", data=small_disk)
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    filler = fill(small_disk, HEADROOM)
    raw = await Raw.open(relay.host, relay.port)
    assert (await raw.login(user, password)).startswith("235 ")
    acked: set[str] = set()
    refused = 0
    for n in range(1500):
        rcpt = f"m{n}@dest.test"
        reply = await raw.transaction("app@example.com", [rcpt],
                                      message(f"full {n}", body="y" * 76 + "\r\n" * 40))
        if reply.startswith("250 "):
            acked.add(rcpt)
            refused = 0
        else:
            assert reply == "451 4.3.0 Local error in processing", reply
            refused += 1
            if refused >= 30:
                break
    await raw.quit()
    assert refused >= 30, "the disk never filled up"
    assert acked
    await asyncio.sleep(7.0)  # the attempts time out; their results cannot be committed
    mute.close()  # the hop is down now: connections refused

    filler.unlink()  # space is back

    async def status_counts_the_spool() -> bool:
        queue = (await relay.ctl.ok("GET", "/v1/status"))["queue"]
        return queue["queued"] == 0 and queue["deferred"] == committed_in_db(relay)

    counted = await wait_for(status_counts_the_spool, 15.0)
    stored = committed_in_db(relay)
    queue = (await relay.ctl.ok("GET", "/v1/status"))["queue"]
    listed = len((await relay.ctl.ok("GET", "/v1/queue"))["items"])

    sink = await start_sink(port=hop)
    try:
        stuck = stored
        for _ in range(10):
            # A next hop swamped by every message at once may defer some (connect
            # timeout): an operator says retry again; mail the scheduler lost never moves.
            await relay.ctl.ok("POST", "/v1/queue/retry", {})
            stuck = await wait_db_empty(relay, 4.0)
            if not stuck:
                break
        delivered = {m.rcpt_tos[0] for m in sink.messages}
    finally:
        assert sink.server is not None
        sink.server.close()
    print(f"disk full: {len(acked)} acknowledged, {stored} stored after the space came back"
          f" (status: {queue}, queue list: {listed}); {len(acked & delivered)} delivered,"
          f" {stuck} stuck in the spool")
    assert counted, f"status {queue} while the spool holds {stored} messages"
    assert listed == stored
    assert stuck == 0, f"{stuck} acknowledged messages stuck in the spool"
    assert acked <= delivered
    final = (await relay.ctl.ok("GET", "/v1/status"))["queue"]
    assert final["queued"] == final["deferred"] == 0
