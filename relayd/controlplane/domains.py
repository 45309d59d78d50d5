"""Sending domains: add, list, show, delete, with their DKIM keys and DNS records.

Owns: the domain operations of SEMANTICS.md §2 (a new DKIM key and a never-used
selector per domain; delete disables the domain's accounts for good and destroys its
key), the DNS records shown for a domain, and filling the directory's domains (with
their signers) from the database at start. Every change is written with its audit
entries (relayd.controlplane.audit); a domain delete also records each account it
disables.

Untrusted input: domain names and confirmations from the control socket, already
decoded by control.schemas. Settings read: [dkim], [dns], [server].hostname.
See also: relayd.controlplane.changes (the order of a change), relayd.dkim.signature.
"""

from __future__ import annotations

import asyncio
import re

from control import schemas
from relayd.controlplane import audit, hooks
from relayd.controlplane.changes import LifecycleError, Shared, agree, not_found
from relayd.directory.accounts import DELETED, DISABLED, Domain
from relayd.dkim import signature as dkim
from relayd.store.directory import DkimKey, DomainExists, DomainRecord, NewDomain

_SELECTOR_TRIES = 8
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


class Domains:
    """The operator's operations on sending domains."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared

    async def load(self) -> None:
        """Fill the directory's domains from the database (at start)."""
        for rec in await self.s.store.domains():
            dom = Domain(rec.id, rec.name, rec.selector, deleted=rec.deleted,
                         check_header_from=rec.check_header_from)
            dom.signers = self.signers_of(rec)
            self.s.directory.put_domain(dom)

    def signers_of(self, rec: DomainRecord) -> list[dkim.Signer]:
        """The signers of a stored domain (none when DKIM is off or its keys are gone)."""
        return self._signers(rec.name, rec.selector, rec.private_key, rec.ed25519_selector,
                             rec.ed25519_key)

    def _signers(self, domain: str, selector: str, key: bytes | None, ed_selector: str | None,
                 ed_key: bytes | None) -> list[dkim.Signer]:
        if not self.s.cfg.dkim.enabled:
            return []
        out = []
        if key:
            out.append(dkim.Signer(domain, selector, bytes(key)))
        if ed_key and ed_selector:
            out.append(dkim.Signer(domain, ed_selector, bytes(ed_key)))
        return out

    def _dns_records(self, name: str, selector: str, pem: bytes | None,
                     ed_selector: str | None, ed_pem: bytes | None) -> list[schemas.DnsRecord]:
        recs: list[schemas.DnsRecord] = []
        cname = self.s.cfg.dns.cname_target.strip(".")
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
            value=f"v=spf1 a:{self.s.cfg.server.hostname} ~all",
            purpose="spf (hint: merge with an existing SPF record; include every relay host)",
        ))
        return recs

    def _dkim_records(self, name: str, selector: str, pem: bytes) -> list[schemas.DnsRecord]:
        return [r for r in self._dns_records(name, selector, pem, None, None)
                if r.purpose.startswith("dkim")]

    def selector_info(self, name: str, key: DkimKey) -> schemas.DkimSelector:
        """A pending (with its DNS records), retired or cancelled selector of ``name``."""
        pem = bytes(key.private_key) if key.private_key else None
        return schemas.DkimSelector(
            selector=key.selector, state=key.state, since=key.at,
            algorithm=dkim.key_algorithm(pem) if pem else "",
            dns_records=self._dkim_records(name, key.selector, pem) if pem else [])

    async def dkim_selectors(self, rec: DomainRecord) -> list[schemas.DkimSelector]:
        """A live domain's active, pending and retired selectors (rotate-key)."""
        out = [schemas.DkimSelector(selector=sel, state="active",
                                    algorithm=dkim.key_algorithm(bytes(key)),
                                    dns_records=self._dkim_records(rec.name, sel, bytes(key)))
               for sel, key in ((rec.selector, rec.private_key),
                                (rec.ed25519_selector, rec.ed25519_key)) if sel and key]
        keys = await self.s.store.dkim_keys(rec.id)
        out += [self.selector_info(rec.name, k) for k in keys if k.state == "pending"]
        out += [self.selector_info(rec.name, k) for k in reversed(keys) if k.state == "retired"]
        return out

    async def domain_add(self, name: str, reason: str = "") -> schemas.DomainInfo:
        """Create a sending domain with a new DKIM key and a never-used selector."""
        name = name.strip().lower().rstrip(".")
        reason = audit.checked_text(reason, "reason")
        if not _DOMAIN_RE.match(name):
            raise LifecycleError(f"not a valid domain name: {name!r}", "invalid_domain")
        if self.s.directory.active_domain(name) is not None:
            raise LifecycleError(f"domain already exists: {name}", "exists", 409)
        loop = asyncio.get_running_loop()
        pem = await loop.run_in_executor(None, dkim.generate_private_key, self.s.cfg.dkim.algorithm)
        ed_pem: bytes | None = None
        if self.s.cfg.dkim.dual_ed25519 and self.s.cfg.dkim.algorithm != "ed25519":
            ed_pem = await loop.run_in_executor(None, dkim.generate_private_key, "ed25519")
        now = self.s.clock()
        algorithm = self.s.cfg.dkim.algorithm

        async with self.s.lock:
            if self.s.directory.active_domain(name) is not None:
                raise LifecycleError(f"domain already exists: {name}", "exists", 409)
            # A selector is never reused, even one of a deleted domain (its record may
            # still be published): draw again on the rare collision with any stored one.
            for _ in range(_SELECTOR_TRIES):
                selector = dkim.new_selector(int(now), self.s.selector_token())
                ed_selector = dkim.new_selector(int(now), self.s.selector_token()) \
                    if ed_pem else None
                wanted = [x for x in (selector, ed_selector) if x]
                if len(set(wanted)) == len(wanted) and not await self._selector_used(wanted):
                    break
            else:
                raise LifecycleError("could not draw an unused DKIM selector", "internal", 500)

            def put(dom_id: int) -> None:
                dom = Domain(dom_id, name, selector)
                dom.signers = self._signers(name, selector, pem, ed_selector, ed_pem)
                self.s.directory.put_domain(dom)

            try:
                await agree(self.s.store.add_domain(NewDomain(
                    name, selector, algorithm, pem, ed_selector, ed_pem, now),
                    audit=audit.domain_entry(self.s, name, "added", reason, selector=selector)),
                    apply=put)
            except DomainExists:
                raise LifecycleError(f"domain already exists: {name}", "exists", 409) \
                    from None
        self.s.log("domain_added", domain=name, selector=selector)
        return schemas.DomainInfo(
            name=name, selector=selector, created_at=now,
            dns_records=self._dns_records(name, selector, pem, ed_selector, ed_pem))

    async def _selector_used(self, selectors: list[str]) -> bool:
        """True if any of ``selectors`` was ever given to a domain (deleted ones included)."""
        return await self.s.store.selectors_used(selectors)

    async def domain_info(self, name: str) -> schemas.DomainInfo:
        """One live domain with its DNS records."""
        dom = self.s.directory.active_domain(name)
        if dom is None:
            raise not_found("domain", name)
        rec = await self.s.store.domain(dom.id)
        assert rec is not None  # a domain is never removed from the table
        accounts = sum(1 for a in self.s.directory.accounts_by_id.values()
                       if a.domain is dom and a.status != DELETED)
        return schemas.DomainInfo(
            name=dom.name, selector=dom.selector, created_at=rec.created_at, accounts=accounts,
            check_header_from=dom.check_header_from, webhook_url=dom.webhook_url,
            dns_records=self._dns_records(dom.name, dom.selector, rec.private_key,
                                          rec.ed25519_selector, rec.ed25519_key),
            dkim_selectors=await self.dkim_selectors(rec))

    async def domain_list(self) -> schemas.DomainList:
        """All live domains."""
        out = []
        for r in await self.s.store.live_domains():
            n = sum(1 for a in self.s.directory.accounts_by_id.values()
                    if a.domain.id == r.id and a.status != DELETED)
            out.append(schemas.DomainInfo(name=r.name, selector=r.selector,
                                          created_at=r.created_at, accounts=n,
                                          check_header_from=r.check_header_from))
        return schemas.DomainList(domains=out)

    async def domain_set(self, name: str, settings: schemas.DomainSettings
                         ) -> schemas.DomainInfo:
        """Change a domain's settings: whether the header From is checked (SEMANTICS §2).

        Switching the check on takes a right away (memory first, undone if the write
        fails); switching it off gives one (memory after the write).
        """
        name = name.strip().lower().rstrip(".")
        reason = audit.checked_text(settings.reason, "reason")
        async with self.s.lock:
            dom = self.s.directory.active_domain(name)
            if dom is None:
                raise not_found("domain", name)
            on = settings.check_header_from
            if on is not None and on != dom.check_header_from:
                was = dom.check_header_from

                def set_on(_: object = None) -> None:
                    dom.check_header_from = on

                def undo() -> None:
                    dom.check_header_from = was

                entry = audit.domain_entry(self.s, name, "settings_changed", reason,
                                           old={"check_header_from": was},
                                           new={"check_header_from": on})
                if on:
                    set_on()
                    await agree(self.s.store.set_check_header_from(dom.id, True, audit=entry),
                                undo=undo)
                else:
                    await agree(self.s.store.set_check_header_from(dom.id, False, audit=entry),
                                apply=set_on)
                self.s.log("domain_changed", domain=name, check_header_from=on)
            secret = None
            if settings.webhook is not None or settings.rotate_webhook_secret:
                secret = await hooks.set_webhook(self.s, dom, settings.webhook,
                                                 settings.rotate_webhook_secret, reason)
        info = await self.domain_info(name)
        info.webhook_secret = secret
        return info

    async def domain_delete(self, name: str, confirm: str,
                            reason: str = "") -> schemas.DomainDeleted:
        """Delete a domain: irreversible; disables its accounts for good and destroys its key.

        ``confirm`` must be the name exactly as ``domain list`` shows it (no case
        folding, spaces or trailing dot).
        """
        name = name.strip().lower().rstrip(".")
        reason = audit.checked_text(reason, "reason")
        async with self.s.lock:
            dom = self.s.directory.active_domain(name)
            if dom is None:
                raise not_found("domain", name)
            if confirm != dom.name:
                raise LifecycleError(
                    f"confirmation does not match: type the domain name {dom.name!r} exactly"
                    " as `domain list` shows it", "confirm_mismatch")
            accts = [a for a in self.s.directory.accounts_by_id.values()
                     if a.domain is dom and a.status != DELETED]
            saved = [(a, a.status, a.disabled_reason, a.old_password_hash,
                      a.old_password_expires) for a in accts]
            signers = dom.signers
            # Memory first: from here on no session of these accounts can send.
            dom.deleted = True
            dom.signers = []
            for a in accts:
                a.status = DISABLED
                a.disabled_reason = "domain_deleted"
                a.end_old_password()
                a.invalidate()
                self.s.cache.invalidate(a.id)
            now = self.s.clock()

            def undo() -> None:
                dom.deleted = False
                dom.signers = signers
                for a, status, reason, old, expires in saved:
                    a.status, a.disabled_reason = status, reason
                    a.old_password_hash, a.old_password_expires = old, expires

            entries = audit.domain_entry(self.s, name, "deleted", reason,
                                         accounts_disabled=len(accts))
            for a in accts:
                entries += audit.account_entry(self.s, a, "disabled", reason,
                                               why="domain_deleted")
            await agree(self.s.store.delete_domain(dom.id, now, audit=entries), undo=undo)
            self.s.directory.put_domain(dom)
            self.s.directory.rebuild_networks()
            if dom.webhook_url is not None:
                await hooks.forget(self.s, dom)
        held, retrying = await self._queues_of({a.id for a in accts})
        self.s.log("domain_deleted", domain=name, accounts_disabled=len(accts),
                   messages_held=held.messages, messages_retrying=retrying.messages)
        return schemas.DomainDeleted(
            name=name, accounts_disabled=len(accts), messages_held=held.messages, held=held,
            retrying=retrying, purged=schemas.MailCount(messages=0, recipients=0))

    async def _queues_of(self, ids: set[int]) -> tuple[schemas.MailCount, schemas.MailCount]:
        """The mail of accounts ``ids`` on this node (each node has its own spool): held
        (not yet attempted, or held by the operator) and retrying (deferred: a disabled
        account's retries go on, SEMANTICS §4.1), as messages and recipients."""
        held: dict[int, int] = {m.id: len(m.rcpts) for m, _, _ in
                                self.s.scheduler.send_queue_view() if m.account_id in ids}
        retrying: dict[int, int] = {}
        for acct_id in sorted(ids):
            for sm in await self.s.spool.queued_messages(account_id=acct_id):
                if sm.held is not None:  # held by the operator: out of the send queue
                    held[sm.id] = held.get(sm.id, 0) + len(sm.recipients)
            for d in await self.s.spool.deferred_messages(acct_id):
                into = retrying if d.held is None else held
                into[d.id] = into.get(d.id, 0) + len(d.recipients)
        return (schemas.MailCount(messages=len(held), recipients=sum(held.values())),
                schemas.MailCount(messages=len(retrying), recipients=sum(retrying.values())))
