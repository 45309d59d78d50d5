"""Outbound SMTP: next hops, pooled connections, per-recipient results.

Owns: the one adapter to aiosmtplib — connecting to a next hop (plain,
STARTTLS or implicit TLS, optional AUTH), keeping connections open and reusing
them for many messages (bounded per next hop, capped messages per connection,
closed when idle), running one transaction, and mapping every outcome to a
per-recipient reply code and text. Choosing the next hop (smarthost, static
route, MX) is ``Router``'s job; classifying a code as delivered, deferred or
failed is relayd.backoff's.

A failure of the connection itself (refused, timeout, TLS failure, dropped)
gives every recipient not yet answered ``code=None``: a temporary failure.

Untrusted input: replies from remote servers (only code and text are kept;
the text is truncated and stripped of control characters before it is logged
or stored). Settings read: [delivery].
See also: relayd.scheduler (calls ``Deliverer.deliver``), relayd.mx.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib

from relayd.config import DeliveryConfig, parse_hostport


@dataclass(frozen=True, slots=True)
class Hop:
    """A next hop and how to talk to it."""

    host: str
    port: int
    tls: str = "none"  # none | starttls | tls | opportunistic
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        """The hop as shown in logs and the delivery log."""
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class RcptReply:
    """The answer for one recipient: code None means no answer (connection trouble)."""

    code: int | None
    text: str


class _Conn:
    __slots__ = ("client", "last_used", "sent")

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self.sent = 0
        self.last_used = time.monotonic()


def _clean(text: str, limit: int = 400) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)[:limit]


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
        hop = self.hop
        client = aiosmtplib.SMTP(
            hostname=hop.host, port=hop.port, local_hostname=self.helo,
            timeout=self.cfg.command_timeout_seconds,
            use_tls=hop.tls == "tls",
            start_tls=True if hop.tls == "starttls" else (None if hop.tls == "opportunistic"
                                                         else False),
            # Opportunistic TLS (MX hosts, static routes) encrypts without
            # authenticating, as Postfix's "may" level: we connect to an address.
            validate_certs=self.cfg.tls_verify and hop.tls != "opportunistic",
            tls_context=self.tls_context,
            username=hop.username or None, password=hop.password or None,
        )
        await client.connect(timeout=self.cfg.connect_timeout_seconds)
        self.connections_opened += 1
        return _Conn(client)

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
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # A pooled connection the server had closed: retry once on a new one.
                    conn.client.close()
                    conn = await self._open()
                    replies, clean = await self._transaction(conn.client, sender, rcpts, data)
            except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                if conn is not None:
                    conn.client.close()
                text = _clean(f"{type(exc).__name__}: {exc}") or type(exc).__name__
                return [RcptReply(None, text) for _ in rcpts]
            conn.sent += 1
            conn.last_used = time.monotonic()
            if clean and conn.sent < self.cfg.messages_per_connection:
                self._park(conn)
            else:
                await _quit(conn.client)
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
            task = asyncio.get_running_loop().create_task(_quit(conn.client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._idle = keep
        if keep:
            due = min(c.last_used for c in keep) + limit - now
            self._reaper = asyncio.get_running_loop().call_later(max(due, 0.01), self._reap)

    async def _transaction(self, client: aiosmtplib.SMTP, sender: str, rcpts: Sequence[str],
                           data: bytes) -> tuple[list[RcptReply], bool]:
        """MAIL, RCPT..., DATA. Returns the replies and whether the session is reusable."""
        out: list[RcptReply | None] = [None] * len(rcpts)
        opts: list[str] = []
        utf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
        if utf8 and client.supports_extension("smtputf8"):
            opts.append("SMTPUTF8")
        if client.supports_extension("8bitmime") and not data.isascii():
            opts.append("BODY=8BITMIME")
        if client.supports_extension("size"):
            opts.append(f"SIZE={len(data)}")
        enc = "utf-8" if utf8 else "ascii"
        try:
            await client.mail(sender, options=opts, encoding=enc)
        except aiosmtplib.SMTPResponseException as exc:
            await _rset(client)
            return [RcptReply(exc.code, _clean(exc.message)) for _ in rcpts], exc.code < 500 or \
                client.is_connected
        accepted: list[int] = []
        for i, rcpt in enumerate(rcpts):
            try:
                await client.rcpt(rcpt, encoding=enc)
                accepted.append(i)
            except aiosmtplib.SMTPResponseException as exc:
                out[i] = RcptReply(exc.code, _clean(exc.message))
        if not accepted:
            await _rset(client)
            return [r or RcptReply(None, "no reply") for r in out], client.is_connected
        try:
            resp = await client.data(data)
            for i in accepted:
                out[i] = RcptReply(resp.code, _clean(resp.message))
        except aiosmtplib.SMTPResponseException as exc:
            for i in accepted:
                out[i] = RcptReply(exc.code, _clean(exc.message))
            await _rset(client)
        return [r or RcptReply(None, "no reply") for r in out], client.is_connected

    async def close(self) -> None:
        """Close every idle connection politely."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(c.client) for c in idle), *self._closing,
                             return_exceptions=True)


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 5)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass
    finally:
        client.close()


class MxLookup(Protocol):
    """MX resolution (relayd.mx); raises scheduler.RouteError-compatible errors."""

    async def hops(self, domain: str) -> list[tuple[str, int]]:
        """(host, port) pairs to try, best first."""


class Router:
    """Choose the next hops for a recipient domain: static route, smarthost, or MX."""

    def __init__(self, cfg: DeliveryConfig,
                 mx_lookup: Callable[[str], object] | None = None) -> None:
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


class Deliverer:
    """Send messages to next hops through per-hop connection pools."""

    def __init__(self, cfg: DeliveryConfig, helo: str,
                 tls_context: ssl.SSLContext | None = None,
                 mx: MxLookup | None = None) -> None:
        self.cfg = cfg
        self.helo = helo
        self.tls_context = tls_context
        self.router = Router(cfg)
        self.mx = mx
        self._pools: dict[Hop, Pool] = {}

    async def route(self, domain: str) -> list[Hop]:
        """Next hops for a recipient domain: static route, else smarthost, else MX."""
        hop = self.router.static(domain)
        if hop is not None:
            return [hop]
        if self.cfg.mode == "smarthost" or self.mx is None:
            return [self.router.smarthost]
        return [Hop(h, p, "opportunistic") for h, p in await self.mx.hops(domain)]

    def pool(self, hop: Hop) -> Pool:
        """The pool for a hop (created on first use)."""
        p = self._pools.get(hop)
        if p is None:
            p = self._pools[hop] = Pool(hop, self.cfg, self.helo, self.tls_context)
        return p

    async def send(self, hop: Hop, sender: str, rcpts: Sequence[str],
                   data: bytes) -> list[RcptReply]:
        """Deliver one message to the given recipients at one hop."""
        return await self.pool(hop).send(sender, rcpts, data)

    @property
    def connections_opened(self) -> int:
        """Connections opened since start (all hops)."""
        return sum(p.connections_opened for p in self._pools.values())

    async def close(self) -> None:
        """Close all pooled connections."""
        await asyncio.gather(*(p.close() for p in self._pools.values()), return_exceptions=True)
