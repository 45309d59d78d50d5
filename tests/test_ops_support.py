"""Helpers for the operations tests: a raw SMTP client and a /metrics scraper.

No tests here. The raw client speaks the protocol line by line, so a test
controls exactly what is sent when (half a DATA body, then a signal).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


class Raw:
    """A line-level SMTP client over a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.banner = ""

    @classmethod
    async def open(cls, host: str, port: int) -> Raw:
        """Connect and read the greeting."""
        r, w = await asyncio.open_connection(host, port)
        c = cls(r, w)
        code, c.banner = await c.reply()
        assert code == 220, c.banner
        return c

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        """One (possibly multi-line) reply: (code, text of the last line)."""
        while True:
            line = (await asyncio.wait_for(self.r.readline(), timeout)).decode()
            if not line:
                raise ConnectionError("connection closed")
            if line[3:4] != "-":
                return int(line[:3]), line.rstrip("\r\n")

    async def cmd(self, line: str) -> tuple[int, str]:
        """Send one command line and read its reply."""
        self.w.write(line.encode() + b"\r\n")
        await self.w.drain()
        return await self.reply()

    async def write(self, data: bytes) -> None:
        """Send raw bytes (part of a DATA body)."""
        self.w.write(data)
        await self.w.drain()

    async def login(self, username: str, password: str) -> tuple[int, str]:
        """EHLO and AUTH PLAIN with an initial response."""
        assert (await self.cmd("EHLO client.test"))[0] == 250
        blob = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {blob}")

    async def send(self, sender: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
        """One transaction after login; returns the reply to the end of DATA."""
        code, text = await self.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, text
        for rcpt in rcpts:
            code, text = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, text
        code, text = await self.cmd("DATA")
        assert code == 354, text
        await self.write(data + b"\r\n.\r\n")
        return await self.reply()

    async def close(self) -> None:
        """QUIT (if still possible) and close."""
        try:
            await self.cmd("QUIT")
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        self.w.close()


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
