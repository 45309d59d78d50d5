"""Helpers for the operations tests: a /metrics scraper, the JSON lines of a relayd log
and a stand-in for systemd's notify socket.

No tests here.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import RelayProcess

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    """GET /metrics and return {(sample name, labels): value}."""
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, frozenset(smp.labels.items()))] = smp.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (KeyError if it is not exposed)."""
    return samples[(name, frozenset(labels.items()))]


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a relayd log file (other lines skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


async def wait_log(rp: RelayProcess, event: str, count: int = 1,
                   timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait until a relay process's log has ``count`` lines with this event."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [x for x in log_lines(rp.log) if x.get("event") == event]
        if len(lines) >= count:
            return lines
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {event!r} in {rp.log.read_text()[-2000:]}")
        await asyncio.sleep(0.02)


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        """Every datagram received so far (in order)."""
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    async def wait_for(self, text: str, timeout: float = 20.0) -> list[str]:
        """Wait until a datagram containing ``text`` has arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(text in m for m in self.drain()):
            if loop.time() > deadline:
                raise TimeoutError(f"no {text!r} in {self.messages}")
            await asyncio.sleep(0.02)
        return self.messages

    def close(self) -> None:
        """Close and unlink."""
        self.sock.close()
        os.unlink(self.path)
