"""Helpers for tests that run relayd as a real process (restart, crash, signals)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parent.parent

BASE_TOML = """
[server]
hostname = "relay.test"
log_level = "info"
shutdown_grace_seconds = 10.0
[credentials]
argon2_time_cost = 1
argon2_memory_cost_kib = 1024
argon2_parallelism = 1
[delivery]
retry_first_seconds = 1.0
retry_max_seconds = 2.0
retry_jitter = 0.0
connect_timeout_seconds = 2.0
command_timeout_seconds = 5.0
[metrics]
listen = ""
[spool]
last_connection_flush_seconds = 0.2
"""


#: Every relayd process a test started; the session fixture in conftest kills leftovers.
LIVE: set[asyncio.subprocess.Process] = set()


def kill_leftovers() -> None:
    """SIGKILL every relayd a test started and did not stop (a failed test's)."""
    for proc in list(LIVE):
        if proc.returncode is None:
            try:
                proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        LIVE.discard(proc)


def free_port() -> int:
    """An ephemeral loopback port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess:
    """relayd in a subprocess with its own data dir and ports."""

    def __init__(self, tmp: Path, smarthost: str | None, extra_toml: str = "",
                 env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.tmp = tmp
        self.data = tmp / "var"
        self.sock = str(self.data / "control.sock")
        self.port = free_port()
        self.smarthost = smarthost or ""  # "": no --smarthost, the file's [delivery] applies
        self.config = tmp / "relayd.toml"
        self.config.write_text(BASE_TOML + extra_toml)
        self.proc: asyncio.subprocess.Process | None = None
        self.log = tmp / "relayd.log"
        self.env = env or {}  # extra environment for the child (e.g. NOTIFY_SOCKET)
        self.args = args or []  # extra command-line arguments (e.g. --cluster-dsn)

    async def start(self) -> None:
        """Start and wait until the SMTP port answers."""
        logf = open(self.log, "ab")  # handed to the child process, closed after spawn
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd.app", "--config", str(self.config),
            "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data),
            "--control-socket", self.sock,
            *(["--smarthost", self.smarthost] if self.smarthost else []), *self.args,
            cwd=REPO, stdout=logf, stderr=logf, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        LIVE.add(self.proc)
        logf.close()
        for _ in range(300):
            if self.proc.returncode is not None:
                raise RuntimeError(f"relayd exited: {self.log.read_text()[-2000:]}")
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                line = await asyncio.wait_for(r.readline(), 2)
                w.close()
                if line.startswith(b"220"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("relayd did not start")

    async def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def sender(self, domain: str = "example.com") -> aiosmtplib.SMTP:
        """Create ``domain`` and an account on it; return a client authenticated as it."""
        await self.ctl("domain", "add", domain)
        cred = await self.ctl("user", "add", "--domain", domain)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False)
        await client.connect()
        await client.ehlo()
        await client.auth_plain(cred["username"], cred["password"])
        return client

    async def ctl(self, *args: str) -> dict:
        """relayctl --json ... against this relay."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control.cli", "--socket", self.sock, "--json", *args,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return json.loads(out)
