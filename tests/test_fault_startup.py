"""A spool that cannot be used at start (corrupted, busy, unreadable): relayd exits 3
with one clear line on stderr, never a traceback or a restart loop."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.procs import BASE_TOML, REPO, RelayProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def _run_relayd(tmp: Path) -> tuple[int, str]:
    """Start relayd on ``tmp/var``; return its exit code and stderr."""
    cfg = tmp / "relayd.toml"
    cfg.write_text(BASE_TOML)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd.app", "--config", str(cfg),
        "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp / "var"),
        "--control-socket", str(tmp / "var" / "control.sock"), "--smarthost", "127.0.0.1:9",
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("relayd kept running on an unusable spool") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _one_clear_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("relayd: ")
    return lines[0]


async def _make_spool(tmp: Path) -> Path:
    """A real spool with one domain, written by relayd and stopped cleanly."""
    relay = RelayProcess(tmp, "127.0.0.1:9")
    await relay.start()
    await relay.ctl("domain", "add", "example.com")
    assert await relay.terminate() == 0
    return relay.data / "relayd.sqlite3"


async def test_garbage_database_file_exits_3(tmp_path: Path) -> None:
    """A spool file that is not a database: exit 3, one line naming the file."""
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "relayd.sqlite3").write_bytes(os.urandom(64 * 1024))
    rc, err = await _run_relayd(tmp_path)
    assert rc == 3
    assert "relayd.sqlite3" in _one_clear_line(err)


async def test_corrupted_pages_exit_3(tmp_path: Path) -> None:
    """A real spool whose pages after the header are overwritten: exit 3, one line."""
    db = await _make_spool(tmp_path)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(100)
        f.write(os.urandom(size - 100))
    rc, err = await _run_relayd(tmp_path)
    assert rc == 3
    _one_clear_line(err)


async def test_locked_database_exits_3(tmp_path: Path) -> None:
    """A spool held locked by another process: exit 3 after the busy timeout, one line."""
    (tmp_path / "var").mkdir()
    db = tmp_path / "var" / "relayd.sqlite3"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t(x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        rc, err = await _run_relayd(tmp_path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert rc == 3
    assert "locked" in _one_clear_line(err)


async def test_newer_schema_exits_3(tmp_path: Path) -> None:
    """A spool written by a newer relayd (higher schema version): exit 3, one line."""
    db = await _make_spool(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version=99")
    conn.commit()
    conn.close()
    rc, err = await _run_relayd(tmp_path)
    assert rc == 3
    assert "newer" in _one_clear_line(err)


async def test_unusable_bodies_directory_exits_3(tmp_path: Path) -> None:
    """The directory for large messages' files cannot be made (a file is in its place):
    exit 3, one clear line naming it."""
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "relayd.bodies").write_bytes(b"not a directory")
    rc, err = await _run_relayd(tmp_path)
    assert rc == 3
    assert "relayd.bodies" in _one_clear_line(err)
