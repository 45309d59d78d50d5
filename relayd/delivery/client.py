"""Outbound SMTP: next hops, pooled connections, per-recipient results.

Owns: keeping connections to next hops (relayd.delivery.connection: plain,
STARTTLS or implicit TLS, optional AUTH) open and reusing them for many
messages (bounded per next hop, capped messages per connection, closed when
idle), running one transaction, and mapping every outcome to a
per-recipient reply code and text. Choosing the next hop (smarthost, static
route, MX) is ``Router``'s job; classifying a code as delivered, deferred or
failed is relayd.queue.backoff's.

When the next hop advertises PIPELINING (RFC 2920), MAIL, every RCPT and
DATA go out in one write and the replies are read after; otherwise one
command per round trip. The body is dot-stuffed once and written as it is.
An accepted recipient's result is always the reply to the end of DATA, never
its RCPT reply.

A failure of the connection itself (refused, timeout, TLS failure, dropped)
gives every recipient not yet answered ``code=None``: a temporary failure.

Untrusted input: replies from remote servers (only code and text are kept;
the text is truncated and stripped of control characters before it is logged
or stored). Settings read: [delivery].
The transactions run in the delivery agent processes (``Pools``, driven by
relayd.delivery.agent_child); routing (``Deliverer``, ``Router``) stays in the
main process, which reaches the agents through the ``Transport`` it is given
(relayd.delivery.agents; relayd.app wires the two).

See also: relayd.queue.dispatch (calls ``Deliverer.send``), relayd.delivery.mx,
relayd.delivery.agents, relayd.delivery.connection.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relayd.config import DeliveryConfig, parse_hostport
from relayd.delivery import dane, tlslevels
from relayd.delivery.connection import (
    Connection,
    SMTPDaneFailed,
    SMTPException,
    SMTPServerDisconnected,
    SMTPStartTLSFailed,
    SMTPTLSRequired,
    forget_level_contexts,
)


@dataclass(frozen=True, slots=True)
class BodyFile:
    """A message's data in its spool file (relayd.store.spool keeps large messages so)."""

    path: str
    size: int

    def read(self) -> bytes:
        """The data (blocking: call from a thread)."""
        with open(self.path, "rb") as f:
            return f.read()


def body_file_error(exc: OSError) -> str:
    """The deferral text when a spool file cannot be read (purged meanwhile, or I/O)."""
    if isinstance(exc, FileNotFoundError):
        return "message data is gone (purged or delivered meanwhile)"
    return _clean(f"cannot read the message data: {exc.strerror or exc}")


@dataclass(frozen=True, slots=True)
class Hop:
    """A next hop and how to talk to it."""

    host: str
    port: int
    tls: str = "none"  # none | starttls | tls | opportunistic, or a TLS level (MX hops)
    username: str = ""
    password: str = field(default="", repr=False)
    mx: str = ""  # MX hops: the MX host name (SNI, certificate name)
    messages_per_connection: int = 0  # per-destination shaping's cap (0: the global setting)
    tlsa: tuple[dane.Tlsa, ...] = ()  # MX hops: secure TLSA records to check (DANE)
    sts: str = ""  # MX hops under an MTA-STS policy: its domain (relayd.delivery.sts)
    sts_mode: str = ""  # ...and its mode (enforce | testing)

    @property
    def name(self) -> str:
        """The hop as shown in logs, the delivery log and DSNs: ``mx.example[IP]:PORT`` when
        a name is known (as Postfix's ``relay=``), else ``IP:PORT`` (``[IPv6]:PORT``)."""
        if self.mx and self.mx != self.host:
            return f"{self.mx}[{self.host}]:{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class RcptReply:
    """The answer for one recipient: code None means no answer (connection trouble);
    ``at_rcpt``: the reply to its own RCPT (not to MAIL, DATA or the end of DATA);
    ``tls``: for a hop at a TLS level, what the connection achieved."""

    code: int | None
    text: str
    at_rcpt: bool = False
    tls: str = ""  # MX hops: what TLS achieved (relayd.delivery.tlslevels.TLS_OUTCOMES)


class _Conn:
    __slots__ = ("client", "last_used", "sent", "tls")

    def __init__(self, client: Connection, tls: str = "") -> None:
        self.client = client
        self.sent = 0
        self.last_used = time.monotonic()
        self.tls = tls  # what TLS achieved (hops at a TLS level), "" otherwise


def _clean(text: str, limit: int = 400) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)[:limit]


_GATHER_MAX = 256 * 1024  # bodies up to this size go out in one gathered write


def _write_data(transport: Connection, data: bytes) -> int:
    """Write a message's data dot-stuffed, then the end-of-data mark; return the body size.

    The stored data has CRLF line endings only (bare CR and LF are refused at
    acceptance; DSNs are built with CRLF), so a line starting with a dot is
    ``CRLF .`` or the very first byte. ``bytes.replace`` returns the data
    itself when no line starts with a dot. A small message goes out in one
    ``writelines`` (one syscall instead of three); a large one piece by piece,
    because a TLS transport's ``writelines`` joins the pieces into a copy.
    """
    pieces: list[bytes] = []
    size = len(data)
    if data.startswith(b"."):
        pieces.append(b".")
        size += 1
    body = data.replace(b"\r\n.", b"\r\n..")
    size += len(body) - len(data)
    pieces.append(body)
    pieces.append(b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n")
    if size <= _GATHER_MAX:
        transport.writelines(pieces)
    else:
        for piece in pieces:
            transport.write(piece)
    return size


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class Pool:
    """Open connections to one next hop, at most ``size`` at a time."""

    def __init__(self, hop: Hop, cfg: DeliveryConfig, helo: str,
                 tls_context: ssl.SSLContext | None) -> None:
        self.hop = hop
        self.cfg = cfg
        self.helo = helo
        self.tls_context = tls_context
        self._sem = asyncio.Semaphore(cfg.connections_per_host)
        self._idle: list[_Conn] = []
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.connections_opened = 0

    async def _open(self) -> _Conn:
        """A new connection; at level may, a failed STARTTLS is retried once in plaintext."""
        hop = self.hop
        try:
            client = await self._connect(hop.tls)
        except SMTPStartTLSFailed:
            client = await self._connect("none")  # the same host, once (Postfix: may)
            self.connections_opened += 1
            return _Conn(client, tlslevels.outcome(False, False, True))
        self.connections_opened += 1
        if not tlslevels.is_level(hop.tls):
            return _Conn(client)
        return _Conn(client, tlslevels.outcome(client.encrypted, client.verified, False,
                                               client.dane))

    async def _connect(self, tls: str) -> Connection:
        hop = self.hop
        return await Connection.open(
            hop.host, hop.port, helo=self.helo, tls=tls,
            # Static routes' opportunistic TLS encrypts without authenticating;
            # tls_verify is the smarthost's; MX hops follow their TLS level.
            verify=self.cfg.tls_verify and tls != "opportunistic",
            context=self.tls_context, username=hop.username, password=hop.password,
            connect_timeout=self.cfg.connect_timeout_seconds,
            reply_timeout=self.cfg.command_timeout_seconds,
            server_name=hop.mx, ca_file=self.cfg.tls_ca_file, tlsa=hop.tlsa)

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.last_used < self.cfg.idle_connection_seconds and \
                    conn.client.is_connected:
                return conn
            conn.client.close()
        return None

    async def send(self, sender: str, rcpts: Sequence[str], data: bytes) -> list[RcptReply]:
        """Run one transaction; return one reply per recipient, in order."""
        async with self._sem:
            conn = self._take_idle()
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self._open()
                try:
                    replies, clean = await self._transaction(conn.client, sender, rcpts, data)
                except SMTPServerDisconnected:
                    if not reused:
                        raise
                    # A pooled connection the server had closed: retry once on a new one.
                    conn.client.close()
                    conn = await self._open()
                    replies, clean = await self._transaction(conn.client, sender, rcpts, data)
            except (TimeoutError, SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
                if conn is not None:
                    conn.client.close()
                text = _clean(f"{type(exc).__name__}: {exc}") or type(exc).__name__
                tls = "refused" if isinstance(exc, SMTPTLSRequired) else ""
                if isinstance(exc, SMTPDaneFailed):
                    tls = "dane_failed"
                return [RcptReply(None, text, tls=tls) for _ in rcpts]
            if conn.tls:
                for reply in replies:
                    reply.tls = conn.tls
            conn.sent += 1
            conn.last_used = time.monotonic()
            cap = self.cfg.messages_per_connection
            if self.hop.messages_per_connection:
                cap = min(cap, self.hop.messages_per_connection)
            if clean and conn.sent < cap:
                self._park(conn)
            else:
                await conn.client.quit()
            return replies

    def _park(self, conn: _Conn) -> None:
        """Keep a connection for reuse; it is closed if nobody takes it in time."""
        self._idle.append(conn)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(
                self.cfg.idle_connection_seconds, self._reap)

    def _reap(self) -> None:
        """Say QUIT on connections idle for ``idle_connection_seconds``; look again later."""
        self._reaper = None
        now = time.monotonic()
        limit = self.cfg.idle_connection_seconds
        keep: list[_Conn] = []
        for conn in self._idle:
            if now - conn.last_used < limit and conn.client.is_connected:
                keep.append(conn)
                continue
            task = asyncio.get_running_loop().create_task(conn.client.quit())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._idle = keep
        if keep:
            due = min(c.last_used for c in keep) + limit - now
            self._reaper = asyncio.get_running_loop().call_later(max(due, 0.01), self._reap)

    async def _transaction(self, client: Connection, sender: str, rcpts: Sequence[str],
                           data: bytes) -> tuple[list[RcptReply], bool]:
        """MAIL, RCPT..., DATA. Returns the replies and whether the session is reusable.

        Raises SMTPServerDisconnected when the connection is gone before the
        reply to MAIL (a stale pooled connection: the caller retries once),
        TimeoutError or SMTPException on other connection trouble.
        """
        opts: list[str] = []
        utf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
        if utf8 and client.supports("smtputf8"):
            opts.append("SMTPUTF8")
        if client.supports("8bitmime") and not data.isascii():
            opts.append("BODY=8BITMIME")
        if client.supports("size"):
            opts.append(f"SIZE={len(data)}")
        enc = "utf-8" if utf8 else "ascii"
        head = [b"MAIL FROM:<" + sender.encode(enc) + b">" +
                b"".join(b" " + o.encode("ascii") for o in opts)]
        head += [b"RCPT TO:<" + r.encode(enc) + b">" for r in rcpts]
        if any(_CONTROL.search(c) for c in head):
            raise SMTPException("control character in an address")
        if client.supports("pipelining"):
            return await self._pipelined(client, head, data)
        return await self._one_by_one(client, head, data)

    async def _one_by_one(self, client: Connection, head: list[bytes],
                          data: bytes) -> tuple[list[RcptReply], bool]:
        """Without PIPELINING: each command waits for its reply."""
        out: list[RcptReply | None] = [None] * (len(head) - 1)
        code, text = await client.command(head[0])
        if code != 250:
            await client.rset()
            return [RcptReply(code, _clean(text)) for _ in out], code < 500 or \
                client.is_connected
        accepted: list[int] = []
        for i, rcpt in enumerate(head[1:]):
            code, text = await client.command(rcpt)
            if code in (250, 251):
                accepted.append(i)
            else:
                out[i] = RcptReply(code, _clean(text), at_rcpt=True)
        if not accepted:
            await client.rset()
            return [r or RcptReply(None, "no reply") for r in out], client.is_connected
        code, text = await client.command(b"DATA")
        if code != 354:
            for i in accepted:
                out[i] = RcptReply(code, _clean(text))
            await client.rset()
            return [r or RcptReply(None, "no reply") for r in out], client.is_connected
        final, text, clean = await self._body(client, data)
        for i in accepted:
            out[i] = RcptReply(final, text)
        if clean and final is not None and not 200 <= final < 300:
            await client.rset()
        return [r or RcptReply(None, "no reply") for r in out], clean and client.is_connected

    async def _body(self, client: Connection, data: bytes) -> tuple[int | None, str, bool]:
        """After a 354: the data and its end mark, written as they are; the reply to it.

        Returns the code (None on connection trouble), the text and whether
        the session can be used again.
        """
        seconds = self.cfg.command_timeout_seconds
        try:
            size = _write_data(client, data)
            await client.drain(seconds + size / 10_000)
            code, text = await client.reply(seconds)
        except (SMTPServerDisconnected, TimeoutError) as exc:
            client.close()
            return None, _clean(f"{type(exc).__name__}: {exc}"), False
        return code, _clean(text), True

    async def _pipelined(self, client: Connection, head: list[bytes],
                         data: bytes) -> tuple[list[RcptReply], bool]:
        """MAIL, every RCPT and DATA in one write; the replies read after (RFC 2920)."""
        out: list[RcptReply | None] = [None] * (len(head) - 1)
        try:
            client.write(b"\r\n".join(head) + b"\r\nDATA\r\n")
            mail = await client.reply()  # nothing answered: maybe a stale pooled connection
            try:
                await self._pipelined_replies(client, mail, out, data)
            except (SMTPServerDisconnected, TimeoutError) as exc:
                text = _clean(f"{type(exc).__name__}: {exc}")
                client.close()
                return [r or RcptReply(None, text) for r in out], False
        except BaseException:
            client.close()
            raise
        return [r or RcptReply(None, "no reply") for r in out], True

    async def _pipelined_replies(self, client: Connection, mail: tuple[int, str],
                                 out: list[RcptReply | None], data: bytes) -> None:
        """Read the RCPT and DATA replies, send the body if DATA was accepted."""
        seconds = self.cfg.command_timeout_seconds
        accepted: list[int] = []
        for i in range(len(out)):
            code, text = await client.reply()
            if mail[0] != 250:
                out[i] = RcptReply(mail[0], _clean(mail[1]))
            elif code in (250, 251):
                accepted.append(i)  # its result is the reply to the end of DATA
            else:
                out[i] = RcptReply(code, _clean(text), at_rcpt=True)
        go = await client.reply()
        if go[0] == 354 and not accepted:
            client.write(b".\r\n")  # DATA taken though no recipient was: end it empty
            await client.reply()
        elif go[0] == 354:
            size = _write_data(client, data)
            await client.drain(seconds + size / 10_000)
            code, text = await client.reply()
            for i in accepted:
                out[i] = RcptReply(code, _clean(text))
            if 200 <= code < 300:
                return
        else:
            for i in accepted:
                out[i] = RcptReply(go[0], _clean(go[1]))
        client.write(b"RSET\r\n")
        await client.reply()

    async def close(self) -> None:
        """Close every idle connection politely."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(c.client.quit() for c in idle), *self._closing,
                             return_exceptions=True)


class MxLookup(Protocol):
    """MX resolution (relayd.delivery.mx); raises relayd.delivery.routing.RouteError."""

    async def named_hops(self, domain: str) -> list[tuple[str, int, str, tuple[dane.Tlsa, ...]]]:
        """(address, port, MX host name, its secure TLSA records) to try, best first."""


class Router:
    """Choose the next hops for a recipient domain: static route, smarthost, or MX."""

    def __init__(self, cfg: DeliveryConfig) -> None:
        self.cfg = cfg
        self._routes: dict[str, Hop] = {}
        for domain, target in cfg.routes.items():
            host, port = parse_hostport(target, default_port=25)
            self._routes[domain.lower().rstrip(".")] = Hop(host, port, "opportunistic")
        host, port = parse_hostport(cfg.smarthost, default_port=25)
        self.smarthost = Hop(host, port, cfg.smarthost_tls, cfg.smarthost_username,
                             cfg.smarthost_password)

    def static(self, domain: str) -> Hop | None:
        """The static route for a domain (exact match, then parent domains), if any."""
        d = domain.lower().rstrip(".")
        while d:
            hop = self._routes.get(d)
            if hop is not None:
                return hop
            _, _, d = d.partition(".")
        return None


class Transport(Protocol):
    """Where transactions run: the delivery agent processes (relayd.delivery.agents).

    Tests may put an in-process fake behind this interface; relayd itself
    always runs them in the agents.
    """

    async def start(self) -> None:
        """Ready to take transactions (returns once the agents run)."""

    async def send(self, hop: Hop, sender: str, rcpts: Sequence[str],
                   data: bytes | BodyFile) -> list[RcptReply]:
        """One transaction at one hop; one reply per recipient."""

    def submit(self, hop: Hop, sender: str, rcpts: Sequence[str], data: bytes,
               done: Callable[[list[RcptReply]], None]) -> bool:
        """``send`` with a callback; False, with nothing sent, when it cannot take it now."""

    def reconfigure(self, cfg: DeliveryConfig) -> None:
        """New settings (a reload) for the next connections."""

    @property
    def connections_opened(self) -> int:
        """Connections opened since start."""

    async def close(self) -> None:
        """Stop: QUIT pooled connections."""


class Pools:
    """Per-hop connection pools in this process (run by a delivery agent)."""

    def __init__(self, cfg: DeliveryConfig, helo: str,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self._cfg = cfg
        self.helo = helo
        self.tls_context = tls_context
        self._pools: dict[Hop, Pool] = {}

    @property
    def cfg(self) -> DeliveryConfig:
        """The delivery settings in effect."""
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: DeliveryConfig) -> None:
        # A reload: the pools' next connections use the new settings (a pool
        # lives as long as its hop: it must not keep the old), the trust store re-read.
        self._cfg = cfg
        forget_level_contexts()
        for pool in self._pools.values():
            pool.cfg = cfg

    def pool(self, hop: Hop) -> Pool:
        """The pool for a hop (created on first use)."""
        p = self._pools.get(hop)
        if p is None:
            p = self._pools[hop] = Pool(hop, self.cfg, self.helo, self.tls_context)
        return p

    async def send(self, hop: Hop, sender: str, rcpts: Sequence[str],
                   data: bytes | BodyFile) -> list[RcptReply]:
        """Deliver one message to the given recipients at one hop.

        ``data`` may be a :class:`BodyFile`: it is read here, in a thread.
        """
        if isinstance(data, BodyFile):
            try:
                data = await asyncio.to_thread(data.read)
            except OSError as exc:
                return [RcptReply(None, body_file_error(exc)) for _ in rcpts]
        return await self.pool(hop).send(sender, rcpts, data)

    @property
    def connections_opened(self) -> int:
        """Connections opened since start (all hops)."""
        return sum(p.connections_opened for p in self._pools.values())

    async def close(self) -> None:
        """Close all pooled connections politely."""
        await asyncio.gather(*(p.close() for p in self._pools.values()), return_exceptions=True)


class TlsPolicy(Protocol):
    """MTA-STS (relayd.delivery.sts ``MtaSts``): what a policy does to hops and sends."""

    async def apply(self, domain: str, hops: list[Hop]) -> list[Hop]: ...

    def reconfigure(self, ca_file: str) -> None: ...

    async def send(self, hop: Hop,
                   send: Callable[[Hop], Awaitable[list[RcptReply]]]) -> list[RcptReply]: ...


class Deliverer:
    """What the scheduler sends through: next-hop choice here, transactions in a ``Transport``."""

    def __init__(self, cfg: DeliveryConfig, transport: Transport,
                 mx: MxLookup | None = None) -> None:
        self._cfg = cfg
        self.transport = transport
        self.router = Router(cfg)
        self.mx = mx
        self.sts: TlsPolicy | None = None  # MX mode with [delivery] mta_sts (relayd.app)

    @property
    def cfg(self) -> DeliveryConfig:
        """The delivery settings in effect."""
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: DeliveryConfig) -> None:
        # A reload: the transport's next connections use the new settings.
        self._cfg = cfg
        self.transport.reconfigure(cfg)

    async def start(self) -> None:
        """Start the transport (returns once the delivery agents run)."""
        await self.transport.start()

    async def route(self, domain: str) -> list[Hop]:
        """Next hops for a recipient domain: static route, else smarthost, else MX (at the
        domain's TLS level: ``[delivery] tls_level``, ``[delivery.tls_policy]``; then as its
        MTA-STS policy says, through ``sts``)."""
        hops = self.route_now(domain)
        if hops is not None:
            return hops
        assert self.mx is not None
        level = tlslevels.level_for(domain, self.cfg.tls_level, self.cfg.tls_policy)
        hops = []
        for h, p, name, tlsa in await self.mx.named_hops(domain):
            hop_level, checked = dane.policy(level, tlsa)  # DANE: secure TLSA records
            hops.append(Hop(h, p, hop_level, mx=name, tlsa=checked))
        return hops if self.sts is None else await self.sts.apply(domain, hops)

    def route_now(self, domain: str) -> list[Hop] | None:
        """The route when it needs no lookup (static route or smarthost), else None."""
        hop = self.router.static(domain)
        if hop is not None:
            return [hop]
        if self.cfg.mode == "smarthost" or self.mx is None:
            return [self.router.smarthost]
        return None

    def submit(self, hop: Hop, sender: str, rcpts: Sequence[str], data: bytes,
               done: Callable[[list[RcptReply]], None]) -> bool:
        """Hand a transaction to a running delivery agent; ``done`` gets the replies.

        No task and no future per message (the dispatcher's fast way). False,
        with nothing sent, when no agent is running now: the caller uses
        ``send`` instead.
        """
        return self.transport.submit(hop, sender, rcpts, data, done)

    async def send(self, hop: Hop, sender: str, rcpts: Sequence[str],
                   data: bytes | BodyFile) -> list[RcptReply]:
        """Deliver one message to the given recipients at one hop, in a delivery agent.

        ``data`` may be a :class:`BodyFile`: the agent reads it itself (the main
        process never holds a large message it only forwards). A hop under an MTA-STS
        policy goes through ``sts`` (which may try it twice: relayd.delivery.sts).
        """
        if hop.sts and self.sts is not None:
            return await self.sts.send(
                hop, lambda h: self.transport.send(h, sender, rcpts, data))
        return await self.transport.send(hop, sender, rcpts, data)

    @property
    def connections_opened(self) -> int:
        """Connections opened since start (by the delivery agents)."""
        return self.transport.connections_opened

    async def close(self) -> None:
        """Stop the transport (the agents QUIT their pooled connections)."""
        await self.transport.close()

    def reconfigure(self, cfg: DeliveryConfig, router: Router) -> None:
        """A reload: next hops from ``router`` (built from ``cfg`` by the caller: it can
        fail); the transport's next connections (in the agents) use ``cfg``."""
        self.router = router
        self.cfg = cfg
