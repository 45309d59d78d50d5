"""A byte-exact SMTP client for protocol-abuse tests: it sends exactly what it is given.

Every read is bounded in time (``asyncio.wait_for``), so a server that hangs fails
the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import ssl


class Raw:
    """One raw SMTP connection over loopback."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""

    @classmethod
    async def open(cls, host: str, port: int, *, source: str | None = None,
                   tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> Raw:
        """Connect (optionally from ``source`` or over implicit TLS) and read the greeting."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None, ssl=tls,
            server_hostname="relay.test" if tls else None), timeout)
        raw = cls(reader, writer)
        raw.greeting = await raw.reply(timeout)
        return raw

    async def reply(self, timeout: float = 5.0) -> str:
        """One complete reply; a multi-line reply comes back with its lines joined by LF."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError(f"connection closed after {lines!r}")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        """Write bytes exactly as given."""
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes, timeout: float = 5.0) -> str:
        """Send one command line (CRLF added) and return its reply."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply(timeout)

    async def login(self, user: str, password: str) -> str:
        """EHLO and AUTH PLAIN; return the AUTH reply."""
        await self.cmd("EHLO client.test")
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {blob}")

    async def pending(self, wait: float = 0.3) -> bytes:
        """Whatever the server sends within ``wait`` seconds (b"" if nothing)."""
        try:
            return await asyncio.wait_for(self.reader.read(65536), wait)
        except TimeoutError:
            return b""

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    def close(self) -> None:
        """Close our side."""
        self.writer.close()


def plain(user: str, password: str) -> str:
    """The AUTH PLAIN initial response for these credentials."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()
