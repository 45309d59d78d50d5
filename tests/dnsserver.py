"""A small authoritative DNS server on loopback, for tests that need real DNS.

Owns: answering DNS queries over UDP and TCP on 127.0.0.1 (one ephemeral port
for both) from a zone the test provides as a dict, counting every query, and
misbehaving on request: SERVFAIL for chosen names, silence (no reply at all,
so the client times out) for others, and truncated UDP replies (TC bit) to
force a retry over TCP. As a validating resolver would: with ``secure`` set,
answers carry the AD bit (DNSSEC validated), except for names in ``insecure``
(DANE's tests need both).

Zone format: ``{"example.test": {"MX": ["10 mx1.example.test."], "A":
["192.0.2.1"]}}``; names may be written with or without the final dot and are
matched case-insensitively; record texts are in zone-file syntax. A name
present in the zone but without the asked type gets NOERROR with no data; a
name absent gets NXDOMAIN. Both negative answers carry an SOA (owned by the
root, minimum ``negative_ttl``) so resolvers can cache them. A ``CNAME`` entry
is followed once within the zone.

Untrusted input: the query wire (malformed queries are ignored).
Settings: ``ttl`` (positive answers), ``negative_ttl``; the sets ``servfail``,
``silent``, ``truncate`` and ``insecure`` of names, the flag ``secure``; all may
change while running.
See also: tests/test_mx.py (the fixture that starts and stops it),
relayd.delivery.mx (the client under test).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[str, dict[str, list[str]]]


def _key(name: str) -> str:
    return name.lower().rstrip(".") + "."


class DnsServer:
    """An asyncio UDP+TCP DNS server answering from a dict zone; start() then stop()."""

    def __init__(self, zone: Zone | None = None, *, ttl: int = 300, negative_ttl: int = 60):
        self.zone: Zone = zone or {}
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.truncate: set[str] = set()
        self.secure = False  # set the AD bit on answers (but for ``insecure`` names)
        self.insecure: set[str] = set()
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp" | "tcp")
        self.host = "127.0.0.1"
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    # --- counting -------------------------------------------------------------
    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many queries arrived, optionally for one name and/or type."""
        return sum(
            1
            for n, t, _ in self.queries
            if (name is None or n == _key(name)) and (rdtype is None or t == rdtype)
        )

    # --- lifecycle ------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        """Bind UDP and TCP on one ephemeral loopback port; return (host, port)."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            transport, _proto = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                transport.close()
                continue
            self._udp = transport
            self.port = port
            return self.host, port
        raise RuntimeError("no free port for both UDP and TCP")

    async def stop(self) -> None:
        """Close both sockets."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- answering ------------------------------------------------------------
    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply wire for a query wire, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        question = query.question[0]
        qname = _key(question.name.to_text())
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((qname, qtype, transport))
        if qname in {_key(n) for n in self.silent}:
            return None

        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.secure and qname not in {_key(n) for n in self.insecure}:
            response.flags |= dns.flags.AD
        if qname in {_key(n) for n in self.servfail}:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if transport == "udp" and qname in {_key(n) for n in self.truncate}:
            response.flags |= dns.flags.TC
            return response.to_wire()

        zone = {_key(n): records for n, records in self.zone.items()}
        records = zone.get(qname)
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
            return response.to_wire()
        owner = qname
        if "CNAME" in records and qtype != "CNAME":
            target = records["CNAME"][0]
            response.answer.append(self._rrset(owner, "CNAME", [target]))
            owner = _key(target)
            records = zone.get(owner, {})
        texts = records.get(qtype)
        if texts:
            response.answer.append(self._rrset(owner, qtype, texts))
        else:
            response.authority.append(self._soa())
        max_size = 65535 if transport == "tcp" else (query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _rrset(self, owner: str, rdtype: str, texts: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(owner, self.ttl, "IN", rdtype, texts)

    def _soa(self) -> dns.rrset.RRset:
        soa = f"ns.test. hostmaster.test. 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text_list(".", self.negative_ttl, "IN", "SOA", [soa])

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length), "tcp")
                if reply is None:
                    continue
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
