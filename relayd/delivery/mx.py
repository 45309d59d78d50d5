"""MX routing: the next hops for a recipient domain, and the only module importing dnspython.

Owns: turning a recipient domain into an ordered list of next hops when
delivery runs in MX mode (SEMANTICS.md §5, "Delivery"), a cache of the DNS
answers used for it, and the mapping of DNS outcomes to temporary or
permanent routing errors.

What ``MxResolver.resolve(domain)`` returns: a list of ``NextHop`` whose
``host`` is an IP address (IPv4 or IPv6 text) to connect to on ``port``
(``smtp_port``, 25 by default), and whose ``mx`` is the MX host name that
address belongs to (the name to send in TLS SNI, to verify a certificate
against, and to write in the delivery log). Order:

1. MX hosts by ascending preference; hosts of equal preference in a random
   order (from the injected ``random.Random``) so load spreads across them;
2. for each host, its IPv4 addresses then its IPv6 addresses (each family
   shuffled), an address already listed for a better MX being skipped;
3. at most ``max_mx_hosts`` hosts are looked up and ``max_addresses``
   addresses returned, so a hostile zone cannot make one delivery do
   unbounded work (Postfix: smtp_mx_address_limit).

Rules (RFC 5321 §5.1, RFC 7505):

- no MX records (NOERROR, no data): implicit MX, the domain's own A/AAAA
  addresses with ``mx`` equal to the domain;
- null MX (every MX record has exchange ``.``; RFC 7505 says a single one
  with preference 0): ``NullMxRouteError`` ("domain does not accept mail
  (null MX)", ``556 5.1.10``); a ``.`` mixed among real exchanges is ignored;
- NXDOMAIN for the domain, or no address at all with no temporary error:
  ``NotFoundRouteError`` (a ``PermanentRouteError``, ``550 5.4.4`` as Postfix);
- SERVFAIL, REFUSED, timeout or any other resolver trouble, when no usable
  address was found: ``TemporaryRouteError``. A host whose lookup fails
  temporarily is skipped when other hosts do have addresses;
- an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) routes to that
  address without DNS. Whether such recipients are accepted is policy's call
  (``[smtp] allow_address_literals``).

Refused destinations: every address, from DNS or from a literal, is judged by
the injected ``relayd.smtp.policy.DestinationPolicy`` (by default: only global
addresses; loopback, link-local, unspecified, multicast, reserved and private
ones are dropped unless ``[delivery] mx_allowed_networks`` / ``mx_allow_private``
say otherwise), so neither a hostile zone nor a literal can aim mail at the
relay itself, the cloud metadata service or an internal network. When every
address found is refused, ``RefusedRouteError`` (a ``PermanentRouteError``)
names them and why, as Postfix bounces "mail for X loops back to myself":
the zone points at a place mail must not go, and retrying for days would not
change it. When, besides, a host's lookup failed temporarily, the error is
temporary (that host may yet have a usable address).

DANE (``[delivery] dane = "on"``, relayd.app calls ``enable_dane`` at start-up):
only with resolvers named in ``dns_nameservers`` that answer a probe with the
AD bit; queries then carry the DO bit (EDNS0). When the MX answer (or, for an
implicit MX, the domain's no-MX answer) and all of a host's address answers
were validated (AD), the host's TLSA RRset ``_PORT._tcp.HOST`` is looked up
(PORT: ``smtp_port``) and, when validated, its records ride on the host's
hops (``NextHop.tlsa``; relayd.delivery.dane judges them). A TLSA lookup that
fails temporarily drops that host's hops (RFC 7672 §2.1.1: never without the
records); none left: ``TemporaryRouteError``. Insecure answers: no TLSA.

Cache: answers (positive and negative, per name and type) are kept for their
TTL (the smallest TTL of the answer and its CNAME chain; for negative answers
the SOA minimum), capped by ``max_ttl`` / ``max_negative_ttl``. Temporary
failures are not cached. The cache is a bounded LRU (``cache_size`` entries);
its clock is injected (monotonic seconds). Concurrent misses for one name are
not coalesced: each queries.

MTA-STS (relayd.delivery.sts) asks two more things through the same resolver
and cache: ``txt`` (the ``_mta-sts`` record) and ``addresses`` (the policy
host's addresses, judged by the same ``DestinationPolicy``).

Failures seen: ``on_dns_failure`` (None, or a callable the app wires to the
metrics) gets the kind of every DNS failure (relayd.delivery.routing
``DNS_FAILURE_KINDS``): each lookup that failed temporarily (``servfail``,
``timeout``, ``error``; not cached, so every try counts), and each ``resolve``
that ends without a route for a DNS reason (``nxdomain``, ``no_address``,
``null_mx``, ``invalid``; a cached answer counts again, once per attempt).

Cost: ``resolve`` does network I/O on a miss (A and AAAA lookups of all MX
hosts run concurrently, bounded by ``timeout`` each); a full cache hit does
none. Never blocks the loop.

Untrusted input: the recipient domain (from a client, already accepted by
policy) and every DNS answer (record counts, TTLs, names). Names are parsed
by dnspython; invalid ones are permanent errors.
Settings read: none directly; ``MxResolver.from_config`` builds one from
``[delivery]`` (``dns_nameservers``, ``mx_port``, and the ``DestinationPolicy``
built from ``mx_allow_private`` / ``mx_allowed_networks``). ``nameservers=None``
uses the system configuration (/etc/resolv.conf). The errors are
relayd.delivery.routing's (re-exported here): each kind carries whether it is
permanent and its reply code and status, so no caller reads the text.
See also: relayd.delivery.client (connects to the hops, handles routing errors),
relayd.smtp.policy (DestinationPolicy), RFC 5321 §5.1, RFC 7505.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from relayd.config import DeliveryConfig, parse_hostport
from relayd.delivery.routing import (
    DNS_FAILURE_KINDS,
    NULL_MX_MESSAGE,
    NotFoundRouteError,
    NullMxRouteError,
    PermanentRouteError,
    RefusedRouteError,
    RouteError,
    TemporaryRouteError,
)
from relayd.smtp.address import literal_ip
from relayd.smtp.policy import DestinationPolicy

__all__ = ["NULL_MX_MESSAGE", "MxResolver", "NextHop", "NotFoundRouteError", "NullMxRouteError",
           "PermanentRouteError", "RefusedRouteError", "RouteError", "TemporaryRouteError"]

_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_MX = dns.rdatatype.MX
_TXT = dns.rdatatype.TXT
_TLSA = dns.rdatatype.TLSA
_DNSKEY = dns.rdatatype.DNSKEY
#: At most this long for the start-up probe of the validating resolver (DANE).
PROBE_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class NextHop:
    """One place to connect to: an address (or host name) and port, and its MX name."""

    host: str
    port: int
    mx: str = ""
    tlsa: tuple[tuple[int, int, int, bytes], ...] = ()  # secure TLSA records (DANE)


@dataclass(frozen=True)
class _Answer:
    """A cached lookup result: MX pairs, addresses or TLSA records, or NXDOMAIN; ``secure``:
    the validating resolver set the AD bit (DANE on only)."""

    mx: tuple[tuple[int, str], ...] = ()
    addresses: tuple[str, ...] = ()
    nxdomain: bool = False
    texts: tuple[str, ...] = ()  # TXT: each record's strings joined
    secure: bool = False
    tlsa: tuple[tuple[int, int, int, bytes], ...] = ()


class _Temporary(Exception):
    """A lookup failed in a way that may pass (not cached)."""


def _address_literal(domain: str) -> str | None:
    """The IP address inside an RFC 5321 address literal, or None if not one."""
    try:
        address = literal_ip(domain)
    except ValueError:
        raise PermanentRouteError("invalid address literal") from None
    return None if address is None else str(address)


_MAX_REFUSED_SHOWN = 5  # refused addresses named in an error text (then a count)


def _refused_text(refused: list[str]) -> str:
    """``"a (loopback) of mx, ..."``, the first few, and how many more."""
    text = ", ".join(refused[:_MAX_REFUSED_SHOWN])
    if len(refused) > _MAX_REFUSED_SHOWN:
        text += f" and {len(refused) - _MAX_REFUSED_SHOWN} more"
    return text


def _host_text(name: dns.name.Name) -> str:
    """A name as lower-case text without the final dot; the root is "."."""
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True).lower()


class MxResolver:
    """Resolves recipient domains to ordered next hops, caching answers for their TTL."""

    def __init__(
        self,
        nameservers: list[str] | None = None,
        port: int = 53,
        timeout: float = 5.0,
        *,
        smtp_port: int = 25,
        ipv6: bool = True,
        rand: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        cache_size: int = 10000,
        max_ttl: float = 86400.0,
        max_negative_ttl: float = 900.0,
        max_mx_hosts: int = 10,
        max_addresses: int = 10,
        destinations: DestinationPolicy | None = None,
    ) -> None:
        resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        if nameservers is not None:
            resolver.nameservers = list(nameservers)
        resolver.port = port
        resolver.timeout = timeout
        resolver.lifetime = timeout
        resolver.cache = None  # ours is below, on the injected clock
        self._resolver = resolver
        self._smtp_port = smtp_port
        self._families = (_A, _AAAA) if ipv6 else (_A,)
        self._rand = rand if rand is not None else random.Random()
        self._clock = clock
        self._cache: OrderedDict[tuple[dns.name.Name, int], tuple[float, _Answer]] = OrderedDict()
        self._cache_size = cache_size
        self._max_ttl = max_ttl
        self._max_negative_ttl = max_negative_ttl
        self._max_mx_hosts = max_mx_hosts
        self._max_addresses = max_addresses
        self._destinations = destinations if destinations is not None else DestinationPolicy()
        self._configured = nameservers is not None  # resolvers named in [delivery]
        self.dane = False  # TLSA lookups (enable_dane: a validating resolver answered)
        self.on_dns_failure: Callable[[str], None] | None = None  # (kind): metrics

    def _failed(self, kind: str) -> None:
        assert kind in DNS_FAILURE_KINDS
        if self.on_dns_failure is not None:
            self.on_dns_failure(kind)

    @classmethod
    def from_config(cls, cfg: DeliveryConfig) -> MxResolver:
        """The resolver ``[delivery]`` describes: name servers (``host[:port]``, one
        port for all), the MX hosts' SMTP port, and the destinations allowed."""
        nameservers: list[str] | None = None
        port = 53
        if cfg.dns_nameservers:
            nameservers = []
            for entry in cfg.dns_nameservers:
                host, port = parse_hostport(entry, default_port=53)
                nameservers.append(host)
        destinations = DestinationPolicy(allow_private=cfg.mx_allow_private,
                                         allowed_networks=cfg.mx_allowed_networks)
        return cls(nameservers=nameservers, port=port, smtp_port=cfg.mx_port,
                   destinations=destinations)

    async def named_hops(self, domain: str) -> list[tuple[str, int, str,
                                                          tuple[tuple[int, int, int, bytes], ...]]]:
        """(address, port, MX host name, secure TLSA records) for ``domain``, best first
        (relayd.delivery.client's ``MxLookup``; the name for TLS: SNI and verification; the
        records for DANE, empty when none or DANE is off); a RouteError when none."""
        return [(h.host, h.port, h.mx or h.host, h.tlsa) for h in await self.resolve(domain)]

    async def enable_dane(self) -> str:
        """Turn TLSA lookups on if the configured resolver validates DNSSEC: one query
        (the root's DNSKEY, the DO bit set) must come back with the AD bit within
        PROBE_TIMEOUT_SECONDS. Returns "" when on, else why DANE stays off."""
        if not self._configured:
            return "no validating resolver configured ([delivery] dns_nameservers is empty)"
        resolver = self._resolver
        before = (resolver.edns, resolver.ednsflags, resolver.payload)
        resolver.use_edns(0, dns.flags.DO, 1232)
        reason = "the resolver does not validate DNSSEC (no AD bit on the probe's answer)"
        try:
            result = await resolver.resolve(
                dns.name.root, _DNSKEY, raise_on_no_answer=False,
                lifetime=min(resolver.lifetime, PROBE_TIMEOUT_SECONDS))
            flags = result.response.flags
        except dns.resolver.NXDOMAIN as exc:
            flags = exc.response(dns.name.root).flags
        except dns.exception.DNSException as exc:
            flags = 0
            reason = f"the resolver did not answer the DNSSEC probe ({type(exc).__name__})"
        if not flags & dns.flags.AD:
            resolver.use_edns(*before)  # queries as without DANE
            return reason
        self.dane = True
        return ""

    async def txt(self, name: str) -> list[str]:
        """The TXT records of ``name`` (MTA-STS: ``_mta-sts.<domain>``), cached as the
        others; empty when there are none; TemporaryRouteError on resolver trouble."""
        try:
            answer = await self._lookup(dns.name.from_text(name.rstrip(".") + "."), _TXT)
        except _Temporary as exc:
            raise TemporaryRouteError(f"TXT lookup of {name} failed: {exc}") from None
        except (dns.exception.DNSException, UnicodeError, ValueError):
            raise PermanentRouteError("invalid domain name") from None
        return list(answer.texts)

    async def addresses(self, host: str) -> list[str]:
        """The addresses of a host name (MTA-STS: the policy host) that the destination
        policy allows, as for an MX host; raises a RouteError when there are none."""
        try:
            name = dns.name.from_text(host.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            raise PermanentRouteError("invalid domain name") from None
        hops = await self._hops(_host_text(name), [_host_text(name)], implicit=True)
        return [h.host for h in hops]

    async def resolve(self, domain: str) -> list[NextHop]:
        """The next hops for ``domain``, best first; raises a RouteError when there are none."""
        domain = domain.strip()
        literal = _address_literal(domain)
        if literal is not None:
            reason = self._destinations.refusal(literal)
            if reason is not None:
                raise RefusedRouteError(
                    f"address literal {domain} is a {reason} address: not delivered to")
            return [NextHop(literal, self._smtp_port, literal)]
        try:
            name = dns.name.from_text(domain.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            self._failed("invalid")
            raise PermanentRouteError("invalid domain name") from None
        if name == dns.name.root:
            self._failed("invalid")
            raise PermanentRouteError("invalid domain name")

        try:
            answer = await self._lookup(name, _MX)
        except _Temporary as exc:
            raise TemporaryRouteError(f"MX lookup failed: {exc}") from None
        if answer.nxdomain:
            self._failed("nxdomain")
            raise NotFoundRouteError("domain not found (NXDOMAIN)")

        if answer.mx:
            exchanges = [(pref, host) for pref, host in answer.mx if host != "."]
            if not exchanges:
                self._failed("null_mx")
                raise NullMxRouteError()
            hosts = self._order(exchanges)[: self._max_mx_hosts]
        else:
            hosts = [_host_text(name)]
        return await self._hops(_host_text(name), hosts, implicit=not answer.mx,
                                secure=self.dane and answer.secure)

    def _order(self, exchanges: list[tuple[int, str]]) -> list[str]:
        """Host names by preference, equal preferences shuffled, duplicates dropped."""
        by_pref: dict[int, list[str]] = {}
        for pref, host in exchanges:
            by_pref.setdefault(pref, []).append(host)
        ordered: list[str] = []
        for pref in sorted(by_pref):
            group = sorted(set(by_pref[pref]))
            self._rand.shuffle(group)
            ordered.extend(h for h in group if h not in ordered)
        return ordered

    async def _hops(self, domain: str, hosts: list[str], *, implicit: bool,
                    secure: bool = False) -> list[NextHop]:
        """Look up every host's addresses concurrently and build the hop list."""
        jobs = [
            self._addresses(dns.name.from_text(host), rdtype)
            for host in hosts
            for rdtype in self._families
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        hops: list[NextHop] = []
        seen: set[str] = set()
        temporary: list[str] = []
        refused: list[str] = []
        insecure: set[str] = set()  # hosts whose address answers were not all validated
        per_host = len(self._families)
        for i, host in enumerate(hosts):
            for result in results[i * per_host : (i + 1) * per_host]:
                if isinstance(result, _Temporary):
                    temporary.append(f"{host}: {result}")
                    insecure.add(host)
                    continue
                if isinstance(result, BaseException):
                    raise result
                if not result.secure:
                    insecure.add(host)
                addresses = list(result.addresses)
                self._rand.shuffle(addresses)
                for address in addresses:
                    if address in seen:
                        continue
                    seen.add(address)
                    reason = self._destinations.refusal(address)
                    if reason is not None:
                        refused.append(f"{address} ({reason}) of {host}")
                    elif len(hops) < self._max_addresses:
                        hops.append(NextHop(address, self._smtp_port, host))
        if hops and secure:
            return await self._with_tlsa(hops, set(hosts) - insecure)
        if hops:
            return hops
        if temporary:
            text = "address lookup failed: " + "; ".join(temporary)
            if refused:
                text += "; refused addresses: " + _refused_text(refused)
            raise TemporaryRouteError(text)
        if refused:
            raise RefusedRouteError(
                f"no usable address for {domain}: every address of its mail hosts is one "
                f"relayd does not deliver to: {_refused_text(refused)}")
        self._failed("no_address")
        if implicit:
            raise NotFoundRouteError("no MX and no address records for domain")
        raise NotFoundRouteError("no address records for any MX host")

    async def _addresses(self, name: dns.name.Name, rdtype: int) -> _Answer:
        """The answer for the addresses of one type of a host (none if NXDOMAIN)."""
        return await self._lookup(name, rdtype)

    async def _with_tlsa(self, hops: list[NextHop], secure_hosts: set[str]) -> list[NextHop]:
        """DANE: the hops with their hosts' secure TLSA records (``_PORT._tcp.HOST``; only
        for hosts whose addresses were validated). A host whose TLSA lookup fails is
        dropped, never tried without it (RFC 7672 §2.1.1); none left: TemporaryRouteError."""
        hosts = sorted({h.mx for h in hops if h.mx in secure_hosts})
        if not hosts:
            return hops
        results = await asyncio.gather(
            *(self._lookup(dns.name.from_text(f"_{self._smtp_port}._tcp.{host}"), _TLSA)
              for host in hosts), return_exceptions=True)
        found: dict[str, tuple[tuple[int, int, int, bytes], ...]] = {}
        failed: dict[str, str] = {}
        for host, result in zip(hosts, results, strict=True):
            if isinstance(result, _Temporary):
                failed[host] = f"{host}: {result}"
            elif isinstance(result, BaseException):
                raise result
            elif result.secure and result.tlsa:
                found[host] = result.tlsa
        kept = [replace(h, tlsa=found.get(h.mx, ())) for h in hops if h.mx not in failed]
        if not kept:
            raise TemporaryRouteError("TLSA lookup failed (DANE: not delivered without it): "
                                      + "; ".join(failed.values()))
        return kept

    async def _lookup(self, name: dns.name.Name, rdtype: int) -> _Answer:
        """One DNS question, from the cache or the network; raises _Temporary."""
        key = (name, rdtype)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            expires, answer = cached
            if now < expires:
                self._cache.move_to_end(key)
                return answer
            del self._cache[key]

        try:
            result = await self._resolver.resolve(
                name, dns.rdatatype.RdataType.make(rdtype), raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            ttl = self._negative_ttl(exc, name)
            answer = _Answer(nxdomain=True)
            self._store(key, answer, ttl)
            return answer
        except dns.resolver.NoNameservers:
            self._failed("servfail")
            raise _Temporary("no name server answered (SERVFAIL or refused)") from None
        except dns.exception.Timeout:
            self._failed("timeout")
            raise _Temporary("timed out") from None
        except dns.resolver.YXDOMAIN:
            answer = _Answer(nxdomain=True)
            self._store(key, answer, self._max_negative_ttl)
            return answer
        except dns.exception.DNSException as exc:
            self._failed("error")
            raise _Temporary(type(exc).__name__) from None

        ttl = float(result.chaining_result.minimum_ttl)
        rrset = result.rrset
        secure = bool(result.response.flags & dns.flags.AD)
        if rrset is None:
            answer = _Answer(secure=secure)
            self._store(key, answer, min(ttl, self._max_negative_ttl))
            return answer
        if rdtype == _MX:
            mx = tuple((int(rd.preference), _host_text(rd.exchange)) for rd in rrset)
            answer = _Answer(mx=mx, secure=secure)
        elif rdtype == _TXT:
            answer = _Answer(texts=tuple(b"".join(rd.strings).decode("utf-8", "replace")
                                         for rd in rrset), secure=secure)
        elif rdtype == _TLSA:
            answer = _Answer(secure=secure, tlsa=tuple(
                (int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert)) for rd in rrset))
        else:
            answer = _Answer(addresses=tuple(str(rd.address) for rd in rrset), secure=secure)
        self._store(key, answer, min(ttl, self._max_ttl))
        return answer

    def _negative_ttl(self, exc: dns.resolver.NXDOMAIN, name: dns.name.Name) -> float:
        """The negative-caching TTL of an NXDOMAIN answer (SOA minimum), capped."""
        try:
            response = exc.response(name)
            ttl = float(response.resolve_chaining().minimum_ttl)
        except (KeyError, dns.exception.DNSException):
            ttl = 0.0
        return min(ttl, self._max_negative_ttl)

    def _store(self, key: tuple[dns.name.Name, int], answer: _Answer, ttl: float) -> None:
        """Cache an answer for ``ttl`` seconds, evicting the least recently used."""
        if ttl <= 0 or self._cache_size <= 0:
            return
        self._cache[key] = (self._clock() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
