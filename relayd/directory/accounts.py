"""The in-memory directory of sending domains and SMTP accounts.

Owns: the live view of every domain and account that the SMTP hot path reads
(status, epoch, sender domain, bound networks, counters) — loaded from the
spool at start and changed only by relayd.controlplane.domains and .accounts, which
write the database and this directory in the same call (ARCHITECTURE §6).

Interface cost: every lookup here is a dict access or a short list scan, with
no I/O; it is safe to call on the event loop for every command.

The *epoch* of an account is how sessions notice invalidation: a session keeps
the epoch it authenticated under, and any disable, delete or password reset
bumps it, so every session of that account stops being authenticated at that
instant, without the directory knowing the sessions. (A reset that keeps the old
password for a grace period takes no password away: it bumps the epoch only if an
older kept password, still valid, ends with it. A kept password's expiry refuses
new AUTHs; a session authenticated before it keeps its authentication.)

Binding rules (pure, used by relayd.controlplane.accounts): a network bound to an account
is written without host bits, is no broader than the configured prefix
(``[limits] max_network_prefix_v4`` / ``_v6``), is not an IPv4-mapped IPv6
range, and overlaps no other account's network (``parse_binding``,
``overlapping``, ``binding_problems`` for what an older version stored).

Untrusted input: peer addresses (from the socket, already parsed by the OS);
networks to bind (operator input, checked by ``parse_binding``).
Settings read: none (limits are passed in). See also: relayd.directory.credentials,
relayd.controlplane.accounts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from relayd.directory.suppression import Suppressions

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

ACTIVE = "active"
DISABLED = "disabled"
DELETED = "deleted"


@dataclass(eq=False)
class Domain:
    """A sending domain, its current DKIM signer(s), and whether the header From is checked."""

    id: int
    name: str
    selector: str
    deleted: bool = False
    check_header_from: bool = True
    signers: list[Any] = field(default_factory=list)
    webhook_url: str | None = None  # where delivery events are posted (None: nowhere)
    webhook_secret: str | None = field(default=None, repr=False)  # the key that signs them


@dataclass(eq=False)
class Account:
    """One SMTP account as the hot path sees it."""

    id: int
    username: str
    domain: Domain
    password_hash: str
    status: str = ACTIVE
    disabled_reason: str = ""
    epoch: int = 0
    created_at: float = 0.0
    last_connection: float | None = None
    total_sent: int = 0
    networks: list[str] = field(default_factory=list)
    per_minute: int | None = None
    per_hour: int | None = None
    per_day: int | None = None
    label: str = ""  # the operator's free text (which application uses it)
    #: The previous password's hash, kept by ``reset-password --keep-old`` until
    #: ``old_password_expires`` (POSIX seconds, compared with this node's clock).
    old_password_hash: str = ""
    old_password_expires: float | None = None

    @property
    def usable(self) -> bool:
        """True when the account may authenticate and submit mail."""
        return self.status == ACTIVE

    def old_password_valid(self, now: float) -> bool:
        """True while a kept old password still authenticates (before its expiry)."""
        return (bool(self.old_password_hash) and self.old_password_expires is not None
                and now < self.old_password_expires)

    def end_old_password(self) -> None:
        """Forget the kept old password (its grace ends now)."""
        self.old_password_hash, self.old_password_expires = "", None

    def invalidate(self) -> None:
        """End the authentication of every session of this account, now."""
        self.epoch += 1


class BindingRefused(ValueError):
    """A network that may not be bound; ``code`` is a stable token for the control API."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def parse_binding(text: str, max_prefix_v4: int, max_prefix_v6: int) -> IPNetwork:
    """The network ``text`` names, if it may be bound to an account; else BindingRefused.

    Refused: not a network; host bits set (``10.0.0.1/24`` is ambiguous: the
    network or the host?); broader than ``/max_prefix_v4`` (IPv4) or
    ``/max_prefix_v6`` (IPv6); an IPv4-mapped IPv6 range (sessions from IPv4
    are matched in their IPv4 form, so it would never apply).
    """
    t = text.strip()
    try:
        net = ipaddress.ip_network(t, strict=False)
    except ValueError:
        raise BindingRefused(f"not a valid network: {text!r}", "invalid_network") from None
    try:
        ipaddress.ip_network(t, strict=True)
    except ValueError:
        host = t.split("/", 1)[0]
        raise BindingRefused(
            f"{t} has host bits set: write the network {net} or the single address"
            f" {host}/{net.max_prefixlen}", "network_host_bits") from None
    limit = max_prefix_v4 if net.version == 4 else max_prefix_v6
    if net.prefixlen < limit:
        key = "max_network_prefix_v4" if net.version == 4 else "max_network_prefix_v6"
        raise BindingRefused(
            f"{net} is broader than /{limit}, the broadest network an account may be bound"
            f" to ([limits] {key})", "network_too_broad")
    if net.version == 6 and net.subnet_of(_V4_MAPPED):
        raise BindingRefused(f"{net} is an IPv4-mapped range: bind the IPv4 network instead",
                             "invalid_network")
    return net


def overlapping(net: IPNetwork, bound: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The first ``(cidr, owner)`` of ``bound`` whose network overlaps ``net``, or None.

    Stored networks that do not parse are skipped (they never match a session either).
    """
    for cidr, owner in bound:
        try:
            other = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if other.version == net.version and net.overlaps(other):
            return cidr, owner
    return None


def binding_problems(bindings: list[tuple[str, str]], max_prefix_v4: int,
                     max_prefix_v6: int) -> list[tuple[str, str, str]]:
    """``(owner, cidr, why)`` for each stored ``(cidr, owner)`` that today's rules refuse.

    What an older version accepted (too broad, host bits set, overlapping another
    owner's network) is reported, not changed: the caller logs it.
    """
    out: list[tuple[str, str, str]] = []
    for i, (cidr, owner) in enumerate(bindings):
        try:
            net = parse_binding(cidr, max_prefix_v4, max_prefix_v6)
        except BindingRefused as exc:
            out.append((owner, cidr, str(exc)))
            continue
        others = [b for j, b in enumerate(bindings) if j != i and b[1] != owner]
        hit = overlapping(net, others)
        if hit is not None:
            out.append((owner, cidr, f"{cidr} overlaps {hit[0]}, bound to {hit[1]}"))
    return out


class Directory:
    """Accounts by name and id, domains by name, and network bindings."""

    def __init__(self) -> None:
        self.accounts_by_name: dict[str, Account] = {}
        self.accounts_by_id: dict[int, Account] = {}
        self.domains_by_name: dict[str, Domain] = {}
        self.domains_by_id: dict[int, Domain] = {}
        self._networks: list[tuple[IPNetwork, Account]] = []
        self._ip_cache: dict[str, Account | None] = {}
        #: Per domain, the recipients not sent to again (relayd.directory.suppression).
        self.suppressions = Suppressions()

    # -- lookups (hot path) ---------------------------------------------------
    def account(self, username: str) -> Account | None:
        """The account with this username (including deleted ones), or None."""
        return self.accounts_by_name.get(username)

    def account_for_ip(self, ip: str) -> Account | None:
        """The account bound to the most specific network containing ``ip``."""
        try:
            return self._ip_cache[ip]
        except KeyError:
            pass
        found: Account | None = None
        if self._networks:
            try:
                addr = ipaddress.ip_address(ip.split("%", 1)[0])
            except ValueError:
                addr = None
            if addr is not None:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                    addr = addr.ipv4_mapped
                for net, acct in self._networks:
                    if addr.version == net.version and addr in net:
                        found = acct
                        break
        if len(self._ip_cache) > 65536:
            self._ip_cache.clear()
        self._ip_cache[ip] = found
        return found

    def active_domain(self, name: str) -> Domain | None:
        """The live (not deleted) domain with this name."""
        return self.domains_by_name.get(name.lower())

    # -- changes (lifecycle only) ---------------------------------------------
    def put_domain(self, domain: Domain) -> None:
        """Add or replace a domain."""
        self.domains_by_id[domain.id] = domain
        if not domain.deleted:
            self.domains_by_name[domain.name] = domain
        elif self.domains_by_name.get(domain.name) is domain:
            del self.domains_by_name[domain.name]

    def put_account(self, account: Account) -> None:
        """Add or replace an account (and its network bindings)."""
        self.accounts_by_name[account.username] = account
        self.accounts_by_id[account.id] = account
        self.rebuild_networks()

    def rebuild_networks(self) -> None:
        """Recompute the network table, most specific first."""
        table: list[tuple[IPNetwork, Account]] = []
        for acct in self.accounts_by_id.values():
            if acct.status == DELETED:
                continue
            for cidr in acct.networks:
                table.append((ipaddress.ip_network(cidr, strict=False), acct))
        table.sort(key=lambda item: (-item[0].prefixlen, item[1].id))
        self._networks = table
        self._ip_cache = {}

    def count_slots(self) -> int:
        """Accounts that occupy a plan slot (active and disabled, not deleted)."""
        return sum(1 for a in self.accounts_by_id.values() if a.status != DELETED)
