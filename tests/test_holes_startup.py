"""Start-up faults of the spool (issue 12, item 3): relayd exits 3 promptly with one clear
line on stderr, no traceback, and leaves no child process behind.

A damaged spool (zeroed or random pages), an immutable database file, a data
dir on a read-only mount or that is a regular file, and a 0-byte database file.
Each run goes through a small wrapper that is a child subreaper
(``PR_SET_CHILD_SUBREAPER``): whatever relayd leaves running or unreaped (its
delivery agent and signing children) becomes the wrapper's child when relayd
exits, and is counted there. A relayd that does not exit within ``BOUND``
seconds is killed and reported as hung.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import BASE_TOML, REPO, RelayProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: Seconds relayd may take to start and give up (Python start-up on a busy machine included).
BOUND = 25.0

# Runs relayd (argv[2:]) as its child; prints what happened as one JSON object.
_WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, tempfile, time

if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    raise SystemExit("prctl failed")
bound = float(sys.argv[1])
err = tempfile.TemporaryFile()
start = time.monotonic()
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=err)
try:
    proc.wait(timeout=bound)
    hung = False
except subprocess.TimeoutExpired:
    hung = True
    proc.kill()
    proc.wait()
elapsed = time.monotonic() - start


def children():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.append({"pid": int(name), "state": fields[0], "cmd": cmd})
    return found


left = children()
for child in left:
    try:
        os.kill(child["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
err.seek(0)
print(json.dumps({"rc": proc.returncode, "hung": hung, "elapsed": round(elapsed, 2),
                  "stderr": err.read().decode(errors="replace"), "left": left}))
"""


async def _run_relayd(tmp: Path) -> dict[str, Any]:
    """Start relayd on ``tmp/var`` under the subreaper wrapper; what happened."""
    data = tmp / "var"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRAPPER, str(BOUND),
        sys.executable, "-m", "relayd.app", "--config", str(tmp / "relayd.toml"),
        "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data),
        "--control-socket", str(data / "control.sock"), "--smarthost", "127.0.0.1:9",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), BOUND + 30)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def _exits_3_with_one_line(result: dict[str, Any]) -> str:
    """Assert the promised exit: prompt, code 3, one ``relayd:`` line, no child left."""
    err = result["stderr"]
    assert not result["hung"], f"relayd still running after {BOUND} s; stderr: {err[-2000:]}"
    assert result["left"] == [], f"children left behind: {result['left']}"
    assert result["rc"] == 3, (result["rc"], err[-2000:])
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("relayd: ")
    return str(lines[0])


async def _spool_with_mail(tmp: Path, messages: int = 20) -> Path:
    """A real spool with a domain, an account and ``messages`` queued messages (next hop
    down), written by relayd and stopped cleanly; returns the database file."""
    relay = RelayProcess(tmp, "127.0.0.1:9")
    await relay.start()
    client = await relay.sender("example.com")
    for n in range(messages):
        await client.sendmail("app@example.com", [f"r{n}@dest.test"],
                              f"From: app@example.com\r\nSubject: {n}\r\n\r\nhello\r\n".encode())
    await client.quit()
    assert await relay.terminate() == 0
    db = relay.data / "relayd.sqlite3"
    assert db.stat().st_size > 8 * 4096
    return db


@pytest.fixture
def undo() -> Iterator[list[list[str]]]:
    """Commands run at teardown, last first (chattr -i, umount), whatever the test did."""
    commands: list[list[str]] = []
    yield commands
    for cmd in reversed(commands):
        subprocess.run(cmd, check=False, capture_output=True, timeout=30)


def _root_command(cmd: list[str]) -> None:
    """Run a command that needs root and kernel support; skip the test if it fails."""
    done = subprocess.run(cmd, check=False, capture_output=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"{' '.join(cmd)}: {done.stderr.decode().strip()}")


async def test_zeroed_page_exits_3(tmp_path: Path) -> None:
    """A spool with queued mail whose page 2 is zeroed: exit 3, "damaged", at start."""
    db = await _spool_with_mail(tmp_path)
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(bytes(4096))
    line = _exits_3_with_one_line(await _run_relayd(tmp_path))
    assert "damaged" in line and str(db) in line, line


async def test_random_pages_exit_3(tmp_path: Path) -> None:
    """A spool with queued mail whose pages after the first two are random bytes: exit 3."""
    db = await _spool_with_mail(tmp_path)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(2 * 4096)
        f.write(os.urandom(size - 2 * 4096))
    line = _exits_3_with_one_line(await _run_relayd(tmp_path))
    assert "damaged" in line, line


async def test_immutable_database_exits_3(tmp_path: Path, undo: list[list[str]]) -> None:
    """An immutable spool file (chattr +i): exit 3, "cannot be written", the file named."""
    db = await _spool_with_mail(tmp_path)
    undo.append(["chattr", "-i", str(db)])
    _root_command(["chattr", "+i", str(db)])
    line = _exits_3_with_one_line(await _run_relayd(tmp_path))
    assert "cannot be written" in line and str(db) in line, line


async def test_read_only_data_dir_exits_3(tmp_path: Path, undo: list[list[str]]) -> None:
    """A data dir (with a spool in it) on a read-only mount: exit 3, not 4 "cannot listen"."""
    db = await _spool_with_mail(tmp_path)
    data = db.parent
    _root_command(["mount", "--bind", str(data), str(data)])
    undo.append(["umount", str(data)])
    _root_command(["mount", "-o", "remount,ro,bind", str(data)])
    line = _exits_3_with_one_line(await _run_relayd(tmp_path))
    assert "read-only file system" in line and str(data) in line, line


async def test_data_dir_is_a_file_exits_3(tmp_path: Path) -> None:
    """A --data-dir that is a regular file: exit 3, "not a directory", not 4."""
    (tmp_path / "relayd.toml").write_text(BASE_TOML)
    data = tmp_path / "var"
    data.write_text("not a directory\n")
    line = _exits_3_with_one_line(await _run_relayd(tmp_path))
    assert "not a directory" in line and str(data) in line, line


async def test_empty_database_file_is_refused(tmp_path: Path) -> None:
    """A 0-byte spool file is refused (exit 3, how to start fresh), not made a new spool."""
    db = await _spool_with_mail(tmp_path, messages=1)
    with open(db, "r+b") as f:
        f.truncate(0)
    line = _exits_3_with_one_line(await _run_relayd(tmp_path))
    assert "0-byte" in line and "remove the file" in line, line
    assert db.stat().st_size == 0  # left as found
