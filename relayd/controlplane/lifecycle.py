"""Domain and account operations, each keeping database, cache and queues in agreement.

Owns: add/list/show/delete of sending domains (with their DKIM keys) and
add/list/show/disable/enable/reset-password/delete/limits/networks/dormant of
SMTP accounts (SEMANTICS.md §2-§4), the queue operations that must agree
with the scheduler's memory (purge, retry), and the batched write of
last-connection times.

Ordering rule (DESIGN.md §3.6): an operation that *takes away* the right to
send (disable, delete, reset-password, domain delete) changes memory first —
account status, epoch (which ends every session's authentication) and the
credential cache — and only then writes the database; if the write fails, the
memory change is rolled back and the error returned. An operation that
*gives* the right to send (enable, add) writes the database first. Either
way, the call returns only when all three agree, so "immediately" is exact:
when the control call returns, no AUTH with old credentials succeeds and no
session of the account can start or finish a message.

Untrusted input: operator requests from the control socket (names, CIDRs,
numbers), already decoded by control.schemas. Settings read: [limits],
[dkim], [dns], [server].hostname.
See also: relayd.directory.accounts, relayd.directory.credentials, relayd.queue.scheduler,
relayd.store.directory (the directory tables), relayd.store.spool (the queue tables).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from control import schemas
from relayd.config import Config
from relayd.directory.accounts import (
    ACTIVE,
    DELETED,
    DISABLED,
    Account,
    BindingRefused,
    Directory,
    Domain,
    binding_problems,
    overlapping,
    parse_binding,
)
from relayd.directory.credentials import CredentialCache, Hasher
from relayd.dkim import signature as dkim
from relayd.ids import format_id, parse_id
from relayd.queue.scheduler import Scheduler
from relayd.store.deliverylog import DeliveryLog
from relayd.store.directory import (
    DirectoryStore,
    DomainExists,
    NetworkBinding,
    NewAccount,
    NewDomain,
    QueueNotEmpty,
    SqliteDirectory,
)
from relayd.store.spool import Spool

_SELECTOR_TRIES = 8
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


class LifecycleError(Exception):
    """An operation refused: ``status`` is the HTTP status, ``code`` a stable token."""

    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _queue_not_empty(username: str, queued: int) -> LifecycleError:
    return LifecycleError(
        f"{username} still has {queued} queued message(s) (send, held or retry queue);"
        " wait for delivery or delete with --purge-queue", "queue_not_empty", 409)


def _not_found(kind: str, name: str) -> LifecycleError:
    return LifecycleError(f"no such {kind}: {name}", "not_found", 404)


def new_password() -> str:
    """A strong random password (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def new_username(domain: str) -> str:
    """A fresh username: a short label from the domain and 12 random base32 characters."""
    label = re.sub(r"[^a-z0-9]", "", domain.split(".")[0])[:12] or "smtp"
    token = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:12]
    return f"{label}-{token}"


class Lifecycle:
    """Every operator operation on domains, accounts and queues."""

    def __init__(self, cfg: Config, spool: Spool, directory: Directory, hasher: Hasher,
                 cache: CredentialCache, scheduler: Scheduler, *, delivery_log: DeliveryLog,
                 clock: Callable[[], float] = time.time,
                 selector_token: Callable[[], str] = dkim.selector_token,
                 log: Callable[..., None] | None = None,
                 warn: Callable[..., None] | None = None,
                 store: DirectoryStore | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.dlog = delivery_log
        #: The directory tables (on the spool's database unless given).
        self.store: DirectoryStore = store or SqliteDirectory(spool)
        self.directory = directory
        self.hasher = hasher
        self.cache = cache
        self.scheduler = scheduler
        self.clock = clock
        self.selector_token = selector_token
        self._log = log or (lambda event, **kw: None)
        self._warn = warn or self._log
        self._flushed: dict[int, float | None] = {}
        self._lock = asyncio.Lock()

    # -- loading -----------------------------------------------------------------
    async def load(self) -> None:
        """Fill the directory from the database (at start)."""
        d = self.directory
        for rec in await self.store.domains():
            dom = Domain(rec.id, rec.name, rec.selector, deleted=rec.deleted)
            dom.signers = self._signers(dom.name, rec.selector, rec.private_key,
                                        rec.ed25519_selector, rec.ed25519_key)
            d.put_domain(dom)
        for row in await self.store.accounts():
            acct = Account(
                id=row.id, username=row.username, domain=d.domains_by_id[row.domain_id],
                password_hash=row.password_hash or "", status=row.status,
                disabled_reason=row.disabled_reason, created_at=row.created_at,
                last_connection=row.last_connection, total_sent=row.total_sent,
                networks=row.networks, per_minute=row.per_minute, per_hour=row.per_hour,
                per_day=row.per_day,
            )
            d.accounts_by_name[acct.username] = acct
            d.accounts_by_id[acct.id] = acct
            self._flushed[acct.id] = acct.last_connection
        d.rebuild_networks()
        self._warn_bindings()

    def _warn_bindings(self) -> None:
        """Log ``legacy_network_binding`` for each stored binding that an older
        version accepted and today's rules refuse; it stays in effect (never changed
        behind the operator's back) until ``user networks remove``."""
        lim = self.cfg.limits
        bindings = [(cidr, a.username) for a in self.directory.accounts_by_id.values()
                    if a.status != DELETED for cidr in a.networks]
        for owner, cidr, why in binding_problems(bindings, lim.max_network_prefix_v4,
                                                 lim.max_network_prefix_v6):
            self._warn("legacy_network_binding", username=owner, cidr=cidr,
                       problem=why, fix=f"relayctl user networks remove {owner} {cidr}")

    def _signers(self, domain: str, selector: str, key: bytes | None, ed_selector: str | None,
                 ed_key: bytes | None) -> list[dkim.Signer]:
        if not self.cfg.dkim.enabled:
            return []
        out = []
        if key:
            out.append(dkim.Signer(domain, selector, bytes(key)))
        if ed_key and ed_selector:
            out.append(dkim.Signer(domain, ed_selector, bytes(ed_key)))
        return out

    # -- domains -------------------------------------------------------------------
    def _dns_records(self, name: str, selector: str, pem: bytes | None,
                     ed_selector: str | None, ed_pem: bytes | None) -> list[schemas.DnsRecord]:
        recs: list[schemas.DnsRecord] = []
        cname = self.cfg.dns.cname_target.strip(".")
        for sel, key in ((selector, pem), (ed_selector, ed_pem)):
            if not sel or not key:
                continue
            owner = dkim.dns_name(sel, name)
            alg = "rsa" if b"RSA" in key or len(key) > 400 else "ed25519"
            txt = dkim.dns_txt_value(alg, dkim.public_key_b64(bytes(key)))
            if cname:
                target = f"{sel}._domainkey.{name}.{cname}"
                recs.append(schemas.DnsRecord(type="CNAME", name=owner, value=target,
                                              purpose="dkim"))
                recs.append(schemas.DnsRecord(type="TXT", name=target, value=txt,
                                              purpose="dkim (published in your zone)"))
            else:
                recs.append(schemas.DnsRecord(type="TXT", name=owner, value=txt, purpose="dkim"))
        recs.append(schemas.DnsRecord(
            type="TXT", name=name,
            value=f"v=spf1 a:{self.cfg.server.hostname} ~all",
            purpose="spf (hint: merge with an existing SPF record; include every relay host)",
        ))
        return recs

    async def domain_add(self, name: str) -> schemas.DomainInfo:
        """Create a sending domain with a new DKIM key and a never-used selector."""
        name = name.strip().lower().rstrip(".")
        if not _DOMAIN_RE.match(name):
            raise LifecycleError(f"not a valid domain name: {name!r}", "invalid_domain")
        if self.directory.active_domain(name) is not None:
            raise LifecycleError(f"domain already exists: {name}", "exists", 409)
        loop = asyncio.get_running_loop()
        pem = await loop.run_in_executor(None, dkim.generate_private_key, self.cfg.dkim.algorithm)
        ed_pem: bytes | None = None
        if self.cfg.dkim.dual_ed25519 and self.cfg.dkim.algorithm != "ed25519":
            ed_pem = await loop.run_in_executor(None, dkim.generate_private_key, "ed25519")
        now = self.clock()
        algorithm = self.cfg.dkim.algorithm

        async with self._lock:
            if self.directory.active_domain(name) is not None:
                raise LifecycleError(f"domain already exists: {name}", "exists", 409)
            # A selector is never reused, even one of a deleted domain (its record may
            # still be published): draw again on the rare collision with any stored one.
            for _ in range(_SELECTOR_TRIES):
                selector = dkim.new_selector(int(now), self.selector_token())
                ed_selector = dkim.new_selector(int(now), self.selector_token()) \
                    if ed_pem else None
                wanted = [x for x in (selector, ed_selector) if x]
                if len(set(wanted)) == len(wanted) and not await self._selector_used(wanted):
                    break
            else:
                raise LifecycleError("could not draw an unused DKIM selector", "internal", 500)

            try:
                dom_id = await self.store.add_domain(NewDomain(
                    name, selector, algorithm, pem, ed_selector, ed_pem, now))
            except DomainExists:
                raise LifecycleError(f"domain already exists: {name}", "exists", 409) \
                    from None
            dom = Domain(dom_id, name, selector)
            dom.signers = self._signers(name, selector, pem, ed_selector, ed_pem)
            self.directory.put_domain(dom)
        self._log("domain_added", domain=name, selector=selector)
        return schemas.DomainInfo(
            name=name, selector=selector, created_at=now,
            dns_records=self._dns_records(name, selector, pem, ed_selector, ed_pem))

    async def _selector_used(self, selectors: list[str]) -> bool:
        """True if any of ``selectors`` was ever given to a domain (deleted ones included)."""
        return await self.store.selectors_used(selectors)

    async def domain_info(self, name: str) -> schemas.DomainInfo:
        """One live domain with its DNS records."""
        dom = self.directory.active_domain(name)
        if dom is None:
            raise _not_found("domain", name)
        rec = await self.store.domain(dom.id)
        assert rec is not None  # a domain is never removed from the table
        accounts = sum(1 for a in self.directory.accounts_by_id.values()
                       if a.domain is dom and a.status != DELETED)
        return schemas.DomainInfo(
            name=dom.name, selector=dom.selector, created_at=rec.created_at, accounts=accounts,
            dns_records=self._dns_records(dom.name, dom.selector, rec.private_key,
                                          rec.ed25519_selector, rec.ed25519_key))

    async def domain_list(self) -> schemas.DomainList:
        """All live domains."""
        out = []
        for r in await self.store.live_domains():
            n = sum(1 for a in self.directory.accounts_by_id.values()
                    if a.domain.id == r.id and a.status != DELETED)
            out.append(schemas.DomainInfo(name=r.name, selector=r.selector,
                                          created_at=r.created_at, accounts=n))
        return schemas.DomainList(domains=out)

    async def domain_delete(self, name: str, confirm: str) -> schemas.DomainDeleted:
        """Delete a domain: irreversible; disables its accounts for good and destroys its key.

        ``confirm`` must be the name exactly as ``domain list`` shows it (no case
        folding, spaces or trailing dot).
        """
        name = name.strip().lower().rstrip(".")
        async with self._lock:
            dom = self.directory.active_domain(name)
            if dom is None:
                raise _not_found("domain", name)
            if confirm != dom.name:
                raise LifecycleError(
                    f"confirmation does not match: type the domain name {dom.name!r} exactly"
                    " as `domain list` shows it", "confirm_mismatch")
            accts = [a for a in self.directory.accounts_by_id.values()
                     if a.domain is dom and a.status != DELETED]
            saved = [(a, a.status, a.disabled_reason) for a in accts]
            signers = dom.signers
            # Memory first: from here on no session of these accounts can send.
            dom.deleted = True
            dom.signers = []
            for a in accts:
                a.status = DISABLED
                a.disabled_reason = "domain_deleted"
                a.invalidate()
                self.cache.invalidate(a.id)
            now = self.clock()
            try:
                await self.store.delete_domain(dom.id, now)
            except Exception:
                dom.deleted = False
                dom.signers = signers
                for a, status, reason in saved:
                    a.status, a.disabled_reason = status, reason
                raise
            self.directory.put_domain(dom)
            self.directory.rebuild_networks()
        ids = {a.id for a in accts}  # held = not yet attempted (retries go on, §4.1)
        held = sum(1 for m, _, _ in self.scheduler.send_queue_view() if m.account_id in ids)
        self._log("domain_deleted", domain=name, accounts_disabled=len(accts))
        return schemas.DomainDeleted(name=name, accounts_disabled=len(accts), messages_held=held)

    # -- accounts --------------------------------------------------------------------
    def _account(self, username: str, *, allow_deleted: bool = False) -> Account:
        acct = self.directory.account(username)
        if acct is None or (acct.status == DELETED and not allow_deleted):
            raise _not_found("user", username)
        return acct

    def info(self, acct: Account) -> schemas.UserInfo:
        """The operator's view of an account."""
        return schemas.UserInfo(
            username=acct.username, domain=acct.domain.name, status=acct.status,
            disabled_reason=acct.disabled_reason, created_at=acct.created_at,
            last_connection=acct.last_connection, total_sent=acct.total_sent,
            queued=self.scheduler.queued_count(acct.id), networks=list(acct.networks),
            limits=schemas.Limits(per_minute=acct.per_minute, per_hour=acct.per_hour,
                                  per_day=acct.per_day))

    def _check_bindings(self, cidrs: list[str], field: str) -> list[str]:
        """The networks to bind, normalised and without repeats; LifecycleError naming
        ``field`` for one that may not be bound (accounts.parse_binding)."""
        lim = self.cfg.limits
        out: list[str] = []
        for c in cidrs:
            try:
                net = str(parse_binding(c, lim.max_network_prefix_v4, lim.max_network_prefix_v6))
            except BindingRefused as exc:
                raise LifecycleError(f"{field}: {exc}", exc.code) from None
            if net not in out:
                out.append(net)
        return out

    @staticmethod
    def _refuse_overlap(others: list[NetworkBinding], nets: list[str], field: str) -> None:
        """Inside the write transaction that binds ``nets`` (the store runs it there, given
        the networks of the other accounts that are not deleted): refuse one that
        overlaps (so two concurrent adds cannot both pass)."""
        bound = [(b.cidr, f"account {b.username} (domain {b.domain})") for b in others]
        for cidr in nets:
            hit = overlapping(ipaddress.ip_network(cidr), bound)
            if hit is not None:
                raise LifecycleError(
                    f"{field}: {cidr} overlaps {hit[0]}, already bound to {hit[1]}; an address"
                    " may belong to one account only", "network_overlap")

    async def user_add(self, domain: str, networks: list[str]) -> schemas.Credentials:
        """Create an account with a generated username and password (shown once)."""
        dom = self.directory.active_domain(domain.strip().lower().rstrip("."))
        if dom is None:
            raise _not_found("domain", domain)
        nets = self._check_bindings(networks, "allow_networks")
        password = new_password()
        hashed = await self.hasher.hash(password)
        now = self.clock()
        async with self._lock:
            used = self.directory.count_slots()
            cap = self.cfg.limits.max_accounts
            if used >= cap:
                raise LifecycleError(
                    f"plan limit reached: {used} of {cap} account slots in use (active and"
                    " disabled accounts occupy a slot; delete an account to free one)",
                    "plan_limit", 409)
            for _ in range(5):  # deleted accounts stay in the directory: never reused
                username = new_username(dom.name)
                if self.directory.account(username) is None:
                    break
            else:
                raise LifecycleError("could not draw an unused username", "internal", 500)

            acct_id = await self.store.add_account(
                NewAccount(username, dom.id, hashed, now, nets),
                lambda others: self._refuse_overlap(others, nets, "allow_networks"))
            acct = Account(id=acct_id, username=username, domain=dom, password_hash=hashed,
                           created_at=now, networks=nets)
            self._flushed[acct_id] = None
            self.directory.put_account(acct)
        self._log("user_added", username=username, domain=dom.name, networks=nets)
        return schemas.Credentials(username=username, password=password)

    async def user_show(self, username: str) -> schemas.UserInfo:
        """One account."""
        return self.info(self._account(username))

    async def user_list(self, domain: str | None = None, status: str | None = None,
                        sort: str = "name") -> schemas.UserList:
        """Accounts (not deleted), filtered and sorted."""
        accts = [a for a in self.directory.accounts_by_id.values() if a.status != DELETED]
        if domain:
            accts = [a for a in accts if a.domain.name == domain.lower()]
        if status:
            if status not in (ACTIVE, DISABLED):
                raise LifecycleError("status must be active or disabled", "bad_request")
            accts = [a for a in accts if a.status == status]
        if sort == "name":
            accts.sort(key=lambda a: a.username)
        elif sort == "last-used":
            accts.sort(key=lambda a: -(a.last_connection or 0.0))
        elif sort == "sent":
            accts.sort(key=lambda a: -a.total_sent)
        else:
            raise LifecycleError("sort must be name, last-used or sent", "bad_request")
        return schemas.UserList(users=[self.info(a) for a in accts])

    async def user_dormant(self, days: float, max_sent: int | None) -> schemas.UserList:
        """Accounts whose last connection is older than ``days`` (or never), oldest first."""
        if days < 0:
            raise LifecycleError("days must be >= 0", "bad_request")
        cutoff = self.clock() - days * 86400
        accts = [a for a in self.directory.accounts_by_id.values() if a.status != DELETED
                 and (a.last_connection is None or a.last_connection < cutoff)
                 and (max_sent is None or a.total_sent <= max_sent)]
        accts.sort(key=lambda a: (a.last_connection is not None, a.last_connection or 0.0,
                                  a.created_at))
        return schemas.UserList(users=[self.info(a) for a in accts])

    async def user_disable(self, username: str) -> schemas.UserInfo:
        """Disable: every AUTH fails and no session can send, at once; mail is held."""
        async with self._lock:
            acct = self._account(username)
            if acct.status == DISABLED:
                return self.info(acct)
            acct.status, acct.disabled_reason = DISABLED, "manual"
            acct.invalidate()
            self.cache.invalidate(acct.id)
            try:
                await self.store.set_status(acct.id, DISABLED, "manual")
            except Exception:
                acct.status, acct.disabled_reason = ACTIVE, ""
                raise
        self._log("user_disabled", username=username)
        return self.info(acct)

    async def user_enable(self, username: str) -> schemas.UserInfo:
        """Enable: the same password works again at once; held mail is dispatched."""
        async with self._lock:
            acct = self._account(username)
            if acct.disabled_reason == "domain_deleted":
                raise LifecycleError(
                    f"{username} belongs to a deleted domain and can never be enabled again",
                    "domain_deleted", 409)
            if acct.status == ACTIVE:
                return self.info(acct)
            await self.store.set_status(acct.id, ACTIVE, "")
            acct.status, acct.disabled_reason = ACTIVE, ""
        self.scheduler.wake()
        self._log("user_enabled", username=username)
        return self.info(acct)

    async def user_reset_password(self, username: str) -> schemas.Credentials:
        """A new password (shown once); the old one fails at once."""
        acct = self._account(username)
        password = new_password()
        hashed = await self.hasher.hash(password)
        async with self._lock:
            acct = self._account(username)
            old = acct.password_hash
            acct.password_hash = hashed
            acct.invalidate()
            self.cache.invalidate(acct.id)
            try:
                await self.store.set_password(acct.id, hashed)
            except Exception:
                acct.password_hash = old
                raise
        self._log("user_password_reset", username=username)
        return schemas.Credentials(username=username, password=password)

    async def user_delete(self, username: str, confirm: str,
                          purge_queue: bool) -> schemas.UserDeleted:
        """Delete: credentials destroyed for good, slot freed, stats removed, log kept."""
        if confirm != username:
            raise LifecycleError(
                f"confirmation does not match: type the username {username!r} again",
                "confirm_mismatch")
        async with self._lock:
            acct = self._account(username)
            queued = await self._queued_in_db(acct.id)
            if queued and not purge_queue:
                raise _queue_not_empty(username, queued)
            saved = (acct.status, acct.disabled_reason, acct.password_hash)
            acct.status = DELETED
            acct.password_hash = ""
            acct.invalidate()
            self.cache.invalidate(acct.id)
            self.directory.rebuild_networks()
            now = self.clock()
            try:
                # without purge_queue, a message committed after the check above is
                # still refused (the store counts again in the transaction)
                purged_ids = await self.store.delete_account(acct.id, now, purge_queue)
            except QueueNotEmpty as exc:
                acct.status, acct.disabled_reason, acct.password_hash = saved
                self.directory.rebuild_networks()
                raise _queue_not_empty(username, exc.count) from None
            except Exception:
                acct.status, acct.disabled_reason, acct.password_hash = saved
                self.directory.rebuild_networks()
                raise
            # Everything the account had queued is gone from the database: forget it
            # (until now the scheduler held it, as for any account that is not usable;
            # a retry already handed to a worker finds its message purged and stops).
            dropped = self.scheduler.drop_account(acct.id)
            self.scheduler.forget(acct.id, dropped + purged_ids)
            purged = len(purged_ids)
            acct.total_sent = 0
            acct.last_connection = None
            acct.networks = []
        self._log("user_deleted", username=username, purged=purged)
        return schemas.UserDeleted(username=username, purged=purged)

    async def _queued_in_db(self, account_id: int) -> int:
        return await self.spool.message_count(account_id)

    async def user_limits(self, username: str, limits: schemas.UserLimits) -> schemas.UserInfo:
        """Set sending limits (0 = unlimited, omitted = workspace default)."""
        for v in (limits.per_minute, limits.per_hour, limits.per_day):
            if v is not None and v < 0:
                raise LifecycleError("limits must be >= 0", "bad_request")
        async with self._lock:
            acct = self._account(username)
            await self.store.set_limits(acct.id, limits.per_minute, limits.per_hour,
                                        limits.per_day)
            acct.per_minute, acct.per_hour, acct.per_day = (
                limits.per_minute, limits.per_hour, limits.per_day)
        self.scheduler.set_limits(acct)
        self._log("user_limits", username=username, per_minute=limits.per_minute,
                  per_hour=limits.per_hour, per_day=limits.per_day)
        return self.info(acct)

    async def user_networks(self, username: str, change: schemas.NetworkChange) -> \
            schemas.UserInfo:
        """Bind or unbind a source network; effective at once.

        A network to bind must pass accounts.parse_binding and overlap no other
        account's (checked in the transaction that stores it); one to unbind is
        taken as stored, whatever rules applied when it was bound.
        """
        if change.action == "add":
            (cidr,) = self._check_bindings([change.cidr], "cidr")
        else:  # what is stored, whatever rules applied when it was bound
            try:
                cidr = str(ipaddress.ip_network(change.cidr.strip(), strict=False))
            except ValueError:
                raise LifecycleError(f"cidr: not a valid network: {change.cidr!r}",
                                     "invalid_network") from None
        async with self._lock:
            acct = self._account(username)
            if change.action == "add":
                if cidr in acct.networks:
                    return self.info(acct)
                await self.store.add_network(
                    acct.id, cidr, lambda others: self._refuse_overlap(others, [cidr], "cidr"))
                acct.networks = [*acct.networks, cidr]
            else:
                if cidr not in acct.networks:
                    raise _not_found("network binding", cidr)
                acct.networks = [n for n in acct.networks if n != cidr]
                acct.invalidate()  # sessions attributed through it lose it now
                try:
                    await self.store.remove_network(acct.id, cidr)
                except Exception:
                    acct.networks = [*acct.networks, cidr]
                    raise
            self.directory.rebuild_networks()
        self._log("user_networks", username=username, action=change.action, cidr=cidr)
        return self.info(acct)

    # -- queues ------------------------------------------------------------------------
    async def queue_list(self, user: str | None, state: str | None) -> schemas.QueueList:
        """Messages waiting: send queue (queued, waiting_limit, held) and retry queue."""
        now = self.clock()
        acct_filter = self._account(user, allow_deleted=True).id if user else None
        items: list[schemas.QueueItem] = []
        if state in (None, "queued", "waiting_limit", "held"):
            # The send queue as the database holds it, in the state the scheduler
            # gives it (a message memory lost is listed too: its account's state).
            view = {m.id: (st, until) for m, st, until in self.scheduler.send_queue_view()}
            held_before = self.scheduler.never_attempted_in_memory()
            for sm in await self.spool.queued_messages(account_id=acct_filter):
                seen = view.get(sm.id)
                if seen is None:
                    if sm.id in held_before or self.scheduler.in_memory(sm.id):
                        # Being attempted now, or attempted while the spool was read
                        # (the read may predate its result's commit).
                        continue
                    seen = self.scheduler.account_state(sm.account_id)
                st, until = seen
                if state is not None and st != state:
                    continue
                items.append(schemas.QueueItem(
                    id=format_id(sm.id), username=sm.username, sender=sm.sender, state=st,
                    age_seconds=now - sm.received_at,
                    attempts=max(r.attempts for r in sm.recipients),
                    recipients=[r.rcpt for r in sm.recipients], reset_at=until))
        if state in (None, "deferred"):
            for d in await self.spool.deferred_messages(acct_filter):
                items.append(schemas.QueueItem(
                    id=format_id(d.id), username=d.username, sender=d.sender, state="deferred",
                    age_seconds=now - d.received_at, attempts=d.attempts,
                    next_attempt=d.next_attempt, recipients=d.recipients,
                    last_error=d.last_error, size=d.size))
        elif state not in ("queued", "waiting_limit", "held"):
            raise LifecycleError("state must be queued, waiting_limit, held or deferred",
                                 "bad_request")
        return schemas.QueueList(items=items)

    async def queue_show(self, ext_id: str) -> schemas.QueueItem:
        """One queued message."""
        try:
            mid = parse_id(ext_id.upper())
        except ValueError:
            raise LifecycleError("message id must be 16 hex digits", "bad_request") from None
        for item in (await self.queue_list(None, None)).items:
            if item.id == format_id(mid):
                return item
        raise _not_found("queued message", ext_id)

    async def queue_purge(self, user: str, state: str | None) -> schemas.QueueChanged:
        """Remove an account's queued messages (all, or one state)."""
        acct = self._account(user, allow_deleted=True)
        if state not in (None, "queued", "waiting_limit", "held", "deferred"):
            raise LifecycleError("state must be queued, waiting_limit, held or deferred",
                                 "bad_request")
        dropped: list[int] = []
        if state != "deferred":
            dropped = self.scheduler.drop_account(acct.id, state)
        if state is None or state == "deferred":
            ids = await self.spool.purge(acct.id, state)
        else:
            ids = await self.spool.purge_messages(dropped)
        # forget exactly what left the database (deferred mail included)
        self.scheduler.forget(acct.id, dropped + ids)
        n = len(ids)
        self._log("queue_purged", username=user, state=state, count=n)
        return schemas.QueueChanged(count=n)

    async def queue_retry(self, user: str | None) -> schemas.QueueChanged:
        """Make deferred mail due now."""
        now = self.clock()
        acct_id = self._account(user, allow_deleted=True).id if user else None
        n = await self.spool.retry_now(now, acct_id)
        self.scheduler.wake_retry()
        self._log("queue_retry", username=user, count=n)
        return schemas.QueueChanged(count=n)

    async def delivery_log(self, user: str | None, status: str | None, since: float | None,
                           limit: int) -> schemas.LogList:
        """Delivery attempts, newest first; ``queued`` lists recipients not yet attempted."""
        if not 1 <= limit <= schemas.LOG_LIMIT_MAX:
            raise LifecycleError(f"limit must be 1 to {schemas.LOG_LIMIT_MAX}", "bad_request")
        if status not in (None, "queued", "deferred", "delivered", "failed"):
            raise LifecycleError("status must be queued, deferred, delivered or failed",
                                 "bad_request")
        rows: list[Any]
        if status == "queued":
            rows = await self.spool.queued_entries(user, since, limit)
        else:
            rows = await self.dlog.entries(user, status, since, limit)
        return schemas.LogList(entries=[
            schemas.LogEntry(ts=r[0], message_id=format_id(r[1]), username=r[2], domain=r[3],
                             recipient=r[4], next_hop=r[5], code=r[6], text=r[7],
                             outcome=r[8]) for r in rows])

    # -- batched last-connection updates ---------------------------------------------------
    async def flush_last_connections(self) -> int:
        """Write changed last-connection times in one statement batch; return how many."""
        changed = [(a.last_connection, a.id) for a in self.directory.accounts_by_id.values()
                   if a.status != DELETED and a.last_connection != self._flushed.get(a.id)]
        if not changed:
            return 0
        await self.store.save_last_connections(changed)
        for ts, acct_id in changed:
            self._flushed[acct_id] = ts
        return len(changed)

    async def prune_delivery_log(self) -> int:
        """Delete delivery-log entries older than the retention period, then the oldest
        while the log is over its size; in small batches on the log's own connection."""
        cutoff = self.clock() - self.cfg.spool.delivery_log_retention_days * 86400
        return await self.dlog.prune(cutoff, self.cfg.spool.delivery_log_max_bytes)

    def reconfigure(self, cfg: Config) -> None:
        """A reload: operations from now on read the new settings (limits, retention...)."""
        self.cfg = cfg
