"""Leasing sending-limit quota from the cluster database, off the hot path.

Owns: the task that answers the send queue's requests for quota (relayd.queue.quota):
it takes the requests, leases units from PostgreSQL one account at a time
(``PgDirectory.lease``: one transaction, never more than a window's limit across every
node), gives the answer to the ledger and wakes the dispatch loop. Neither SMTP
acceptance nor the dispatch loop ever waits for it: an account without units simply
waits (``waiting_limit`` once a window is known used up). A lease that fails (the
database unreachable, or refusing) gives no units; the account asks again on a later
pass, at most once a second while it fails. Now and then (every ``PRUNE_SECONDS``) the
rows of windows that ended more than an hour ago are deleted.

Untrusted input: none. Settings read: none.
See also: relayd.queue.quota (the ledger), relayd.store.pgdirectory (the table),
relayd.queue.sendqueue (where a request comes from).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from relayd.queue.quota import Need, QuotaLedger
from relayd.store.pg import PgError
from relayd.store.pgdirectory import PgDirectory, Window

RETRY_SECONDS = 1.0
PRUNE_SECONDS = 600.0
PRUNE_AFTER = 3600.0  # seconds after a window's end before its row is deleted


class QuotaLeaser:
    """Answers a QuotaLedger's requests with leases from the cluster database."""

    def __init__(self, store: PgDirectory, ledger: QuotaLedger, *,
                 clock: Callable[[], float],
                 wake: Callable[[], None],
                 log: Callable[..., None] | None = None) -> None:
        self.store = store
        self.ledger = ledger
        self._clock = clock
        self._wake_dispatch = wake
        self._log: Callable[..., None] = log or (lambda event, **kw: None)
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0
        ledger.on_need = self._event.set

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self.ledger.on_need = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            failed = False
            for need in self.ledger.take_needs():
                failed = not await self._lease(need) or failed
            self._wake_dispatch()
            if failed:
                await asyncio.sleep(RETRY_SECONDS)
                self._wake_dispatch()
            elif time.monotonic() - self._pruned_at > PRUNE_SECONDS:
                await self._prune()

    async def _lease(self, need: Need) -> bool:
        """Lease for one request and give the answer to the ledger; False if it failed."""
        try:
            grants = await self.store.lease(
                need.account_id, [Window(*w) for w in need.windows], need.want)
        except PgError as exc:
            self.ledger.failed(need.account_id)
            self._log("quota_lease_failed", account_id=need.account_id, error=str(exc))
            return False
        self.ledger.granted(need.account_id, need.limits, self._clock(),
                            [(g.period, g.start, g.granted, g.remaining) for g in grants])
        return True

    async def _prune(self) -> None:
        self._pruned_at = time.monotonic()
        with contextlib.suppress(PgError):
            await self.store.prune_quota(self._clock() - PRUNE_AFTER)
