"""relayctl against a running relay: ``user limits``, ``queue list --state`` and
``log --status`` as an operator types them."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from tests.conftest import RelayHandle, Sink
from tests.procs import REPO
from tests.test_queue_support import eventually, install_clock, queue_items, submit


async def relayctl(relay: RelayHandle, *args: str) -> Any:
    """Run ``relayctl --json ARGS`` as a subprocess; return its decoded output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "--socket", relay.ctl.path, "--json", *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_limits_queue_and_log_from_the_cli(relay: RelayHandle, sink: Sink,
                                                 account: tuple[str, str]) -> None:
    """A limit set with relayctl holds mail as waiting_limit, visible in queue list and log."""
    clock = install_clock(relay)
    user, _ = account
    info = await relayctl(relay, "user", "limits", user, "--per-minute", "2")
    assert info["limits"]["per_minute"] == 2
    ids = await submit(relay, account, ["r@dest.test"], count=3)
    await sink.wait_for(2)

    async def waiting() -> list[dict[str, Any]]:
        return await queue_items(relay, state="waiting_limit")

    await eventually(waiting)
    listed = await relayctl(relay, "queue", "list", "--state", "waiting_limit", "--user", user)
    [item] = listed["items"]
    assert item["id"] == ids[2] and item["reset_at"] == clock.now - clock.now % 60 + 60
    log = await relayctl(relay, "log", "--user", user, "--status", "delivered")
    assert sorted(e["message_id"] for e in log["entries"]) == ids[:2]
    queued = await relayctl(relay, "log", "--user", user, "--status", "queued")
    assert [e["message_id"] for e in queued["entries"]] == ids[2:]
    shown = await relayctl(relay, "queue", "show", ids[2])
    assert shown["state"] == "waiting_limit"
