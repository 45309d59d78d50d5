"""The suppression list's operations: list, add, remove, and storing what delivery learnt.

Owns: keeping the in-memory suppression list (relayd.directory.suppression) and the
directory tables in agreement — filling memory at start (and after a change made on
another node: ``reload_domain``), the operator's ``suppression list|add|remove``, and the
background write of an entry the dispatcher added after a permanent failure.

That write never holds up delivery: entries learnt meanwhile are coalesced per domain and
written by one task, after the attempt. If the write fails (the cluster database or the
spool unusable), the failure is logged (``suppression_not_stored``) and not retried: the
entry still applies on this node until it restarts, and the next permanent failure of the
address adds it again. Removing gives the right to send back (database first, then
memory); adding takes it away (memory first, undone if the write fails).

Untrusted input: domain names and addresses from the control socket (decoded by
control.schemas; an address must be ``local@domain`` without spaces or controls).
Settings read: [delivery] suppression_days.
See also: relayd.queue.dispatch (checks and learns), relayd.controlplane.follow.
"""

from __future__ import annotations

import asyncio

from control import schemas
from relayd.controlplane.changes import LifecycleError, Shared, agree, not_found
from relayd.directory.accounts import Domain
from relayd.directory.suppression import DAY, Entry, key
from relayd.store.directory import SuppressionRecord


def _valid(address: str) -> str:
    """``address`` in its stored form, or LifecycleError 400."""
    a = address.strip()
    local, at, domain = a.rpartition("@")
    if not at or not local or not domain or len(a) > 320 or \
            any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in a) or a.startswith("<"):
        raise LifecycleError(f"not an address: {address!r}", "invalid_address")
    return key(a)


class SuppressionLists:
    """The operator's operations on suppression lists, and their storage."""

    def __init__(self, shared: Shared) -> None:
        self.s = shared
        self._pending: dict[int, dict[str, Entry]] = {}
        self._writer: asyncio.Task[None] | None = None

    @property
    def ttl(self) -> float:
        return self.s.cfg.delivery.suppression_days * DAY

    async def load(self) -> None:
        """Fill memory from the database (at start) and take the learnt entries' writes."""
        mem = self.s.directory.suppressions
        mem.ttl = self.ttl
        mem.on_learn = self._learnt
        by_domain: dict[int, list[Entry]] = {}
        for r in await self.s.store.suppressions(None, self.s.clock() - self.ttl):
            by_domain.setdefault(r.domain_id, []).append(Entry(r.address, r.reason, r.since))
        for domain_id, entries in by_domain.items():
            mem.replace(domain_id, entries)

    async def reload_domain(self, domain_id: int) -> None:
        """A domain's list as stored now (a change made on another node)."""
        recs = await self.s.store.suppressions(domain_id, self.s.clock() - self.ttl)
        self.s.directory.suppressions.replace(
            domain_id, [Entry(r.address, r.reason, r.since) for r in recs])

    # -- entries the dispatcher learnt: written in the background ----------------------
    def _learnt(self, domain_id: int, entry: Entry) -> None:
        self._pending.setdefault(domain_id, {})[entry.address] = entry
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_learnt())

    async def _write_learnt(self) -> None:
        while self._pending:
            domain_id, entries = self._pending.popitem()
            dom = self.s.directory.domains_by_id.get(domain_id)
            name = dom.name if dom is not None else str(domain_id)
            recs = [SuppressionRecord(domain_id, e.address, e.reason, e.since)
                    for e in entries.values()]
            try:
                await self.s.store.add_suppressions(domain_id, recs,
                                                    self.s.clock() - self.ttl)
            except Exception as exc:  # logged, not retried: see the module's docstring
                self.s.warn("suppression_not_stored", domain=name, count=len(recs),
                            error=f"{type(exc).__name__}: {exc}")
                continue
            for r in recs:
                self.s.log("recipient_suppressed", domain=name, recipient=r.address,
                           reason=r.reason)

    async def stop(self) -> None:
        """Let the background write finish (at shutdown, before the spool closes)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    # -- the operator's operations -------------------------------------------------------
    def _domain(self, name: str) -> Domain:
        dom = self.s.directory.active_domain(name.strip().rstrip("."))
        if dom is None:
            raise not_found("domain", name)
        return dom

    async def suppression_list(self, name: str, limit: int = 100) -> schemas.SuppressionList:
        """The domain's entries as stored (every node's), newest first."""
        dom = self._domain(name)
        recs = await self.s.store.suppressions(dom.id, self.s.clock() - self.ttl)
        recs.sort(key=lambda r: (-r.since, r.address))
        return schemas.SuppressionList(domain=dom.name, total=len(recs), entries=[
            schemas.SuppressionEntry(address=r.address, reason=r.reason, since=r.since,
                                     expires=r.since + self.ttl) for r in recs[:limit]])

    async def suppression_add(self, name: str, req: schemas.SuppressionAdd
                              ) -> schemas.SuppressionChanged:
        """Suppress addresses for a domain (memory first: it takes a right away)."""
        dom = self._domain(name)
        if not self.ttl:
            raise LifecycleError("the suppression list is off ([delivery] suppression_days"
                                 " = 0)", "suppression_off", 409)
        addresses = sorted({_valid(a) for a in req.addresses})
        now = self.s.clock()
        entries = [Entry(a, req.reason, now) for a in addresses]
        mem = self.s.directory.suppressions
        async with self.s.lock:
            before = {e.address: mem.find(dom.id, e.address, now) for e in entries}
            for e in entries:
                mem.put(dom.id, e)

            def undo() -> None:
                for e in entries:
                    old = before[e.address]
                    if old is None:
                        mem.remove(dom.id, e.address)
                    else:
                        mem.put(dom.id, old)

            await agree(self.s.store.add_suppressions(
                dom.id, [SuppressionRecord(dom.id, e.address, e.reason, e.since)
                         for e in entries], now - self.ttl), undo=undo)
        self.s.log("suppression_added", domain=dom.name, count=len(entries))
        return schemas.SuppressionChanged(domain=dom.name, count=len(entries))

    async def suppression_remove(self, name: str, address: str) -> schemas.SuppressionChanged:
        """Send to ``address`` again (database first: it gives a right back)."""
        dom = self._domain(name)
        addr = _valid(address)
        async with self.s.lock:
            stored = await agree(self.s.store.remove_suppression(dom.id, addr))
            in_memory = self.s.directory.suppressions.remove(dom.id, addr)
        if not (stored or in_memory):
            raise LifecycleError(f"not suppressed for {dom.name}: {addr}", "not_found", 404)
        self.s.log("suppression_removed", domain=dom.name, recipient=addr)
        return schemas.SuppressionChanged(domain=dom.name, count=1)
