"""The loops around the send queue and the dispatcher: dispatch, retry, reconcile.

Owns: starting and stopping the queue, and wiring. New messages go to the
send queue (relayd.queue.sendqueue: per-account FIFOs, round robin, sending
limits, held mail); the dispatch loop takes them in turn and hands each to
the dispatcher (relayd.queue.dispatch), straight to a delivery agent when it
can, else to a delivery worker. Recipients that failed temporarily live only
in the database (the retry queue), found by the ``recipients_due`` index: the
retry loop sleeps until the earliest ``next_attempt`` and costs nothing while
nothing is due; due ones are leased and go to the workers. A message the
operator held (``queue hold``, stored in the spool) is in neither loop until
``queue release``.

Reconciliation (relayd.queue.reconcile): the database is the truth, memory
only mirrors it. A message committed at acceptance reaches ``enqueue_new``
from the spool's commit itself (``Spool.accept(..., then=...)``), not from the
session that sent it; what memory lost after a failed commit, or never knew,
is found by the reconciler and put back in the send queue.

Interface cost: ``queued_count`` and ``enqueue_new`` are O(1) and do no I/O
(they run on the SMTP hot path).

Untrusted input: none directly (messages were checked at acceptance).
Settings read: [delivery] retry settings, [limits] defaults, [spool]
reconcile_seconds (passed in); at a reload, ``reconfigure`` reads [limits]
and [delivery] bounces.
See also: relayd.queue.sendqueue, relayd.queue.dispatch, relayd.queue.reconcile,
relayd.queue.backoff, relayd.queue.ratelimit, relayd.store.spool.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from relayd.config import Config
from relayd.directory.accounts import Account, Directory
from relayd.queue import backoff
from relayd.queue.dispatch import Dispatcher, SchedulerEvents, Sender
from relayd.queue.ratelimit import (
    DAY,
    HOUR,
    MINUTE,
    Limits,
    RateWindow,
    WindowCounts,
    limits_from,
    window_start,
)
from relayd.queue.reconcile import Reconciler
from relayd.queue.sendqueue import DATA_CACHE_MAX_MESSAGE as DATA_CACHE_MAX_MESSAGE
from relayd.queue.sendqueue import QMsg, SendQueue, effective_limits
from relayd.store.deliverylog import DeliveryLog
from relayd.store.records import AttemptResult, NewMessage, StoredMessage
from relayd.store.spool import Spool

RETRY_LEASE_SECONDS = 900.0

__all__ = [
    "DATA_CACHE_MAX_MESSAGE",
    "RETRY_LEASE_SECONDS",
    "QMsg",
    "Scheduler",
    "SchedulerEvents",
    "Sender",
]


class Scheduler:
    """The send queue, the retry queue and the dispatcher, with the loops that drive them.

    Size: the one object the app and the control plane talk to about queued mail: the
    loops are short, and every operator operation (limits, enable, purge, hold, release,
    delete one message) has its in-memory half here as a short method over the send
    queue (relayd.queue.sendqueue) and the ledger (relayd.queue.dispatch), which hold
    the logic.
    """

    def __init__(self, spool: Spool, directory: Directory, sender: Sender, *,
                 log: DeliveryLog, policy: backoff.BackoffPolicy, default_limits: Limits,
                 workers: int,
                 events: SchedulerEvents | None = None,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 data_cache_bytes: int = 64 * 1024 * 1024,
                 on_failed: Callable[[QMsg, list[AttemptResult]], Any] | None = None,
                 reconcile_seconds: float = 60.0) -> None:
        self.spool = spool
        self.log = log
        self.directory = directory
        self.default_limits = default_limits
        self.workers = workers
        self.events = events
        self.queue = SendQueue(data_cache_bytes)
        self._wake = asyncio.Event()
        self._wake_retry = asyncio.Event()
        self.dispatcher = Dispatcher(
            spool, directory, sender, self.queue, policy=policy, workers=workers,
            clock=clock, rng=rng or random.Random(), events=events, on_failed=on_failed,
            on_lost=self._commit_failed, on_recorded=self._recorded,
            load_budget=data_cache_bytes)
        self.dispatcher.on_room = self._room
        self.ledger = self.dispatcher.ledger
        self.reconciler = Reconciler(
            spool, self.ledger, self.queue, reconcile_seconds=reconcile_seconds,
            clock=lambda: self.clock(), events=events, on_found=self._wake.set,
            on_released=self._wake_retry.set)
        self._jobs: asyncio.Queue[QMsg] = asyncio.Queue(maxsize=workers * 2)
        self._capped = False  # the dispatch loop waits for room at the dispatcher
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the dispatcher holds, settable on reload (and by tests) -------------------
    @property
    def sender(self) -> Sender:
        """Delivery, behind the Sender interface."""
        return self.dispatcher.sender

    @sender.setter
    def sender(self, sender: Sender) -> None:
        self.dispatcher.sender = sender

    @property
    def policy(self) -> backoff.BackoffPolicy:
        """The retry schedule in effect."""
        return self.dispatcher.policy

    @policy.setter
    def policy(self, policy: backoff.BackoffPolicy) -> None:
        self.dispatcher.policy = policy

    @property
    def on_failed(self) -> Callable[[QMsg, list[AttemptResult]], Any] | None:
        """What queues a DSN for failed recipients (None: bounces are off)."""
        return self.dispatcher.on_failed

    @on_failed.setter
    def on_failed(self, on_failed: Callable[[QMsg, list[AttemptResult]], Any] | None) -> None:
        self.dispatcher.on_failed = on_failed

    @property
    def clock(self) -> Callable[[], float]:
        """POSIX time, for sending windows and retry times."""
        return self.dispatcher.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.dispatcher.clock = clock

    # -- hot path ------------------------------------------------------------------
    def queued_count(self, account_id: int) -> int:
        """Messages of this account not yet in a final state."""
        live = self.ledger.live.get(account_id)
        return len(live) if live else 0

    def queued_total(self) -> int:
        """Messages of every account not yet in a final state."""
        return sum(len(ids) for ids in self.ledger.live.values())

    def enqueue_new(self, msg: NewMessage) -> None:
        """Put a freshly committed message at the end of its account's send queue."""
        q = QMsg(msg.id, msg.account_id, msg.username, msg.domain, msg.sender,
                 msg.received_at, {i: (r, 0) for i, r in enumerate(msg.recipients)},
                 msg.is_bounce, self.queue.keep_data(msg.data), size=len(msg.data))
        self.ledger.add(q)
        self.queue.push(q)
        self._wake.set()

    # -- control ------------------------------------------------------------------
    def wake(self) -> None:
        """Re-examine the send queue now (after enable, limit change...)."""
        self._wake.set()

    def wake_retry(self) -> None:
        """Re-examine the retry queue now (after ``queue retry``)."""
        self._wake_retry.set()

    def set_limits(self, account: Account) -> None:
        """Apply an account's (new) sending limits."""
        self.queue.set_limits(account.id, self.limits_of(account))
        self._wake.set()

    def limits_of(self, account: Account) -> Limits:
        """The account's limits, falling back to the workspace default per window."""
        return effective_limits(account, self.default_limits)

    def _usable(self, account_id: int) -> bool:
        acct = self.directory.accounts_by_id.get(account_id)
        return acct is not None and acct.usable

    def account_state(self, account_id: int) -> tuple[str, float | None]:
        """The send-queue state of an account's pending mail, with the reset time if any."""
        return self.queue.state(account_id, self._usable(account_id), self.clock())

    def send_queue_view(self) -> list[tuple[QMsg, str, float | None]]:
        """Messages in the send queue with their state (queued, held, waiting_limit)."""
        return self.queue.view(self._usable, self.clock())

    def drop_account(self, account_id: int, state: str | None = None) -> list[int]:
        """Forget the send queue of an account (purge); return the message ids dropped.

        With ``state`` (queued, waiting_limit or held), only if the account's
        pending mail is in that state.
        """
        if state is not None and self.account_state(account_id)[0] != state:
            return []
        dropped = self.queue.drop(account_id)
        self.ledger.forget(account_id, dropped)
        self.ledger.owned.difference_update(dropped)
        return dropped

    def forget(self, account_id: int, message_ids: list[int]) -> None:
        """Remove message ids from the live count (after a purge in the database)."""
        self.ledger.forget(account_id, message_ids)

    # -- one message: queue hold / release / delete (SEMANTICS §5) ----------------------
    def hold_message(self, message_id: int, account_id: int) -> Callable[[], None]:
        """Memory's part of ``queue hold``, before the write: the message leaves the send
        queue and no attempt of it starts while it is held (one already at the next hop
        finishes). Returns what undoes it (the write failed)."""
        led = self.ledger
        was_held = message_id in led.held
        led.held.add(message_id)
        msg = self.queue.remove(message_id, account_id)
        if msg is not None:
            led.owned.discard(message_id)

        def undo() -> None:
            if not was_held:
                led.held.discard(message_id)
            if msg is not None:
                led.owned.add(message_id)
                self.queue.push_front(msg)
                self._wake.set()
        return undo

    def release_message(self, message_id: int, queued: list[StoredMessage]) -> None:
        """Memory's part of ``queue release``, after the write: the message's recipients
        never attempted (``queued``, read after it) go back to the send queue; its
        deferred ones are due (the write made them so)."""
        led = self.ledger
        led.held.discard(message_id)
        for sm in queued:
            if led.holds(sm.id) or not sm.recipients:
                continue
            rcpts = {r.idx: (r.rcpt, r.attempts) for r in sm.recipients}
            # as the reconciliation does: results update and check the rows
            led.live.setdefault(sm.account_id, set()).add(sm.id)
            led.owned.add(sm.id)
            self.queue.push(QMsg(sm.id, sm.account_id, sm.username, sm.domain, sm.sender,
                                 sm.received_at, rcpts, sm.is_bounce, retry=True,
                                 size=sm.size))
        self._wake.set()
        self._wake_retry.set()

    def delete_message(self, message_id: int, account_id: int) -> None:
        """Memory's part of ``queue delete``, before the write: the message leaves the
        send queue and the live count; a retry of it handed to a worker stops (one
        already at the next hop finishes)."""
        self.queue.remove(message_id, account_id)
        self.ledger.forget(account_id, [message_id])
        self.ledger.owned.discard(message_id)

    def retrying(self, message_id: int) -> bool:
        """True while a retry of the message runs (its results set its recipients)."""
        return message_id in self.ledger.retrying

    # -- start and stop ------------------------------------------------------------
    async def start(self) -> None:
        """Load pending mail from the spool and start the loops."""
        now = self.clock()
        await self.spool.release_leases(now)
        stored = await self.spool.pending_messages()
        requeue_as_retry: list[int] = []
        for sm in stored:
            self.ledger.live.setdefault(sm.account_id, set()).add(sm.id)
            if sm.held is not None:  # held by the operator: not attempted until released
                self.ledger.held.add(sm.id)
                continue
            queued = {r.idx: (r.rcpt, r.attempts) for r in sm.recipients if r.status == "queued"}
            deferred = [r for r in sm.recipients if r.status == "deferred"]
            if queued and not deferred:
                self.ledger.owned.add(sm.id)
                self.queue.push(QMsg(sm.id, sm.account_id, sm.username, sm.domain, sm.sender,
                                     sm.received_at, queued, sm.is_bounce, size=sm.size))
            elif queued:
                requeue_as_retry.append(sm.id)
        self._wake.set()
        if requeue_as_retry:
            await self.spool.defer_queued(requeue_as_retry, now)
        orphans = await self.spool.orphan_messages()
        if orphans:
            await self.spool.record([], orphans)
        loop = asyncio.get_running_loop()
        self.spool.on_commit_failed = self._commit_failed
        self._tasks.append(loop.create_task(self._dispatch_loop()))
        self._tasks.append(loop.create_task(self._retry_loop()))
        self._tasks.append(loop.create_task(self.reconciler.loop()))
        for _ in range(self.workers):
            self._tasks.append(loop.create_task(self._worker()))

    async def stop(self, grace: float) -> None:
        """Stop starting attempts; let running ones finish within ``grace`` seconds."""
        self.reconciler.stop()
        for t in self._tasks[:3]:
            t.cancel()
        await self.dispatcher.stop(grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- loops -----------------------------------------------------------------------
    def _room(self) -> None:
        """Room at the dispatcher: wake the dispatch loop if it waits for it."""
        if self._capped:
            self._capped = False
            self._wake.set()

    async def _dispatch_loop(self) -> None:
        while True:
            # Cleared before the pass, not after: a wake-up that comes while the
            # pass awaits (a new window, a full job queue) is not lost.
            self._wake.clear()
            earliest: float | None = None
            while self.queue.has_mail():
                if not self.dispatcher.may_start():
                    self._capped = True  # an answer or a commit wakes us
                    break
                msg = self.queue.take(self.clock(), self._usable)
                if msg is None:
                    wanted = self.queue.wanted
                    if wanted is None:
                        earliest = self.queue.earliest
                        break
                    acct = self.directory.accounts_by_id[wanted]
                    self.queue.set_window(wanted, await self._new_window(acct, self.clock()))
                    continue
                if self.dispatcher.start_fast(msg):
                    continue
                self.queue.hand(msg)
                await self._jobs.put(msg)
            timeout = None if earliest is None else max(0.05, earliest - self.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _new_window(self, acct: Account, now: float) -> RateWindow:
        """An account's sending-limit window, seeded from the delivery log.

        Once per account and process: messages first attempted earlier in the
        current minute, hour and day (before a restart) still count.
        """
        window = RateWindow(self.limits_of(acct))
        if window.limits.unlimited:
            return window
        starts = [window_start(now, p) for p in (MINUTE, HOUR, DAY)]
        try:
            row = await self.log.first_attempts(acct.username, *starts)
        except Exception:  # no history to count: start from zero
            row = None
        if row:
            window.restore(now, WindowCounts(*row))
        return window

    async def _retry_loop(self) -> None:
        while True:
            self._wake_retry.clear()
            nxt = await self.spool.next_retry_at()
            now = self.clock()
            if nxt is None or nxt > now:
                timeout = None if nxt is None else min(nxt - now, 60.0)
                try:
                    await asyncio.wait_for(self._wake_retry.wait(), timeout)
                except TimeoutError:
                    pass
                continue
            await self._dispatch_due(now)

    async def _dispatch_due(self, now: float) -> None:
        due = await self.spool.due_retries(now, 500)
        msgs: dict[int, QMsg] = {}
        for sm in due:
            msgs[sm.id] = QMsg(sm.id, sm.account_id, sm.username, sm.domain, sm.sender,
                               sm.received_at, {r.idx: (r.rcpt, r.attempts)
                                                for r in sm.recipients},
                               sm.is_bounce, retry=True, size=sm.size)
        if due:
            await self.spool.lease([(sm.id, r.idx) for sm in due for r in sm.recipients],
                                   now + RETRY_LEASE_SECONDS)
        for q in msgs.values():
            self.ledger.add(q)
            await self._jobs.put(q)

    async def _worker(self) -> None:
        while True:
            msg = await self._jobs.get()
            await self.dispatcher.run(msg)

    # -- reconciliation with the database ---------------------------------------------
    def _recorded(self, deferred: bool) -> None:
        """An attempt's results are committed."""
        self.reconciler.committed()
        if deferred:
            self._wake_retry.set()

    def _commit_failed(self) -> None:
        """A commit failed: reconcile soon (see Reconciler.commit_failed)."""
        self.reconciler.commit_failed()

    async def reconcile(self) -> int:
        """See Reconciler.reconcile."""
        return await self.reconciler.reconcile()

    def first_attempts(self) -> int:
        """Messages never attempted that memory holds: send queue, attempt, pending result."""
        return len(self.ledger.owned)

    def in_memory(self, message_id: int) -> bool:
        """True if this scheduler holds the message (send queue, attempt, pending result)."""
        return self.ledger.holds(message_id)

    def never_attempted_in_memory(self) -> frozenset[int]:
        """A snapshot of the never-attempted messages memory holds (send queue, attempt,
        pending result): taken before a read of the spool, it covers the messages whose
        result is committed while the read runs. O(n) copy: for the control path."""
        return frozenset(self.ledger.owned)

    def reconfigure(self, cfg: Config, policy: backoff.BackoffPolicy,
                    bounce: Callable[[QMsg, list[AttemptResult]], Any]) -> None:
        """A reload: the default sending limits of ``[limits]`` (applied at once to every
        account's window), the retry schedule ``policy`` (built from ``cfg`` by the
        caller: it can fail), and ``bounce`` as ``on_failed`` while ``[delivery] bounces``
        is on; the dispatcher gets the policy and the hook. Results already computed keep
        the schedule they were computed with."""
        self.default_limits = limits_from(cfg.limits)
        for acct in self.directory.accounts_by_id.values():
            self.set_limits(acct)
        self.policy = policy
        self.on_failed = bounce if cfg.delivery.bounces else None
