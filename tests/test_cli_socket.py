"""Where relayctl finds the control socket without --socket or $RELAYD_SOCKET:
./var/control.sock (make run), else /run/relayd/control.sock (the installed service)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from control import cli
from tests.conftest import RelayHandle

REPO = Path(__file__).resolve().parent.parent


async def test_relayctl_uses_var_control_sock_of_the_current_directory(
        relay: RelayHandle, tmp_path: Path) -> None:
    """Run from a directory whose ./var/control.sock is the relay's, relayctl reaches it."""
    cwd = tmp_path / "elsewhere"
    (cwd / "var").mkdir(parents=True)
    (cwd / "var" / "control.sock").symlink_to(relay.ctl.path)
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_SOCKET"}
    env["PYTHONPATH"] = str(REPO)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "--json", "status", cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "listeners" in json.loads(out)


def test_service_socket_is_used_when_there_is_no_development_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no ./var/control.sock, the installed service's socket is the default."""
    dev, service = tmp_path / "var" / "control.sock", tmp_path / "run" / "control.sock"
    monkeypatch.setattr(cli, "DEFAULT_SOCKETS", (str(dev), str(service)))
    assert cli.default_socket() == str(dev)  # neither exists: the first, named in the error
    service.parent.mkdir()
    service.touch()
    assert cli.default_socket() == str(service)
    dev.parent.mkdir()
    dev.touch()
    assert cli.default_socket() == str(dev)
