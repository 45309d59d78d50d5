"""Applying a change made anywhere in the cluster to this node: memory, cache, scheduler, spool.

Owns: turning one row of the cluster's change log into this node's state, by reading
the changed domain or account again and comparing it with memory. Whatever takes a
right away (a status that is no longer active, a new password hash, a removed
network, a deletion, the end of a kept old password) ends every session's
authentication of the account and drops its cached credentials before the node
records the change as applied — so when the
control call that made it returns (after every live node applied it), no node
accepts the old credentials or one more message of the account. What gives a right
(a new account or domain, enable, a new network, new limits, a reset that keeps the
old password: its cache entry moves to the old slot) is applied as read, as are an
account's label, a domain's header From check (on or off: no session state depends on
it), and a domain's new active DKIM key (rotate-key --activate: its signers swapped).
A deleted account's messages in this node's spool are purged here (each node's spool
is its own). A queue probe is answered with this node's count of the account's
stored messages. A change of a domain's suppression list (an entry added or removed on
any node) replaces this node's list of that domain with the stored one.

Applying is idempotent: the node that made a change has already changed its memory,
and applying it again, or a newer state of the row, changes nothing.

Untrusted input: none (rows written by relayd). See also: relayd.cluster.node (when
changes are applied), relayd.controlplane.accounts and .domains (the operations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relayd.controlplane import hooks
from relayd.controlplane.accounts import account_from
from relayd.controlplane.changes import Shared
from relayd.directory.accounts import ACTIVE, DELETED, Account, Domain
from relayd.directory.suppression import Entry
from relayd.store import removal
from relayd.store.directory import AccountRecord, DomainRecord
from relayd.store.pgdirectory import Change, PgDirectory
from relayd.store.records import ACCOUNT_DELETED


class Follower:
    """Applies the cluster's changes to this node."""

    def __init__(self, shared: Shared, store: PgDirectory,
                 signers: Callable[[DomainRecord], list[Any]]) -> None:
        self.s = shared
        self.store = store
        self._signers = signers

    async def apply(self, change: Change) -> None:
        """Apply one change-log row (the changed row as it is now)."""
        if change.kind == "domain":
            dom = await self.store.domain(change.entity_id)
            if dom is not None:
                self.domain(dom)
                await self._webhook(dom.id)
        elif change.kind == "account":
            acct = await self.store.account(change.entity_id)
            if acct is not None:
                await self.account(acct)
        elif change.kind == "suppression":
            await self.suppressions(change.entity_id)
        elif change.kind == "probe":
            count = await self.s.spool.message_count(change.entity_id)
            await self.store.answer_probe(change.version, change.entity_id, count)

    def domain(self, rec: DomainRecord) -> None:
        directory = self.s.directory
        dom = directory.domains_by_id.get(rec.id)
        if dom is None:
            dom = Domain(rec.id, rec.name, rec.selector, deleted=rec.deleted,
                         check_header_from=rec.check_header_from)
            dom.signers = self._signers(rec)
            directory.put_domain(dom)
            return
        dom.check_header_from = rec.check_header_from
        if not rec.deleted and rec.selector != dom.selector:  # a key rotation activated
            dom.selector = rec.selector
            dom.signers = self._signers(rec)
        if rec.deleted and not dom.deleted:
            dom.deleted = True
            dom.signers = []
            directory.put_domain(dom)

    async def _webhook(self, domain_id: int) -> None:
        """A domain's webhook as stored now (set, changed, rotated, removed)."""
        dom = self.s.directory.domains_by_id.get(domain_id)
        if dom is not None:
            await hooks.apply(self.s, dom, await self.store.webhook(domain_id))

    async def account(self, rec: AccountRecord) -> None:
        directory = self.s.directory
        acct = directory.accounts_by_id.get(rec.id)
        domain = directory.domains_by_id.get(rec.domain_id)
        if domain is None:  # the domain's own change comes first in the log
            return
        if acct is None:
            acct = account_from(rec, domain)
            self.s.flushed[acct.id] = acct.last_connection
            self.s.sent_base[acct.id] = acct.total_sent
            directory.put_account(acct)
            if acct.status == DELETED:
                await self._purge(acct)
            return
        was_usable, was_deleted = acct.usable, acct.status == DELETED
        hash_now, old_now = rec.password_hash or "", rec.old_password_hash or ""
        rotated = hash_now != acct.password_hash and old_now == acct.password_hash
        takes_away = (
            (was_usable and rec.status != ACTIVE) or not self._kept_passwords(acct, rec)
            or not set(acct.networks) <= set(rec.networks))
        nets_changed = set(acct.networks) != set(rec.networks)
        limits_changed = (acct.per_minute, acct.per_hour, acct.per_day) != (
            rec.per_minute, rec.per_hour, rec.per_day)
        acct.status, acct.disabled_reason = rec.status, rec.disabled_reason
        acct.password_hash = hash_now
        acct.old_password_hash, acct.old_password_expires = old_now, rec.old_password_expires
        acct.networks = list(rec.networks)
        acct.per_minute, acct.per_hour, acct.per_day = rec.per_minute, rec.per_hour, rec.per_day
        acct.label = rec.label
        if takes_away:
            acct.invalidate()
            self.s.cache.invalidate(acct.id)
            # a message whose commit is queued already was checked before this change:
            # its 250 goes before this node says it applied the change
            await self.s.spool.barrier()
        elif rotated:  # reset --keep-old: the current password's cache entry is the old one's
            self.s.cache.rotate(acct.id)
        if nets_changed or (rec.status == DELETED) != was_deleted:
            directory.rebuild_networks()
        if rec.status == DELETED and not was_deleted:
            acct.total_sent, acct.last_connection = 0, None
            await self._purge(acct)
            return
        if limits_changed:
            self.s.scheduler.set_limits(acct)
        if acct.usable and not was_usable:
            self.s.scheduler.wake()

    def _kept_passwords(self, acct: Account, rec: AccountRecord) -> bool:
        """True if every password that authenticates ``acct`` now (its current one, and
        its kept old one before its expiry on this node's clock) still does in ``rec``."""
        now = self.s.clock()
        before = {acct.password_hash,
                  acct.old_password_hash if acct.old_password_valid(now) else ""}
        old_valid = rec.old_password_expires is not None and now < rec.old_password_expires
        after = {rec.password_hash or "", (rec.old_password_hash or "") if old_valid else ""}
        return before - {""} <= after
    async def suppressions(self, domain_id: int) -> None:
        """A domain's suppression list as stored now (added to or removed from anywhere)."""
        mem = self.s.directory.suppressions
        recs = await self.store.suppressions(domain_id, self.s.clock() - mem.ttl)
        mem.replace(domain_id, [Entry(r.address, r.reason, r.since) for r in recs])

    async def resync(self) -> None:
        """Apply every domain and account as stored now (the log did not reach back far
        enough): the same comparison as for one change, for all of them."""
        for dom in await self.store.domains():
            self.domain(dom)
            await self._webhook(dom.id)
        for acct in await self.store.accounts():
            await self.account(acct)
        for domain_id in list(self.s.directory.domains_by_id):
            await self.suppressions(domain_id)

    async def purge_deleted(self) -> None:
        """At start, before the scheduler: the mail this node holds for accounts deleted
        while it was away (a delete with --purge-queue, or after `node forget`)."""
        for acct in list(self.s.directory.accounts_by_id.values()):
            if acct.status == DELETED and await self.s.spool.message_count(acct.id):
                await self._purge(acct)

    async def _purge(self, acct: Account) -> None:
        """A deleted account's mail in this node's spool: gone, like the account."""
        purged = await removal.purge(self.s.spool, acct.id, reason=ACCOUNT_DELETED)
        dropped = self.s.scheduler.drop_account(acct.id)
        self.s.scheduler.forget(acct.id, dropped + purged)
        if purged:
            self.s.log("deleted_account_mail_purged", username=acct.username,
                       purged=len(purged))

