"""A TCP forwarder a test puts between one relayd node and PostgreSQL, to cut it off.

``TcpProxy(host, port)`` listens on 127.0.0.1 (a free port, ``proxy.port``) and forwards
each connection to ``host:port``. ``cut()`` stands for a network partition where packets
vanish: every open connection is aborted (a TCP reset to the client, the upstream side
closed), and connections made meanwhile are accepted and held open, nothing read from
them and nothing forwarded, until ``restore()`` (which closes the held ones; new
connections are forwarded again) or ``close()``. ``close()`` ends everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import cast

#: Bytes read from one side before they are written to the other.
CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection at once with a TCP reset (SO_LINGER 0), discarding its buffers."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host:target_port`` until ``cut()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.is_cut = False
        self.forwarded = 0  # connections forwarded so far
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._held: set[asyncio.StreamWriter] = set()

    @property
    def held(self) -> int:
        """Connections accepted while cut and held open without being answered."""
        return len(self._held)

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Hold the connection while cut, else forward it until either side closes."""
        if self.is_cut:
            cast(asyncio.Transport, writer.transport).pause_reading()
            self._held.add(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._links[task] = [writer]
        try:
            await self._forward(reader, writer, self._links[task])
        finally:
            self._links.pop(task, None)
            writer.transport.abort()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       link: list[asyncio.StreamWriter]) -> None:
        """Connect upstream and copy both ways until one side closes or ``cut()``."""
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host,
                                                                 self.target_port)
        except OSError:
            _reset(writer)
            return
        link.append(up_writer)
        if self.is_cut:  # cut while connecting upstream
            _reset(writer)
            _reset(up_writer)
            return
        self.forwarded += 1
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            up_writer.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction until end of stream or a connection error."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        """From now on forward nothing: reset every open connection, hold new ones."""
        self.is_cut = True
        for writers in self._links.values():
            for writer in writers:
                _reset(writer)

    def restore(self) -> None:
        """Forward new connections again; the held ones are closed."""
        self.is_cut = False
        self._release_held()

    def _release_held(self) -> None:
        """Reset every connection held while cut."""
        for writer in self._held:
            _reset(writer)
        self._held.clear()

    async def close(self) -> None:
        """Stop listening and close every connection, forwarded or held."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._links)
        self.cut()
        self._release_held()
        if tasks:  # each ends once its sockets are reset; bounded all the same
            await asyncio.wait(tasks, timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
