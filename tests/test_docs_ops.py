"""The live backup of docs/OPERATIONS.md §4 works: the script printed there, run against a
relayd that is accepting and delivering mail, gives a spool that a new relayd starts on
and delivers completely."""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import message, start_sink
from tests.procs import REPO, RelayProcess, free_port
from tests.tools import require_tool

pytestmark = pytest.mark.slow

LARGE = 300 * 1024  # over the spool's 256 KiB: a file of its own in relayd.bodies/


def _backup_script() -> str:
    """The ``sh`` block after the relayd-backup marker in docs/OPERATIONS.md."""
    text = (REPO / "docs" / "OPERATIONS.md").read_text("utf-8")
    m = re.search(r"<!-- relayd-backup:.*?-->\s*```sh\n(.*?)```", text, re.S)
    assert m, "no relayd-backup script in docs/OPERATIONS.md"
    return m.group(1)


def _large(i: int) -> bytes:
    return message(f"large {i}") + (b"x" * 76 + b"\r\n") * (LARGE // 78)


@pytest.mark.timeout(180)
async def test_live_backup_restores_and_delivers(tmp_path: Path) -> None:
    """A backup taken while mail arrives and leaves restores into a relayd that delivers it all."""
    require_tool("sqlite3")  # the backup script runs the sqlite3 command-line tool
    script = tmp_path / "relayd-backup"
    script.write_text(_backup_script())
    sink = await start_sink()
    # Deferred recipients keep mail (small and large) in the queue across the backup.
    for i in range(40):
        sink.rcpt_script[f"wait{i}@dest.test"] = "451 4.3.0 try later"
    (tmp_path / "a").mkdir()
    relay = RelayProcess(tmp_path / "a", sink.address)
    await relay.start()
    client = await relay.sender()
    stop = asyncio.Event()

    async def traffic() -> None:  # mail that arrives and leaves while the backup runs
        i = 0
        while not stop.is_set():
            await client.sendmail("app@example.com", [f"now{i}@dest.test"],
                                  _large(i) if i % 4 == 0 else message(f"now {i}"))
            i += 1

    try:
        for i in range(40):
            await client.sendmail("app@example.com", [f"wait{i}@dest.test"],
                                  _large(i) if i % 2 == 0 else message(f"wait {i}"))
        busy = asyncio.create_task(traffic())
        await asyncio.sleep(0.5)
        dest = tmp_path / "backup"
        proc = await asyncio.create_subprocess_exec(
            "sh", str(script), str(relay.data), str(dest),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == str(dest)
        stop.set()
        await busy
        await client.quit()
        assert await relay.terminate() == 0
    finally:
        assert sink.server is not None
        sink.server.close()

    with sqlite3.connect(dest / "relayd.sqlite3") as db:
        rcpts = {r[0] for r in db.execute("SELECT rcpt FROM recipients")}
        large = {int(r[0]) for r in db.execute("SELECT id FROM messages WHERE external = 1")}
    assert {f"wait{i}@dest.test" for i in range(40)} <= rcpts
    assert len(large) >= 20
    files = {int(p.name) for p in (dest / "relayd.bodies").iterdir()}
    assert large <= files  # every large message in the backup has its data

    # Restore into a new data directory; the next hop now takes everything.
    (tmp_path / "b").mkdir()
    restored = RelayProcess(tmp_path / "b", f"127.0.0.1:{free_port()}")
    shutil.copytree(dest, restored.data)
    sink2 = await start_sink(port=int(restored.smarthost.rsplit(":", 1)[1]))
    try:
        await restored.start()
        got = await sink2.wait_for(len(rcpts), timeout=60)
        await asyncio.sleep(0.5)
        assert {m.rcpt_tos[0] for m in got} == rcpts  # each once, nothing missing
        assert len(got) == len(rcpts)
        sizes = [len(m.data) for m in got if m.rcpt_tos[0].startswith("wait")]
        assert sum(1 for s in sizes if s > LARGE) == 20  # large bodies intact
        status = await restored.ctl("status")
        assert not any(status["queue"].values()), status
        # Files copied for mail accepted after the snapshot were removed at start.
        assert not list((restored.data / "relayd.bodies").iterdir())
        assert await restored.terminate() == 0
    finally:
        assert sink2.server is not None
        sink2.server.close()
