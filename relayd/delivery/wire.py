"""The wire between relayd and its child processes: frames and framing.

Owns: the frames the main process and its children (relayd.delivery.agents
starts them, relayd.delivery.agent_child runs in them) exchange, and how they
travel: a Unix socketpair per child, frames of a 4-byte big-endian length and
a msgpack body (msgspec, tagged array-like structs). A frame may be followed
by raw bytes (a message's data, ``size`` of them): packing the data into the
frame would copy it twice on each side. Small frames written in one loop
iteration go out in one write; large tails are written as they are.

Parent to a delivery agent: ``Configure`` (first, and after a reload), ``Job``,
``Close``; back: ``Result`` (one per job). Parent to the signing child:
``SignKey`` (a key, once, before its first use), ``Sign``, ``ForgetKey``,
``Close``; back: ``Signed`` (one per ``Sign``).

Untrusted input: none (frames come only from our own processes).
See also: relayd.delivery.agents (the parent side), relayd.delivery.agent_child.
"""

from __future__ import annotations

import asyncio

import msgspec

from relayd.config import DeliveryConfig

_LEN = 4
_DIRECT = 64 * 1024  # pieces this large are written alone, not joined into a frame


class Configure(msgspec.Struct, array_like=True, tag=1):
    """Settings for the child's deliverer (sent first and after a reload)."""

    cfg: DeliveryConfig
    helo: str


class Job(msgspec.Struct, array_like=True, tag=2):
    """One transaction at one hop."""

    id: int
    host: str
    port: int
    tls: str
    username: str
    password: str
    sender: str
    rcpts: list[str]
    size: int  # the message data follows the frame: this many raw bytes...
    path: str = ""  # ...unless it is in this spool file, which the child reads itself
    mx: str = ""  # the MX host name (TLS SNI, the name a certificate is verified against)
    per_connection: int = 0  # Hop.messages_per_connection
    tlsa: tuple[tuple[int, int, int, bytes], ...] = ()  # Hop.tlsa (DANE; MX hops only)


class Close(msgspec.Struct, array_like=True, tag=3):
    """Stop: drop what is still running, QUIT pooled connections, exit."""


class Result(msgspec.Struct, array_like=True, tag=4):
    """The replies to one job, one (code, text) per recipient, in order (``at_rcpt``: the
    positions whose reply was to their own RCPT)."""

    id: int
    replies: list[tuple[int | None, str]]
    opened: int  # connections the child opened since it started
    at_rcpt: list[int] = []
    tls: str = ""  # MX hops: what TLS achieved (relayd.delivery.tlslevels.TLS_OUTCOMES)


class SignKey(msgspec.Struct, array_like=True, tag=5):
    """A DKIM key the child keeps for ``Sign`` jobs (sent once, before its first use)."""

    key_id: int
    domain: str
    selector: str
    pem: bytes


class Sign(msgspec.Struct, array_like=True, tag=6):
    """DKIM signature headers for a message, by these keys, in this order."""

    id: int
    keys: list[int]
    now: int
    size: int  # the message follows the frame: this many raw bytes


class Signed(msgspec.Struct, array_like=True, tag=7):
    """The headers for one ``Sign``, or the error that prevented them."""

    id: int
    headers: bytes
    error: str = ""


class ForgetKey(msgspec.Struct, array_like=True, tag=8):
    """A key no longer used (its ``Signer`` is gone: domain deleted, key replaced)."""

    key_id: int


#: What a delivery agent reads.
ToAgent = Configure | Job | Close
#: What the signing child reads.
ToSigner = SignKey | Sign | ForgetKey | Close
#: What the parent reads.
FromChild = Result | Signed


class Framed(asyncio.Protocol):
    """Length-prefixed msgpack frames over a stream, writes coalesced per loop turn.

    A frame may be followed by a raw tail (``tail_size`` says how long): the
    tail's chunks are kept as they arrive and joined once.
    """

    def __init__(self, decode_type: object) -> None:
        self._decoder = msgspec.msgpack.Decoder(decode_type)
        self._encoder = msgspec.msgpack.Encoder()
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._tail_of: object = None  # the frame whose tail is being received
        self._tail: list[bytes] = []
        self._need = 0  # bytes of that tail still to come
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        while data:
            if self._need:
                piece = data if len(data) <= self._need else data[:self._need]
                data = data[len(piece):]
                self._tail.append(piece)
                self._need -= len(piece)
                if not self._need:
                    frame, self._tail_of = self._tail_of, None
                    tail, self._tail = b"".join(self._tail), []
                    self.frame_received(frame, tail)
                continue
            data = self._frames(data)

    def _frames(self, data: bytes) -> bytes:
        """Decode the complete frames; return what follows a frame with a tail."""
        buf = self._buf
        buf.extend(data)
        start = 0
        end = len(buf)
        frames: list[tuple[object, bytes]] = []
        rest = b""
        with memoryview(buf) as view:
            while end - start >= _LEN:
                n = int.from_bytes(view[start:start + _LEN], "big")
                if end - start - _LEN < n:
                    break
                frame = self._decoder.decode(view[start + _LEN:start + _LEN + n])
                start += _LEN + n
                need = self.tail_size(frame)
                if need <= end - start:  # small tails come with their frame
                    frames.append((frame, bytes(view[start:start + need]) if need else b""))
                    start += need
                    continue
                # A large tail: the rest of the buffer is its beginning.
                self._tail_of, self._need = frame, need
                rest = bytes(view[start:])
                start = end
                break
        if start:
            del buf[:start]
        for frame, tail in frames:
            self.frame_received(frame, tail)
        return rest

    def tail_size(self, frame: object) -> int:
        """How many raw bytes follow this frame."""
        return 0

    def frame_received(self, frame: object, tail: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, frame: msgspec.Struct, tail: bytes = b"") -> None:
        """Queue a frame (and its raw tail); written together at the end of this loop turn."""
        body = self._encoder.encode(frame)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(len(body).to_bytes(_LEN, "big"))
        self._out.append(body)
        if tail:
            self._out.append(tail)

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        small: list[bytes] = []
        for piece in out:
            if len(piece) < _DIRECT:
                small.append(piece)
                continue
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(piece)  # a large message: not copied into a joined buffer
        if small:
            transport.write(b"".join(small))
