"""Pure decisions of an SMTP session: who may authenticate, send, and how much.

Owns: the rules of SEMANTICS.md §3 and §6 that do not need I/O — may this
session AUTH on this transport, may this account use this sender, may it add
another recipient (an address literal only when allowed), is this size
acceptable, is this client address throttled after failed AUTH attempts.
Every function takes values (and a clock reading) and returns a Reply to
send, or None to go on. Also the one outbound decision of the same kind:
which IP addresses MX delivery may connect to (``DestinationPolicy``: never
loopback, link-local, unspecified, multicast or reserved addresses, private
ones only when configured), used by relayd.mx.

Interface cost: microseconds; these run on the event loop for every command.

Untrusted input: values parsed from client commands (already validated for
syntax by relayd.address), addresses from DNS answers. Settings read: [smtp],
[limits], [delivery] mx_allow_private and mx_allowed_networks, passed in.
See also: relayd.replies, relayd.smtp (the adapter that calls these).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relayd import replies
from relayd.accounts import Account
from relayd.address import in_domain, is_address_literal
from relayd.replies import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PlaintextAuthPolicy:
    """Where AUTH without TLS is allowed (by client network)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._nets: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def allows(self, peer_ip: str) -> bool:
        """True when a client at ``peer_ip`` may AUTH over plaintext."""
        hit = self._cache.get(peer_ip)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            ok = False
        else:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            ok = any(addr.version == n.version and addr in n for n in self._nets)
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[peer_ip] = ok
        return ok


def may_auth(*, tls_active: bool, plaintext_ok: bool) -> Reply | None:
    """Refuse AUTH over plaintext unless this client's network is allowed it."""
    if tls_active or plaintext_ok:
        return None
    return replies.AUTH_NEEDS_TLS


def may_advertise_auth(*, tls_active: bool, plaintext_ok: bool) -> bool:
    """AUTH is advertised only where it would be accepted."""
    return tls_active or plaintext_ok


def session_account_valid(account: Account | None, epoch: int) -> bool:
    """True when a session's account is still usable under the epoch it authenticated."""
    return account is not None and account.usable and account.epoch == epoch


def sender_allowed(account: Account, sender_domain: str) -> Reply | None:
    """Refuse a MAIL FROM outside the account's domain (or its subdomains)."""
    if sender_domain and in_domain(sender_domain, account.domain.name):
        return None
    return replies.SENDER_NOT_ALLOWED


def declared_size_ok(declared: int | None, maximum: int) -> Reply | None:
    """Refuse a MAIL whose SIZE parameter is over the limit."""
    if declared is not None and declared > maximum:
        return replies.SIZE_EXCEEDED
    return None


def recipient_allowed(current: int, maximum: int) -> Reply | None:
    """Refuse a RCPT past the per-message recipient limit."""
    if current >= maximum:
        return replies.TOO_MANY_RECIPIENTS
    return None


def recipient_domain_allowed(domain: str, *, allow_literals: bool) -> Reply | None:
    """Refuse an address-literal recipient (``user@[192.0.2.1]``) unless literals are allowed.

    In every delivery mode: a literal names a host rather than a mail domain, and
    is the way to aim mail at an internal address (the relay's own, the cloud
    metadata service, a private network), whoever does the delivery.
    """
    if not allow_literals and is_address_literal(domain):
        return replies.ADDRESS_LITERAL
    return None


def queue_room(queued: int, cap: int, free_disk: int, min_free: int) -> Reply | None:
    """Refuse a MAIL when the account's queue is full or the disk is low."""
    if free_disk < min_free:
        return replies.LOW_DISK
    if queued >= cap:
        return replies.QUEUE_FULL
    return None


def data_violation(data: bytes | bytearray) -> Reply | None:
    """Refuse message data with bare CR, bare LF or NUL (SMTP smuggling), or over-long lines.

    ``data`` is the body as received, without the final ``.CRLF`` terminator.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf or b"\0" in data:
        return replies.BAD_LINE_ENDING
    return None


def has_long_line(data: bytes | bytearray, limit: int = 998) -> bool:
    """True if a line of ``data`` (CRLF-separated) is longer than ``limit`` octets.

    ``data`` has CRLF line endings only (``data_violation`` ran first). A line
    that starts with a transparency dot may be one octet longer (the dot is
    removed before the message is stored). Cost: one ``rfind`` per ``limit + 2``
    octets rather than one ``find`` per line, no copy: about 0.3 ms per MB of
    ordinary mail (76-octet lines) against 4.8 ms for a per-line scan.

    Why the stride is exact: every line that ends inside the ``limit + 2``
    octets from a line start is at most ``limit`` long, so the scan jumps to
    just after the last line end in that window. Only a window without one
    (a line that may be too long) is looked at line by line.
    """
    n = len(data)
    if n <= limit:
        return False
    rfind = data.rfind
    find = data.find
    window = limit + 2  # a line of ``limit`` octets and its CRLF
    pos = 0
    while n - pos > limit:
        if n - pos > window:
            last = rfind(b"\n", pos, pos + window)
            if last >= 0:
                pos = last + 1
                continue
        # The line starting at ``pos``, exactly: the dot exception, a last line without CRLF.
        nl = find(b"\n", pos, pos + window + 1)
        if nl < 0:
            if pos + window + 1 <= n:
                return True
            nl = n
            length = n - pos
        else:
            length = nl - pos - (1 if nl > pos and data[nl - 1] == 13 else 0)
        if length > limit and not (length == limit + 1 and data[pos] == 46):
            return True
        pos = nl + 1
    return False


@dataclass
class _Failures:
    count: int
    last: float


class AuthThrottle:
    """Failed AUTH attempts per client address: growing delay, then disconnect.

    Keyed by client address only, so an attacker's failures never lock out a
    real user connecting from elsewhere. Counts decay: an address with no
    failure for ``forget_after`` seconds starts again from zero.
    """

    def __init__(self, *, free_failures: int, max_failures: int,
                 base_delay: float = 0.5, max_delay: float = 8.0,
                 forget_after: float = 900.0) -> None:
        self.free_failures = free_failures
        self.max_failures = max_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self._by_ip: dict[str, _Failures] = {}

    def _get(self, ip: str, now: float) -> _Failures | None:
        f = self._by_ip.get(ip)
        if f is not None and now - f.last > self.forget_after:
            del self._by_ip[ip]
            return None
        return f

    def blocked(self, ip: str, now: float) -> bool:
        """True when this address has used up its failures: answer 421 and close."""
        f = self._get(ip, now)
        return f is not None and f.count >= self.max_failures

    def failure(self, ip: str, now: float) -> float:
        """Record a failure; return the delay (seconds) to wait before replying."""
        f = self._get(ip, now)
        if f is None:
            f = self._by_ip[ip] = _Failures(0, now)
            if len(self._by_ip) > 100_000:
                self._prune(now)
        f.count += 1
        f.last = now
        over = f.count - self.free_failures
        if over <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * (2 ** (over - 1)))

    def _prune(self, now: float) -> None:
        for ip in [ip for ip, f in self._by_ip.items() if now - f.last > self.forget_after]:
            del self._by_ip[ip]


# --- outbound destinations ----------------------------------------------------
#: What "private" means for ``mx_allow_private``: RFC 1918, shared address space
#: (RFC 6598, carrier-grade NAT), unique local IPv6 (RFC 4193), and the
#: deprecated IPv6 site-local block.
_PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
              "fc00::/7", "fec0::/10")
)
#: Classes never connected to, whatever is configured: 0.0.0.0 and :: reach the
#: local host, and a multicast address is no host at all.
_NEVER = frozenset({"unspecified", "multicast", "invalid"})
#: The NAT64 well-known prefix (RFC 6052): its addresses reach the IPv4 address
#: in their last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _reached(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
             ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a connection to ``ip`` reaches: the IPv4 address inside an
    IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 IPv6 address, else ``ip``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def destination_class(address: str) -> str:
    """The kind of an IP address for outbound delivery: "global" when it may be
    connected to, else "loopback", "link-local", "unspecified", "multicast",
    "private", "reserved" (every other special-purpose block: documentation,
    benchmarking, 240/4, broadcast, ...) or "invalid" (not an IP address).

    An IPv4-mapped, NAT64 or 6to4 IPv6 address (``::ffff:127.0.0.1``) is judged
    as the IPv4 address it reaches. Uses the stdlib ``ipaddress`` properties; "reserved"
    takes what ``is_global`` refuses beyond the named classes.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "invalid"
    ip = _reached(ip)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if any(ip.version == n.version and ip in n for n in _PRIVATE_NETWORKS):
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return "global"


class DestinationPolicy:
    """Which IP addresses MX delivery may connect to (SEMANTICS.md §6, address literals).

    Global addresses always; loopback, link-local, reserved and private ones
    only when inside ``allowed_networks`` (an internal MX on 10.x, a test
    network on 127.0.0.0/8), private ones also with ``allow_private``;
    unspecified and multicast addresses never. Static routes and the
    smarthost are the operator's choice and are not judged here.
    """

    def __init__(self, *, allow_private: bool = False,
                 allowed_networks: Iterable[str] = ()) -> None:
        self.allow_private = allow_private
        self._nets: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n) for n in allowed_networks)

    def refusal(self, address: str) -> str | None:
        """None when mail may go to ``address``; else its class, the reason it may not."""
        kind = destination_class(address)
        if kind == "global":
            return None
        if kind in _NEVER:
            return kind
        if kind == "private" and self.allow_private:
            return None
        if self._nets:
            ip = ipaddress.ip_address(address)
            reached = _reached(ip)
            for net in self._nets:
                if (ip.version == net.version and ip in net) or (
                        reached.version == net.version and reached in net):
                    return None
        return kind
