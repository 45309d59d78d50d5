"""Pure decisions of an SMTP session: who may authenticate, send, and how much.

Owns: the rules of SEMANTICS.md §3 and §6 that do not need I/O — may this
session AUTH on this transport, may this account use this sender (envelope, and
header From / Sender through relayd.smtp.headerfrom), may it add
another recipient (an address literal only when allowed), is this size
acceptable, may this AUTH be checked now after failed attempts (per client
address and username, then per address: ``AuthThrottle``). Every function
takes values (and a clock reading) and returns a Reply to send, or None to go
on. Also the one outbound decision of the same kind: which IP addresses MX
delivery may connect to (``DestinationPolicy``: never loopback, link-local,
unspecified, multicast or reserved addresses, private ones only when
configured), used by relayd.delivery.mx.

Interface cost: microseconds; these run on the event loop for every command.

Untrusted input: values parsed from client commands (already validated for
syntax by relayd.smtp.address), addresses from DNS answers. Settings read: [smtp],
[limits], [delivery] mx_allow_private and mx_allowed_networks, passed in.
See also: relayd.smtp.replies, relayd.smtp.server (the adapter that calls these).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from relayd.directory.accounts import Account
from relayd.smtp import headerfrom, replies
from relayd.smtp.address import in_domain, is_address_literal
from relayd.smtp.replies import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetworkSet:
    """A list of client networks, and whether an address is in one of them (cached)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._nets: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def contains(self, peer_ip: str) -> bool:
        """True when ``peer_ip`` (IPv4-mapped IPv6 as IPv4) is in one of the networks."""
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


class PlaintextAuthPolicy(NetworkSet):
    """Where AUTH without TLS is allowed (by client network)."""

    def allows(self, peer_ip: str) -> bool:
        """True when a client at ``peer_ip`` may AUTH over plaintext."""
        return self.contains(peer_ip)


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


def sender_allowed(account: Account, sender_domain: str, *, null: bool = False) -> Reply | None:
    """Refuse a MAIL FROM outside the account's domain (or its subdomains).

    ``null``: the null reverse-path ``<>`` (an application's own bounce or
    auto-reply), accepted; its header From is checked at the end of DATA.
    """
    if null or (sender_domain and in_domain(sender_domain, account.domain.name)):
        return None
    return replies.SENDER_NOT_ALLOWED


def header_from_allowed(account: Account, data: bytes | bytearray,
                        start: int = 0) -> Reply | None:
    """Refuse a message whose header From or Sender is outside the account's domain, or
    that has no From (unless the domain's check is switched off)."""
    if not account.domain.check_header_from:
        return None
    return headerfrom.check(data, account.domain.name, start)


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
    octets rather than one ``find`` per line, no copy: linear in the size,
    with far fewer calls than a per-line scan.

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


# --- the failed-AUTH throttle ---------------------------------------------------------

#: How long a failed (address, username, secret) is remembered, so that the same
#: secret tried again through another SASL mechanism (smtplib's ``login()`` tries
#: PLAIN, then LOGIN) is answered without a second verification and not counted.
AUTH_REPEAT_WINDOW = 60.0
_RECENT_PER_USER = 8  # remembered failed secrets per (address, username)
_KEY_MAX = 128  # longer usernames are kept as a prefix and a digest (bounded memory)
_MAX_DOUBLINGS = 32


def _address_key(peer_ip: str) -> str:
    """The canonical text of a client address (IPv4-mapped IPv6 as IPv4, no zone)."""
    if ":" not in peer_ip:
        return peer_ip  # dotted IPv4, as the kernel reports it: already canonical
    try:
        addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr)


def _user_key(username: str) -> str:
    if len(username) <= _KEY_MAX:
        return username
    tail = hashlib.blake2b(username.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{username[:64]}...{tail}"


@dataclass(slots=True)
class _User:
    """Failed and running credential checks of one username from one address."""

    failures: int = 0
    in_flight: int = 0
    last: float = 0.0  # time of the last failure (or start)
    locked_until: float = 0.0
    pending: list[bytes] = field(default_factory=list)  # fingerprints of checks running
    recent: dict[bytes, tuple[float, str]] = field(default_factory=dict)  # failed: when, why

    def counts(self) -> bool:
        return self.failures > 0 or self.in_flight > 0


@dataclass(slots=True)
class _Address:
    users: dict[str, _User] = field(default_factory=dict)
    locked_until: float = 0.0
    locked_usernames: int = 0  # distinct failing usernames when the lock tripped


@dataclass(slots=True)
class AuthAttempt:
    """One admitted credential check: give it back to ``finish`` (or ``abandon``) once."""

    address: str
    username: str
    fingerprint: bytes
    exempt: bool
    _addr: _Address
    _user: _User
    done: bool = False


class Admission(NamedTuple):
    """What ``AuthThrottle.begin`` decided for one AUTH; exactly one case holds.

    - ``attempt``: verify the credentials, then ``finish(attempt, ...)``;
    - ``refusal``: send it (``421 4.7.0``) and close, without verifying;
    - ``repeat``: the same secret failed for this username from this address a
      moment ago: answer the 535 of that reason (after ``delay``) without
      verifying again and without counting it again;
    - ``wait``: checks already running decide this one: wait until one of
      them ends, then ask again (so parallel connections never get more
      verifications than the cap).
    """

    attempt: AuthAttempt | None = None
    refusal: Reply | None = None
    repeat: str = ""
    delay: float = 0.0
    wait: bool = False


@dataclass(frozen=True, slots=True)
class ThrottleEntry:
    """One row of ``AuthThrottle.entries``; ``username`` is ``*`` for an address lock."""

    address: str
    username: str
    failures: int
    until: float | None  # locked until (epoch seconds), None while only counted


_WAIT = Admission(wait=True)
_REFUSE_USER = Admission(refusal=replies.AUTH_RATE_LIMITED)
_REFUSE_ADDRESS = Admission(refusal=replies.AUTH_RATE_LIMITED_ADDRESS)


class AuthThrottle:
    """Failed AUTH attempts per (client address, username), then per client address.

    Per (address, username): after ``free_failures`` failures the 535 comes
    ever later (``base_delay`` doubling up to ``max_delay``); at
    ``max_failures`` that username is refused from that address (``421 4.7.0``
    and close, before any verification) for ``lockout`` seconds. Another
    account logging in from the same address is not affected, so one
    misconfigured application behind a shared MTA or NAT locks out only
    itself; and the attacker's address, not the account, is locked.

    Per address (credential stuffing): once ``max_usernames`` distinct
    usernames have failed from one address within ``lockout`` seconds, every
    AUTH from it is refused for ``lockout`` seconds (from half that number on,
    the 535s slow down too). Addresses in ``exempt_networks`` (a local MTA
    relaying for many tenants) are never locked as a whole; their
    (address, username) pairs still are.

    Attempts count when they start: a check running counts like a failure
    until it ends, and an attempt that would pass a cap while checks run is
    told to wait for them, so N parallel connections get at most
    ``max_failures`` verifications per username (``max_usernames`` new
    usernames per address) before the 421s. A correct password waits at most
    the time of the checks before it, and is never refused for them. A password
    the credential cache answers is no attempt at all: the server asks only
    :meth:`locked` (a lock refuses it too) and tells :meth:`succeeded`.

    The same secret failing again for the same username from the same
    address within ``AUTH_REPEAT_WINDOW`` (a ``fingerprint``: a keyed digest
    made by relayd.directory.credentials, never the secret) is answered from memory and
    counted once. A success forgets that username's failures from that address.

    Memory: counts are forgotten ``lockout`` seconds after the last failure
    (a lock when it ends); at most ``max_entries`` (address, username) pairs
    are kept, the least recently active addresses dropped first.
    Pure: every method takes the clock reading ``now``; no I/O, no awaiting.
    """

    def __init__(self, *, free_failures: int, max_failures: int,
                 base_delay: float = 0.5, max_delay: float = 8.0,
                 lockout: float = 900.0, max_usernames: int = 50,
                 exempt_networks: Iterable[str] = (), max_entries: int = 100_000,
                 repeat_window: float = AUTH_REPEAT_WINDOW) -> None:
        self.free_failures = free_failures
        self.max_failures = max_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.lockout = lockout
        self.max_usernames = max_usernames
        self.max_entries = max_entries
        self.repeat_window = repeat_window
        self._exempt = NetworkSet(exempt_networks)
        self._addrs: OrderedDict[str, _Address] = OrderedDict()  # least recently active first
        self._users = 0  # (address, username) entries kept

    # -- the decisions --------------------------------------------------------------
    def address_refusal(self, peer_ip: str, now: float) -> Reply | None:
        """The 421 for an address locked as a whole (checked before reading credentials)."""
        key = _address_key(peer_ip)
        a = self._addrs.get(key)
        if a is None or a.locked_until <= now or self._exempt.contains(key):
            return None
        return replies.AUTH_RATE_LIMITED_ADDRESS

    def begin(self, peer_ip: str, username: str, fingerprint: bytes, now: float) -> Admission:
        """Decide whether a credential check may start; if so it counts from now."""
        key = _address_key(peer_ip)
        ukey = _user_key(username)
        exempt = self._exempt.contains(key)
        a = self._addrs.get(key)
        u: _User | None = None
        if a is not None:
            self._addrs.move_to_end(key)
            if not exempt and a.locked_until > now:
                return _REFUSE_ADDRESS
            u = a.users.get(ukey)
            if u is not None and self._expired(u, now):
                self._drop_user(a, ukey)
                u = None
        if u is not None:
            if u.locked_until > now:
                return _REFUSE_USER
            seen = u.recent.get(fingerprint)
            if seen is not None and now - seen[0] <= self.repeat_window:
                assert a is not None
                return Admission(repeat=seen[1], delay=self._delay(a, u, exempt, now))
            if u.failures >= self.max_failures:
                u.locked_until = now + self.lockout
                return _REFUSE_USER
            if fingerprint in u.pending or u.failures + u.in_flight >= self.max_failures:
                return _WAIT
        if a is not None and not exempt and (u is None or not u.counts()):
            failed, running = self._distinct(a, now)
            if failed >= self.max_usernames:
                self._lock_address(a, failed, now)
                return _REFUSE_ADDRESS
            if failed + running >= self.max_usernames:
                return _WAIT
        if a is None:
            a = self._addrs[key] = _Address()
        if u is None:
            u = a.users[ukey] = _User(last=now)
            self._users += 1
            if self._users > self.max_entries:
                self._shrink(now, keep=key)
        u.in_flight += 1
        u.pending.append(fingerprint)
        return Admission(attempt=AuthAttempt(key, ukey, fingerprint, exempt, a, u))

    def locked(self, peer_ip: str, username: str, now: float) -> bool:
        """Whether :meth:`begin` would refuse ``username`` from ``peer_ip`` as locked now
        (the address as a whole, or that pair). Nothing is counted or changed."""
        key = _address_key(peer_ip)
        a = self._addrs.get(key)
        if a is None:
            return False
        if a.locked_until > now and not self._exempt.contains(key):
            return True
        u = a.users.get(_user_key(username))
        if u is None or self._expired(u, now):
            return False
        return u.locked_until > now or u.failures >= self.max_failures

    def succeeded(self, peer_ip: str, username: str) -> None:
        """A login decided without a check (a credential-cache hit, see relayd.smtp.server):
        that username's failures from that address are forgotten, as after a successful
        check. Nothing is counted: a cached verification is not a guess."""
        key = _address_key(peer_ip)
        a = self._addrs.get(key)
        if a is None:
            return
        ukey = _user_key(username)
        u = a.users.get(ukey)
        if u is not None:
            self._forgive(key, a, ukey, u)

    def finish(self, attempt: AuthAttempt, now: float, *, ok: bool,
               reason: str) -> tuple[float, Reply | None]:
        """Record the end of a check: (delay before the 535, the 421 to send after it or None).

        ``reason`` is the credential check's outcome (``bad_password``, ...),
        remembered with the fingerprint for a repeat of the same secret.
        """
        if attempt.done:
            return 0.0, None
        attempt.done = True
        a, u = attempt._addr, attempt._user
        u.in_flight -= 1
        if attempt.fingerprint in u.pending:
            u.pending.remove(attempt.fingerprint)
        if ok:
            self._forgive(attempt.address, a, attempt.username, u)
            return 0.0, None
        u.failures += 1
        u.last = now
        u.recent[attempt.fingerprint] = (now, reason)
        while len(u.recent) > _RECENT_PER_USER:
            del u.recent[next(iter(u.recent))]
        refusal: Reply | None = None
        if u.failures >= self.max_failures:
            u.locked_until = now + self.lockout
            refusal = replies.AUTH_RATE_LIMITED
        if not attempt.exempt and a.locked_until <= now:
            failed, _ = self._distinct(a, now)
            if failed >= self.max_usernames:
                self._lock_address(a, failed, now)
                refusal = replies.AUTH_RATE_LIMITED_ADDRESS
        return self._delay(a, u, attempt.exempt, now), refusal

    def abandon(self, attempt: AuthAttempt) -> None:
        """A check that could not be made (an internal error): release it, count nothing."""
        if attempt.done:
            return
        attempt.done = True
        u = attempt._user
        u.in_flight -= 1
        if attempt.fingerprint in u.pending:
            u.pending.remove(attempt.fingerprint)
        self._drop_if_idle(attempt.address, attempt._addr, attempt.username, u)

    # -- the operator's view -------------------------------------------------------
    def entries(self, now: float) -> list[ThrottleEntry]:
        """What is counted or locked now: per (address, username), and ``*`` per address."""
        out: list[ThrottleEntry] = []
        for key, a in list(self._addrs.items()):
            self._expire_address(key, a, now)
            if a.locked_until > now:
                out.append(ThrottleEntry(key, "*", a.locked_usernames, a.locked_until))
            for ukey, u in a.users.items():
                if u.failures > 0 or u.locked_until > now:
                    out.append(ThrottleEntry(key, ukey, u.failures,
                                             u.locked_until if u.locked_until > now else None))
        out.sort(key=lambda e: (e.address, e.username != "*", e.username))
        return out

    def clear(self, now: float, peer_ip: str | None = None) -> int:
        """Forget every count and lock (of one address): return the entries removed."""
        if peer_ip is None:
            n = len(self.entries(now))
            for a in self._addrs.values():
                self._detach(a)
            self._addrs.clear()
            return n
        key = _address_key(peer_ip)
        n = sum(1 for e in self.entries(now) if e.address == key)
        if key in self._addrs:
            self._detach(self._addrs.pop(key))
        return n

    def __len__(self) -> int:
        return self._users

    # -- internals ---------------------------------------------------------------------
    def _expired(self, u: _User, now: float) -> bool:
        if u.in_flight:
            return False
        if u.locked_until:
            return u.locked_until <= now
        return now - u.last > self.lockout

    def _distinct(self, a: _Address, now: float) -> tuple[int, int]:
        """(usernames failed, usernames only running) from one address, expired ones dropped."""
        failed = running = 0
        for ukey, u in list(a.users.items()):
            if self._expired(u, now):
                self._drop_user(a, ukey)
            elif u.failures > 0:
                failed += 1
            elif u.in_flight > 0:
                running += 1
        return failed, running

    def _lock_address(self, a: _Address, failed: int, now: float) -> None:
        a.locked_until = now + self.lockout
        a.locked_usernames = failed

    def _delay(self, a: _Address, u: _User, exempt: bool, now: float) -> float:
        over = u.failures - self.free_failures
        if not exempt and self.max_usernames > 1:
            failed, _ = self._distinct(a, now)
            over = max(over, failed - self.max_usernames // 2)
        if over <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * (2 ** (min(over, _MAX_DOUBLINGS) - 1)))

    def _drop_user(self, a: _Address, ukey: str) -> None:
        if a.users.pop(ukey, None) is not None:
            self._users -= 1

    def _forgive(self, key: str, a: _Address, ukey: str, u: _User) -> None:
        """A success: the pair's failures are forgotten (and the pair, once idle)."""
        u.failures = 0
        u.recent.clear()
        self._drop_if_idle(key, a, ukey, u)

    def _drop_if_idle(self, key: str, a: _Address, ukey: str, u: _User) -> None:
        if u.counts() or u.locked_until:
            return
        if a.users.get(ukey) is u:
            self._drop_user(a, ukey)
        if not a.users and not a.locked_until and self._addrs.get(key) is a:
            del self._addrs[key]

    def _expire_address(self, key: str, a: _Address, now: float) -> None:
        if a.locked_until and a.locked_until <= now:
            a.locked_until = 0.0
            a.locked_usernames = 0
        for ukey, u in list(a.users.items()):
            if self._expired(u, now):
                self._drop_user(a, ukey)
        if not a.users and not a.locked_until and self._addrs.get(key) is a:
            del self._addrs[key]

    def _shrink(self, now: float, keep: str) -> None:
        """Over ``max_entries``: drop what expired, then the least recently active addresses."""
        for key, a in list(self._addrs.items()):
            self._expire_address(key, a, now)
        target = self.max_entries * 9 // 10
        while self._users > target and len(self._addrs) > 1:
            key = next(iter(self._addrs))
            if key == keep:
                self._addrs.move_to_end(key)
                continue
            self._detach(self._addrs.pop(key))

    def _detach(self, a: _Address) -> None:
        """Forget an address (checks still running on it finish on the detached copy)."""
        self._users -= len(a.users)
        a.users.clear()


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
