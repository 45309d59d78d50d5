"""Reconciliation of memory with the database, after failed commits and periodically.

Owns: putting back in the send queue the messages the database holds with a
recipient never attempted that memory (the dispatcher's ``Ledger``) does not
hold, and releasing the retry leases of retries whose results were lost. The
database is the truth; memory only mirrors it. When a commit fails (disk
full), the message is forgotten in memory and the database still has it
where it was (never attempted, or due again when its retry lease is
released). Then, and every ``reconcile_seconds`` anyway, ``reconcile`` runs.
After a failed commit it first shows with one small write that the spool can
be written again (retried with a delay that doubles up to
``reconcile_seconds``), so a full disk does not repeat deliveries in a loop.

Cost: one indexed read of the ids in the spool's writer transaction (after a
failed commit, with one small write first); the rows only of the few messages found.
Untrusted input: none.
Settings read: [spool] reconcile_seconds (passed in).
See also: relayd.queue.scheduler (wiring), relayd.queue.dispatch (the ledger),
relayd.store.spool (``reconcile_ids``, ``queued_messages``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from relayd.queue.dispatch import Ledger, SchedulerEvents
from relayd.queue.sendqueue import QMsg, SendQueue
from relayd.store.spool import Spool

FIRST_RECONCILE_DELAY = 1.0  # after a failed commit; doubles up to reconcile_seconds


class Reconciler:
    """Finds what memory lost and puts it back; paces itself after failed commits."""

    def __init__(self, spool: Spool, ledger: Ledger, queue: SendQueue, *,
                 reconcile_seconds: float, clock: Callable[[], float],
                 events: SchedulerEvents | None, on_found: Callable[[], None],
                 on_released: Callable[[], None]) -> None:
        self.spool = spool
        self.ledger = ledger
        self.queue = queue
        self.reconcile_seconds = reconcile_seconds
        self.clock = clock
        self.events = events
        self.on_found = on_found  # messages were put back in the send queue
        self.on_released = on_released  # retry leases were released
        self.stopping = False
        self.probe = False  # a commit failed: show the spool is writable before pushing
        self._now = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._delay = 0.0  # after failed commits: the next delay, growing
        self._failing = False  # a failure since the last reconciliation began

    def committed(self) -> None:
        """A result commit succeeded: the next failure starts from the first delay."""
        self._delay = 0.0

    def commit_failed(self) -> None:
        """A commit failed (also ``Spool.on_commit_failed``): reconcile once the spool is
        writable again, after a delay that doubles (up to ``reconcile_seconds``) with
        each round of failures until a result commit succeeds."""
        self.probe = True
        if not self._failing:
            self._failing = True
            self._delay = min(max(FIRST_RECONCILE_DELAY, 2 * self._delay),
                              self.reconcile_seconds)
        self.soon(self._delay)

    def soon(self, delay: float = 0.0) -> None:
        """Reconcile with the database within ``delay`` seconds (or sooner)."""
        if self.stopping:
            return
        if delay <= 0:
            self._now.set()
            return
        loop = asyncio.get_running_loop()
        timer = self._timer
        if timer is not None and not timer.cancelled() and timer.when() <= loop.time() + delay:
            return
        if timer is not None:
            timer.cancel()
        self._timer = loop.call_later(delay, self._now.set)

    def stop(self) -> None:
        """No more reconciliations (the loop task is cancelled by its owner)."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()

    async def reconcile(self) -> int:
        """Put back in the send queue the messages the database holds with a recipient
        never attempted that memory does not hold; release the leases of retries whose
        results were lost. Return how many messages were put back (and report them).
        Raises if the spool cannot be read (or written, to probe)."""
        self._failing = False
        led = self.ledger
        release = [m for m in led.unleased if m not in led.retrying]
        probe = self.probe
        ids = await self.spool.reconcile_ids(release, self.clock(), probe)
        led.unleased.difference_update(release)
        if probe:
            self.probe = False
        if release:
            self.on_released()
        unknown = [m for m in ids if not led.holds(m) and m not in led.held]
        if not unknown or self.stopping:
            return 0
        found = 0
        for sm in await self.spool.queued_messages(unknown):
            if led.holds(sm.id) or not sm.recipients or self.stopping:
                continue  # taken up meanwhile
            rcpts = {r.idx: (r.rcpt, r.attempts) for r in sm.recipients}
            # retry=True: the results update and check the rows (other recipients of
            # the message may be in another state), never a blind delete. For the
            # ledger it is a first attempt (owned): it comes from the send queue.
            led.live.setdefault(sm.account_id, set()).add(sm.id)
            led.owned.add(sm.id)
            self.queue.push(QMsg(sm.id, sm.account_id, sm.username, sm.domain, sm.sender,
                                 sm.received_at, rcpts, sm.is_bounce, retry=True, size=sm.size))
            found += 1
        if found:
            self.on_found()
            if self.events is not None:
                self.events.reconciled(found)
        return found

    async def loop(self) -> None:
        """Reconcile every ``reconcile_seconds``, and when asked (``soon``)."""
        while True:
            try:
                await asyncio.wait_for(self._now.wait(), self.reconcile_seconds)
            except TimeoutError:
                pass
            self._now.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # the spool cannot be read or written yet: try again later
                self.commit_failed()
