"""DKIM key rotation of a sending domain: a pending key, its activation, its cancellation.

Owns: ``relayctl domain rotate-key`` (SEMANTICS.md §2): a new key for each algorithm the
domain signs with (its main key and, where present, its Ed25519 key), each with a
never-used selector, stored pending while the active key keeps signing; ``--activate``
makes the pending key(s) sign from then on (memory after the write: the domain's signers
are swapped before the call returns, on every node in cluster mode through
relayd.controlplane.follow) and retires the old selectors; ``--cancel`` drops the pending
key(s). A selector is never drawn again, pending, retired or cancelled.

Untrusted input: domain names from the control socket, already decoded by control.schemas.
Settings read: none here (the signers and DNS records: relayd.controlplane.domains).
See also: relayd.store.directory (``dkim_selectors``), relayd.dkim.signing (mail is signed
at acceptance, so mail queued before an activation keeps the old selector's signature).
"""

from __future__ import annotations

import asyncio

from control import schemas
from relayd.controlplane import audit
from relayd.controlplane.changes import LifecycleError, Shared, agree, not_found
from relayd.controlplane.domains import Domains
from relayd.directory.accounts import Domain
from relayd.dkim import signature as dkim
from relayd.store.directory import DkimKey, KeyPending, NoPendingKey

_SELECTOR_TRIES = 8


def _pending_error(name: str, selectors: list[str]) -> LifecycleError:
    return LifecycleError(
        f"a key rotation is pending for {name} already (selector {', '.join(selectors)}):"
        " activate it with `domain rotate-key --activate` or drop it with --cancel",
        "key_pending", 409)


def _no_pending(name: str) -> LifecycleError:
    return LifecycleError(f"no pending key for {name}: run `domain rotate-key {name}` first",
                          "no_pending_key", 409)


class DkimKeys:
    """The operator's DKIM key rotation of a live domain."""

    def __init__(self, shared: Shared, domains: Domains) -> None:
        self.s = shared
        self.d = domains

    def _live(self, name: str) -> Domain:
        dom = self.s.directory.active_domain(name.strip().lower().rstrip("."))
        if dom is None:
            raise not_found("domain", name)
        return dom

    async def rotate(self, name: str, reason: str = "") -> schemas.KeyRotation:
        """New pending key(s) with never-used selectors; the active key keeps signing."""
        reason = audit.checked_text(reason, "reason")
        dom = self._live(name)
        pending = [k.selector for k in await self.s.store.dkim_keys(dom.id)
                   if k.state == "pending"]
        if pending:
            raise _pending_error(dom.name, pending)
        rec = await self.s.store.domain(dom.id)
        if rec is None or rec.private_key is None:
            raise LifecycleError(f"domain {dom.name} has no DKIM key", "internal", 500)
        slots = [("main", dkim.key_algorithm(bytes(rec.private_key)))]
        if rec.ed25519_selector and rec.ed25519_key:
            slots.append(("ed25519", "ed25519"))
        loop = asyncio.get_running_loop()
        pems = [await loop.run_in_executor(None, dkim.generate_private_key, alg)
                for _, alg in slots]
        async with self.s.lock:
            dom = self._live(name)
            now = self.s.clock()
            selectors = await self._draw(now, len(slots))
            keys = [DkimKey(sel, slot, "pending", pem, now)
                    for sel, (slot, _), pem in zip(selectors, slots, pems, strict=True)]
            try:
                await agree(self.s.store.add_pending_keys(dom.id, keys, audit=audit.domain_entry(
                    self.s, dom.name, "key_created", reason, selectors=selectors)))
            except KeyPending as exc:
                raise _pending_error(dom.name, exc.selectors) from None
        self.s.log("dkim_key_created", domain=dom.name, selectors=selectors)
        return schemas.KeyRotation(name=dom.name, action="created",
                                   selectors=[self.d.selector_info(dom.name, k) for k in keys])

    async def _draw(self, now: float, n: int) -> list[str]:
        """``n`` distinct selectors never given to any domain (deleted ones included)."""
        for _ in range(_SELECTOR_TRIES):
            wanted = [dkim.new_selector(int(now), self.s.selector_token()) for _ in range(n)]
            if len(set(wanted)) == n and not await self.s.store.selectors_used(wanted):
                return wanted
        raise LifecycleError("could not draw an unused DKIM selector", "internal", 500)

    async def activate(self, name: str, reason: str = "") -> schemas.KeyRotation:
        """The pending key(s) sign from now on; the old selector(s) are retired."""
        reason = audit.checked_text(reason, "reason")
        async with self.s.lock:
            dom = self._live(name)
            try:
                retired = await agree(self.s.store.activate_keys(
                    dom.id, self.s.clock(), audit=audit.domain_entry(
                        self.s, dom.name, "key_activated", reason)))
            except NoPendingKey:
                raise _no_pending(dom.name) from None
            # memory after the write (it gives the new key the right to sign)
            rec = await self.s.store.domain(dom.id)
            assert rec is not None
            dom.selector = rec.selector
            dom.signers = self.d.signers_of(rec)
        self.s.log("dkim_key_activated", domain=dom.name, selector=rec.selector,
                   retired=[k.selector for k in retired])
        active = [x for x in await self.d.dkim_selectors(rec) if x.state == "active"]
        return schemas.KeyRotation(
            name=dom.name, action="activated", selectors=active,
            retired=[self.d.selector_info(dom.name, k) for k in retired])

    async def cancel(self, name: str, reason: str = "") -> schemas.KeyRotation:
        """Drop the pending key(s); their selectors are never drawn again."""
        reason = audit.checked_text(reason, "reason")
        async with self.s.lock:
            dom = self._live(name)
            try:
                dropped = await agree(self.s.store.cancel_keys(
                    dom.id, self.s.clock(), audit=audit.domain_entry(
                        self.s, dom.name, "key_cancelled", reason)))
            except NoPendingKey:
                raise _no_pending(dom.name) from None
        self.s.log("dkim_key_cancelled", domain=dom.name,
                   selectors=[k.selector for k in dropped])
        return schemas.KeyRotation(name=dom.name, action="cancelled",
                                   selectors=[self.d.selector_info(dom.name, k)
                                              for k in dropped])
