"""Health and status: ``relayctl status`` (the real CLI) and ``GET /v1/health``.

A real relay in the test's loop; relayctl runs as a subprocess against its
control socket, so it sees what an operator sees.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relayd.app import VERSION
from tests.conftest import RelayFactory, RelayHandle, message
from tests.procs import free_port
from tests.rawsmtp import Raw
from tests.test_queue_support import install_clock
from tests.test_relayctl import relayctl


async def _status(h: RelayHandle) -> dict[str, Any]:
    rc, out, err = await relayctl(h.ctl.path, "--json", "status")
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


async def _send(h: RelayHandle, user: str, password: str, n: int) -> None:
    c = await Raw.open(h.host, h.port)
    assert (await c.login(user, password)).startswith("235 ")
    for i in range(n):
        reply = await c.transaction("app@example.com", [f"r{i}@dest.test"], message(f"m{i}"))
        assert reply.startswith("250 "), reply
    await c.quit()


async def _until(h: RelayHandle, key: str, want: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Poll /v1/status until ``st[key]`` (dotted for queue states) equals ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        st = await h.ctl.ok("GET", "/v1/status")
        got = st["queue"][key[6:]] if key.startswith("queue.") else st[key]
        if got == want or time.monotonic() > deadline:
            return dict(st)
        await asyncio.sleep(0.05)


@pytest.fixture
async def stalled_hop() -> AsyncIterator[int]:
    """A next hop that accepts TCP connections and never says a word."""
    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        w.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_status_shows_version_uptime_listeners_spool_and_disk(
        relay: RelayHandle) -> None:
    """relayctl status --json has the version, a growing uptime, every listener, the spool
    size and the free disk of the spool's file system."""
    first = await _status(relay)
    await asyncio.sleep(0.05)
    st = await _status(relay)
    assert st["version"] == VERSION
    assert st["uptime_seconds"] > first["uptime_seconds"] > 0
    kinds = {x["kind"]: x["address"] for x in st["listeners"]}
    assert kinds == {"smtp": f"{relay.host}:{relay.port}",
                     "metrics": relay.metrics_url.split("/")[2],
                     "control": relay.ctl.path}
    assert st["spool_bytes"] >= (relay.data_dir / "relayd.sqlite3").stat().st_size > 0
    free = shutil.disk_usage(relay.data_dir).free
    assert abs(st["free_disk_bytes"] - free) < max(free // 10, 1 << 20)


async def test_status_counts_domains_accounts_and_sessions(relay: RelayHandle) -> None:
    """Domains, accounts (plan slots) and open SMTP sessions are counted."""
    await relay.ctl.add_domain("example.com")
    await relay.ctl.add_user("example.com")
    await relay.ctl.add_user("example.com")
    c = await Raw.open(relay.host, relay.port)
    st = await _status(relay)
    await c.quit()
    assert (st["domains"], st["accounts"], st["sessions"]) == (1, 2, 1)


async def test_status_shows_queue_depths_by_state(relay_factory: RelayFactory) -> None:
    """With the next hop down and a limit of one message a minute, three messages show as
    one deferred and two waiting for the limit; disabling the account holds those two."""
    h = await relay_factory({"limits": {"per_minute": 1}}, smarthost=f"127.0.0.1:{free_port()}")
    install_clock(h)  # the minute must not roll over while the test looks
    await h.ctl.add_domain("example.com")
    user, password = await h.ctl.add_user("example.com")
    await _send(h, user, password, 3)
    await _until(h, "queue.deferred", 1)
    st = await _status(h)
    assert st["queue"] == {"queued": 0, "waiting_limit": 2, "held": 0, "deferred": 1}
    await h.ctl.ok("POST", f"/v1/users/{user}/disable")
    st = await _status(h)
    assert st["queue"] == {"queued": 0, "waiting_limit": 0, "held": 2, "deferred": 1}


async def test_status_counts_messages_in_flight(relay_factory: RelayFactory,
                                                stalled_hop: int) -> None:
    """A message being transmitted to a next hop that does not answer is in flight."""
    h = await relay_factory({"delivery": {"connect_timeout_seconds": 1.0,
                                          "command_timeout_seconds": 1.0}},
                            smarthost=f"127.0.0.1:{stalled_hop}")
    await h.ctl.add_domain("example.com")
    user, password = await h.ctl.add_user("example.com")
    assert (await _status(h))["in_flight"] == 0
    await _send(h, user, password, 1)
    st = await _until(h, "in_flight", 1)
    assert st["in_flight"] == 1
    # The attempt times out and is deferred: the in-flight count drops when the
    # transmission ends, the deferral shows once its result is committed.
    st = await _until(h, "queue.deferred", 1)
    assert (st["in_flight"], st["queue"]["deferred"]) == (0, 1)


async def test_status_text_names_every_field(relay: RelayHandle) -> None:
    """The human output of relayctl status shows version, listeners, queue, in-flight count,
    spool size and free disk."""
    rc, out, err = await relayctl(relay.ctl.path, "status")
    assert rc == 0, err
    assert out.startswith(f"relayd {VERSION}, up ")
    for needle in (f"listening (smtp): {relay.host}:{relay.port}", "queue: queued=0",
                   "deferred=0", "in flight: 0", "spool: ", "free disk: "):
        assert needle in out, needle


async def test_health_answers_ok(relay: RelayHandle) -> None:
    """GET /v1/health answers {"ok": true}."""
    assert await relay.ctl.ok("GET", "/v1/health") == {"ok": True}
