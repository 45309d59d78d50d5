"""SMTP accounts: add, list, show, disable, enable, delete, limits, networks, label,
dormant (passwords: relayd.controlplane.passwords).

Owns: the account operations of SEMANTICS.md §3-§4, each returning only when the
database, the directory, the credential cache and the scheduler agree (so
"immediately" is exact: when a disable returns, no AUTH with old credentials succeeds
and no session of the account can start or finish a message); the rules a network
must pass to be bound (through accounts.parse_binding, and no overlap, checked in the
write transaction); filling the directory's accounts from the database at start.
Every change is written with its audit entry (relayd.controlplane.audit), in its
transaction; a call that changes nothing (disable a disabled account) writes none.

Untrusted input: usernames, CIDRs and numbers from the control socket, already decoded
by control.schemas. Settings read: [limits].
See also: relayd.controlplane.changes (the order of a change), relayd.directory.accounts,
relayd.directory.credentials, relayd.store.directory.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
from collections.abc import Callable

from control import schemas
from relayd.controlplane import audit
from relayd.controlplane.changes import LifecycleError, Shared, agree, not_found
from relayd.controlplane.stats import refresh_stats
from relayd.directory.accounts import (
    ACTIVE,
    DELETED,
    DISABLED,
    Account,
    BindingRefused,
    Domain,
    binding_problems,
    overlapping,
    parse_binding,
)
from relayd.store import removal
from relayd.store.directory import (
    AccountRecord,
    NetworkBinding,
    NewAccount,
    PlanFull,
    QueueNotEmpty,
)
from relayd.store.records import ACCOUNT_DELETED


def _queue_not_empty(username: str, queued: int) -> LifecycleError:
    return LifecycleError(
        f"{username} still has {queued} queued message(s) (send, held or retry queue);"
        " wait for delivery or delete with --purge-queue", "queue_not_empty", 409)


def account_from(rec: AccountRecord, domain: Domain) -> Account:
    """The in-memory account of a stored row."""
    return Account(
        id=rec.id, username=rec.username, domain=domain, password_hash=rec.password_hash or "",
        status=rec.status, disabled_reason=rec.disabled_reason, created_at=rec.created_at,
        last_connection=rec.last_connection, total_sent=rec.total_sent,
        networks=list(rec.networks), per_minute=rec.per_minute, per_hour=rec.per_hour,
        per_day=rec.per_day, old_password_hash=rec.old_password_hash or "",
        old_password_expires=rec.old_password_expires, label=rec.label)


def _plan_full(used: int, cap: int) -> LifecycleError:
    return LifecycleError(
        f"plan limit reached: {used} of {cap} account slots in use (active and"
        " disabled accounts occupy a slot; delete an account to free one)",
        "plan_limit", 409)


def new_password() -> str:
    """A strong random password (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def new_username(domain: str) -> str:
    """A fresh username: a short label from the domain and 12 random base32 characters."""
    label = re.sub(r"[^a-z0-9]", "", domain.split(".")[0])[:12] or "smtp"
    token = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:12]
    return f"{label}-{token}"


def refuse_overlap(others: list[NetworkBinding], nets: list[str], field: str) -> None:
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


class Accounts:
    """The operator's operations on SMTP accounts."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared

    async def load(self) -> None:
        """Fill the directory's accounts from the database (at start; domains first)."""
        d = self.s.directory
        for row in await self.s.store.accounts():
            acct = account_from(row, d.domains_by_id[row.domain_id])
            d.accounts_by_name[acct.username] = acct
            d.accounts_by_id[acct.id] = acct
            self.s.flushed[acct.id] = acct.last_connection
            self.s.sent_base[acct.id] = acct.total_sent
        d.rebuild_networks()
        self._warn_bindings()

    def _warn_bindings(self) -> None:
        """Log ``legacy_network_binding`` for each stored binding that an older
        version accepted and today's rules refuse; it stays in effect (never changed
        behind the operator's back) until ``user networks remove``."""
        lim = self.s.cfg.limits
        bindings = [(cidr, a.username) for a in self.s.directory.accounts_by_id.values()
                    if a.status != DELETED for cidr in a.networks]
        for owner, cidr, why in binding_problems(bindings, lim.max_network_prefix_v4,
                                                 lim.max_network_prefix_v6):
            self.s.warn("legacy_network_binding", username=owner, cidr=cidr,
                        problem=why, fix=f"relayctl user networks remove {owner} {cidr}")

    def info(self, acct: Account) -> schemas.UserInfo:
        """The operator's view of an account."""
        return schemas.UserInfo(
            username=acct.username, domain=acct.domain.name, status=acct.status,
            disabled_reason=acct.disabled_reason, created_at=acct.created_at,
            last_connection=acct.last_connection, total_sent=acct.total_sent,
            queued=self.s.scheduler.queued_count(acct.id), networks=list(acct.networks),
            limits=schemas.Limits(per_minute=acct.per_minute, per_hour=acct.per_hour,
                                  per_day=acct.per_day),
            old_password_expires=(acct.old_password_expires
                                  if acct.old_password_valid(self.s.clock()) else None),
            label=acct.label)

    def _check_bindings(self, cidrs: list[str], field: str) -> list[str]:
        """The networks to bind, normalised and without repeats; LifecycleError naming
        ``field`` for one that may not be bound (accounts.parse_binding)."""
        lim = self.s.cfg.limits
        out: list[str] = []
        for c in cidrs:
            try:
                net = str(parse_binding(c, lim.max_network_prefix_v4, lim.max_network_prefix_v6))
            except BindingRefused as exc:
                raise LifecycleError(f"{field}: {exc}", exc.code) from None
            if net not in out:
                out.append(net)
        return out

    async def user_add(self, domain: str, networks: list[str], label: str = "",
                       reason: str = "") -> schemas.Credentials:
        """Create an account with a generated username and password (shown once)."""
        dom = self.s.directory.active_domain(domain.strip().lower().rstrip("."))
        if dom is None:
            raise not_found("domain", domain)
        nets = self._check_bindings(networks, "allow_networks")
        label = audit.checked_text(label, "label")
        password = new_password()
        hashed = await self.s.hasher.hash(password)
        now = self.s.clock()
        async with self.s.lock:
            used = self.s.directory.count_slots()
            cap = self.s.cfg.limits.max_accounts
            if used >= cap:
                raise _plan_full(used, cap)
            for _ in range(5):  # deleted accounts stay in the directory: never reused
                username = new_username(dom.name)
                if self.s.directory.account(username) is None:
                    break
            else:
                raise LifecycleError("could not draw an unused username", "internal", 500)

            def put(acct_id: int) -> None:
                acct = Account(id=acct_id, username=username, domain=dom, password_hash=hashed,
                               created_at=now, networks=nets, label=label)
                self.s.flushed[acct_id] = None
                self.s.sent_base[acct_id] = 0
                self.s.directory.put_account(acct)

            try:  # counted again in the write: another node may have added one
                await agree(self.s.store.add_account(
                    NewAccount(username, dom.id, hashed, now, nets, label),
                    lambda others: refuse_overlap(others, nets, "allow_networks"), cap,
                    audit=audit.entry(self.s, "account", username, "created", reason,
                                      domain=dom.name, networks=nets, label=label)),
                    apply=put)
            except PlanFull as exc:
                raise _plan_full(exc.used, cap) from None
        self.s.log("user_added", username=username, domain=dom.name, networks=nets)
        return schemas.Credentials(username=username, password=password)

    async def user_show(self, username: str) -> schemas.UserInfo:
        """One account."""
        await refresh_stats(self.s)
        return self.info(self.s.account(username))

    async def user_list(self, domain: str | None = None, status: str | None = None,
                        sort: str = "name") -> schemas.UserList:
        """Accounts (not deleted), filtered and sorted."""
        await refresh_stats(self.s)
        accts = [a for a in self.s.directory.accounts_by_id.values() if a.status != DELETED]
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
        await refresh_stats(self.s)
        cutoff = self.s.clock() - days * 86400
        accts = [a for a in self.s.directory.accounts_by_id.values() if a.status != DELETED
                 and (a.last_connection is None or a.last_connection < cutoff)
                 and (max_sent is None or a.total_sent <= max_sent)]
        accts.sort(key=lambda a: (a.last_connection is not None, a.last_connection or 0.0,
                                  a.created_at))
        return schemas.UserList(users=[self.info(a) for a in accts])

    async def user_disable(self, username: str, reason: str = "") -> schemas.UserInfo:
        """Disable: every AUTH fails and no session can send, at once; mail is held."""
        entry = audit.checked_text(reason, "reason")
        async with self.s.lock:
            acct = self.s.account(username)
            if acct.status == DISABLED:
                return self.info(acct)
            acct.status, acct.disabled_reason = DISABLED, "manual"
            kept = (acct.old_password_hash, acct.old_password_expires)
            acct.end_old_password()  # an enable never brings it back
            acct.invalidate()
            self.s.cache.invalidate(acct.id)

            def undo() -> None:
                acct.status, acct.disabled_reason = ACTIVE, ""
                acct.old_password_hash, acct.old_password_expires = kept

            await agree(self.s.store.set_status(
                acct.id, DISABLED, "manual",
                audit=audit.account_entry(self.s, acct, "disabled", entry)), undo=undo)
        self.s.log("user_disabled", username=username)
        return self.info(acct)

    async def user_enable(self, username: str, reason: str = "") -> schemas.UserInfo:
        """Enable: the same password works again at once; held mail is dispatched."""
        entry = audit.checked_text(reason, "reason")
        async with self.s.lock:
            acct = self.s.account(username)
            if acct.disabled_reason == "domain_deleted":
                raise LifecycleError(
                    f"{username} belongs to a deleted domain and can never be enabled again",
                    "domain_deleted", 409)
            if acct.status == ACTIVE:
                return self.info(acct)

            def enable(_: None) -> None:
                acct.status, acct.disabled_reason = ACTIVE, ""

            await agree(self.s.store.set_status(
                acct.id, ACTIVE, "", audit=audit.account_entry(self.s, acct, "enabled", entry)),
                apply=enable)
        self.s.scheduler.wake()
        self.s.log("user_enabled", username=username)
        return self.info(acct)

    async def user_delete(self, username: str, confirm: str,
                          purge_queue: bool, reason: str = "") -> schemas.UserDeleted:
        """Delete: credentials destroyed for good, slot freed, stats removed, log and audit
        trail kept."""
        entry = audit.checked_text(reason, "reason")
        if confirm != username:
            raise LifecycleError(
                f"confirmation does not match: type the username {username!r} again",
                "confirm_mismatch")
        async with self.s.lock:
            acct = self.s.account(username)
            counts = await self._queued_everywhere(acct, purge_queue)
            saved = (acct.status, acct.disabled_reason, acct.password_hash)
            kept = (acct.old_password_hash, acct.old_password_expires)
            acct.status = DELETED
            acct.password_hash = ""
            acct.end_old_password()
            acct.invalidate()
            self.s.cache.invalidate(acct.id)
            self.s.directory.rebuild_networks()
            now = self.s.clock()

            def undo() -> None:
                acct.status, acct.disabled_reason, acct.password_hash = saved
                acct.old_password_hash, acct.old_password_expires = kept
                self.s.directory.rebuild_networks()

            try:
                # without purge_queue, a message committed after the check above is
                # still refused (the store counts again in the transaction)
                purged_ids = await agree(self.s.store.delete_account(
                    acct.id, now, purge_queue, audit=audit.account_entry(
                        self.s, acct, "deleted", entry, purge_queue=purge_queue)), undo=undo)
            except QueueNotEmpty as exc:
                raise _queue_not_empty(username, exc.count) from None
            if self.s.cluster is not None:  # this node's spool; each node purges its own
                purged_ids = await removal.purge(self.s.spool, acct.id, reason=ACCOUNT_DELETED)
            # Everything the account had queued is gone from the database: forget it
            # (until now the scheduler held it, as for any account that is not usable;
            # a retry already handed to a worker finds its message purged and stops).
            dropped = self.s.scheduler.drop_account(acct.id)
            self.s.scheduler.forget(acct.id, dropped + purged_ids)
            purged = len(purged_ids) if counts is None else sum(counts.values())
            acct.total_sent = 0
            acct.last_connection = None
            acct.networks = []
        self.s.log("user_deleted", username=username, purged=purged)
        return schemas.UserDeleted(username=username, purged=purged)

    async def user_delete_check(self, username: str, purge_queue: bool) -> schemas.UserDeleted:
        """A delete's dry run (``relayctl`` asks it before prompting for the name): refused
        as the delete would be while the account has queued mail (per node in cluster
        mode), else what the delete would purge. Changes nothing."""
        acct = self.s.account(username)
        counts = await self._queued_everywhere(acct, purge_queue)
        would = await self.s.spool.message_count(acct.id) if counts is None \
            else sum(counts.values())
        return schemas.UserDeleted(username=username, purged=would if purge_queue else 0,
                                   dry_run=True)

    async def _queued_everywhere(self, acct: Account,
                                 purge_queue: bool) -> dict[str, int] | None:
        """Refuse a delete without ``purge_queue`` while the account has stored mail: in
        this node's spool, or (cluster mode) in any node's — each live node counts its
        own, and a node that is gone may hold some. The per-node counts (cluster mode)."""
        if self.s.cluster is None:
            queued = await self.s.spool.message_count(acct.id)
            if queued and not purge_queue:
                raise _queue_not_empty(acct.username, queued)
            return None
        counts, gone = await self.s.cluster.queued_everywhere(acct.id)
        if purge_queue:
            return dict(counts)
        held = {node: n for node, n in sorted(counts.items()) if n}
        if held:
            where = ", ".join(f"{n} on {node}" for node, n in held.items())
            raise LifecycleError(
                f"{acct.username} still has {sum(held.values())} queued message(s) ({where});"
                " wait for delivery or delete with --purge-queue", "queue_not_empty", 409)
        if gone:
            raise LifecycleError(
                f"node(s) {', '.join(gone)} cannot be reached and may hold mail of"
                f" {acct.username}: start them again, or `relayctl node forget NAME`, or"
                " delete with --purge-queue (they purge it when they come back)",
                "node_unreachable", 409)
        return dict(counts)

    async def user_limits(self, username: str, limits: schemas.UserLimits) -> schemas.UserInfo:
        """Set sending limits (0 = unlimited, omitted = workspace default)."""
        for v in (limits.per_minute, limits.per_hour, limits.per_day):
            if v is not None and v < 0:
                raise LifecycleError("limits must be >= 0", "bad_request")
        reason = audit.checked_text(limits.reason, "reason")
        async with self.s.lock:
            acct = self.s.account(username)
            old = {"per_minute": acct.per_minute, "per_hour": acct.per_hour,
                   "per_day": acct.per_day}
            new = {"per_minute": limits.per_minute, "per_hour": limits.per_hour,
                   "per_day": limits.per_day}

            def set_limits(_: None) -> None:
                acct.per_minute, acct.per_hour, acct.per_day = (
                    limits.per_minute, limits.per_hour, limits.per_day)

            await agree(self.s.store.set_limits(
                acct.id, limits.per_minute, limits.per_hour, limits.per_day,
                audit=audit.account_entry(self.s, acct, "limits_changed", reason, old=old,
                                          new=new)), apply=set_limits)
        self.s.scheduler.set_limits(acct)
        self.s.log("user_limits", username=username, per_minute=limits.per_minute,
                  per_hour=limits.per_hour, per_day=limits.per_day)
        return self.info(acct)

    async def user_networks(self, username: str, change: schemas.NetworkChange) -> \
            schemas.UserInfo:
        """Bind or unbind a source network; effective at once.

        A network to bind must pass accounts.parse_binding and overlap no other
        account's (checked in the transaction that stores it); one to unbind is
        taken as stored, whatever rules applied when it was bound.
        """
        reason = audit.checked_text(change.reason, "reason")
        if change.action == "add":
            (cidr,) = self._check_bindings([change.cidr], "cidr")
        else:  # what is stored, whatever rules applied when it was bound
            try:
                cidr = str(ipaddress.ip_network(change.cidr.strip(), strict=False))
            except ValueError:
                raise LifecycleError(f"cidr: not a valid network: {change.cidr!r}",
                                     "invalid_network") from None
        async with self.s.lock:
            acct = self.s.account(username)
            entry = audit.account_entry(self.s, acct, "networks_changed", reason,
                                        change=change.action, cidr=cidr)
            if change.action == "add":
                if cidr in acct.networks:
                    return self.info(acct)

                def bind(_: None) -> None:
                    acct.networks = [*acct.networks, cidr]

                await agree(self.s.store.add_network(
                    acct.id, cidr, lambda others: refuse_overlap(others, [cidr], "cidr"),
                    audit=entry), apply=bind)
            else:
                if cidr not in acct.networks:
                    raise not_found("network binding", cidr)
                acct.networks = [n for n in acct.networks if n != cidr]
                acct.invalidate()  # sessions attributed through it lose it now

                def unbind_undone() -> None:
                    acct.networks = [*acct.networks, cidr]

                await agree(self.s.store.remove_network(acct.id, cidr, audit=entry),
                            undo=unbind_undone)
            self.s.directory.rebuild_networks()
        self.s.log("user_networks", username=username, action=change.action, cidr=cidr)
        return self.info(acct)


class AccountLabels:
    """The operator's label of an account (free text: which application uses it)."""

    def __init__(self, shared: Shared, info: Callable[[Account], schemas.UserInfo]) -> None:
        self.s = shared
        self.info = info

    async def user_label(self, username: str, change: schemas.UserLabel) -> schemas.UserInfo:
        """Set (or, with "", clear) an account's label; audited like every change."""
        label = audit.checked_text(change.label, "label")
        reason = audit.checked_text(change.reason, "reason")
        async with self.s.lock:
            acct = self.s.account(username)
            if label == acct.label:
                return self.info(acct)
            old = acct.label

            def set_label(_: None) -> None:
                acct.label = label

            await agree(self.s.store.set_label(acct.id, label, audit=audit.account_entry(
                self.s, acct, "label_changed", reason, old=old, new=label)), apply=set_label)
        self.s.log("user_label", username=username, label=label)
        return self.info(acct)
