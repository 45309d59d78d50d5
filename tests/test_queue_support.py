"""Helpers shared by the queue and delivery tests (no tests here).

- ``FakeClock``: a controllable clock to put in place of ``Scheduler.clock``,
  so backoff and sending-limit windows pass without sleeping;
- ``submit``: send messages through the relay with a real SMTP client;
- ``eventually``: poll a condition for a short real time (for asynchronous
  effects such as delivery; never to let scheduled time pass);
- ``StallServer``: a TCP server that accepts and then never answers, or that
  answers like SMTP but stalls before replying to the end of DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.conftest import RelayHandle, message


class FakeClock:
    """POSIX time that moves only when told to (starts 1 s after a UTC minute)."""

    def __init__(self, start: float | None = None) -> None:
        base = time.time() if start is None else start
        self.now = math.floor(base / 60) * 60 + 61.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


def install_clock(relay: RelayHandle, clock: FakeClock | None = None) -> FakeClock:
    """Replace the scheduler's clock (and the lifecycle's) with a fake one."""
    clock = clock or FakeClock()
    relay.relay.scheduler.clock = clock
    relay.relay.lifecycle.clock = clock
    return clock


async def submit(relay: RelayHandle, account: tuple[str, str], rcpts: list[str], *,
                 count: int = 1, sender: str = "app@example.com",
                 subject: str = "m") -> list[str]:
    """Send ``count`` messages over one session; return their queue ids."""
    client = await relay.client(*account)
    ids = []
    try:
        for i in range(count):
            errors, reply = await client.sendmail(sender, rcpts,
                                                  message(f"{subject}{i}", sender=sender))
            assert errors == {}, errors
            ids.append(reply.rsplit(" ", 1)[1])
    finally:
        await client.quit()
    return ids


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(0.02)


async def until(probe: Callable[[], Awaitable[Any]], want: Any, timeout: float = 10.0) -> None:
    """Poll ``await probe()`` until it equals ``want`` (queue states have no event)."""
    seen: list[Any] = []

    async def equal() -> bool:
        seen.append(await probe())
        return bool(seen[-1] == want)

    try:
        await eventually(equal, timeout)
    except AssertionError:
        raise AssertionError(f"still {seen[-1]!r}, wanted {want!r}") from None


async def queued(relay: RelayHandle, user: str) -> int:
    """The account's count of messages not yet final, as ``user show`` says."""
    return int((await relay.ctl.ok("GET", f"/v1/users/{user}"))["queued"])


async def log_entries(relay: RelayHandle, **query: Any) -> list[dict[str, Any]]:
    """The delivery log through the control socket (newest first)."""
    data = await relay.ctl.ok("GET", "/v1/log", **query)
    entries: list[dict[str, Any]] = data["entries"]
    return entries


async def message_log(relay: RelayHandle, message_id: str, n: int) -> list[dict[str, Any]]:
    """The log entries of one message, once there are ``n`` of them (newest first)."""
    async def enough() -> list[dict[str, Any]] | None:
        entries = [e for e in await log_entries(relay) if e["message_id"] == message_id]
        return entries if len(entries) >= n else None
    result: list[dict[str, Any]] = await eventually(enough)
    return result


async def queue_items(relay: RelayHandle, **query: Any) -> list[dict[str, Any]]:
    """``queue list`` through the control socket."""
    data = await relay.ctl.ok("GET", "/v1/queue", **query)
    items: list[dict[str, Any]] = data["items"]
    return items


class StallServer:
    """A loopback TCP server that stalls: silent at once, or after RCPTs (``at_data``)."""

    def __init__(self, *, at_data: bool = False) -> None:
        self.at_data = at_data
        self.connections = 0
        self.data_started = asyncio.Event()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        """HOST:PORT."""
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> StallServer:
        """Listen on ``port`` (an ephemeral one by default)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            if not self.at_data:
                await reader.read()  # never say anything
                return
            writer.write(b"220 stall.test ESMTP\r\n")
            in_data = False
            while line := await reader.readline():
                verb = line[:4].upper()
                if in_data:
                    if line == b".\r\n":
                        self.data_started.set()
                        await reader.read()  # never answer the end of DATA
                        return
                    continue
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 stall.test\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    in_data = True
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                await writer.drain()

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
