"""The raw SMTP client of the test suite, for the protocol-abuse and the operations tests.

It sends exactly what it is given, so a test controls what is sent when (a smuggled
terminator, half a DATA body, then a signal). Replies come back as their text.
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
        """Connect (optionally from ``source`` or over implicit TLS) and read the greeting,
        which must be a 220."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None, ssl=tls,
            server_hostname="relay.test" if tls else None), timeout)
        raw = cls(reader, writer)
        raw.greeting = await raw.reply(timeout)
        assert raw.greeting.startswith("220 "), raw.greeting
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
        """EHLO (which must get a 250) and AUTH PLAIN; return the AUTH reply."""
        ehlo = await self.cmd("EHLO client.test")
        assert ehlo.startswith("250"), ehlo
        return await self.cmd(f"AUTH PLAIN {plain(user, password)}")

    async def transaction(self, sender: str, rcpts: list[str], data: bytes) -> str:
        """MAIL, RCPT for each recipient and DATA (each must be accepted), then ``data``
        and CRLF.CRLF; return the reply to the end of DATA."""
        reply = await self.cmd(f"MAIL FROM:<{sender}>")
        assert reply.startswith("250 "), reply
        for rcpt in rcpts:
            reply = await self.cmd(f"RCPT TO:<{rcpt}>")
            assert reply.startswith("250 "), reply
        reply = await self.cmd("DATA")
        assert reply.startswith("354 "), reply
        await self.send(data + b"\r\n.\r\n")
        return await self.reply()

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

    async def quit(self) -> None:
        """QUIT (if the connection still allows it) and close."""
        try:
            await self.cmd("QUIT")
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        self.close()


def plain(user: str, password: str) -> str:
    """The AUTH PLAIN initial response for these credentials."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()
