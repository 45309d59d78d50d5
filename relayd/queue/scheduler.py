"""The send queue, sending limits, the retry queue, and dispatch to delivery.

Owns: which message is attempted next. New messages wait in a per-account
FIFO (the send queue); accounts take turns one message at a time (round
robin), so one account's backlog never starves another. An account over its
sending limit keeps its mail here until the window resets (state
``waiting_limit``); a disabled account's mail is *held* here, untouched, until
``enable``. Recipients that failed temporarily live only in the database (the
retry queue), found by the ``recipients_due`` index: the retry loop sleeps
until the earliest ``next_attempt`` and costs nothing while nothing is due.

Delivery results are written through the spool's group commit; a message is
removed only when its last recipient reached a final state (at-least-once).
A delivery worker does not wait for that commit (its pace is the next hop's,
not fsync's): at most ``RECORDS_PER_WORKER`` results per worker wait for it,
the message still counts as queued until then, and ``stop`` waits for them.

Reconciliation. The database is the truth; memory only mirrors it. A message
committed at acceptance reaches ``enqueue_new`` from the spool's commit itself
(``Spool.accept(..., then=...)``), not from the session that sent it. When the
commit of an attempt's results fails (disk full), the message is forgotten
here and the database still has it where it was (never attempted, or due again
when its retry lease is released). Then, and every ``reconcile_seconds``
anyway, ``reconcile`` puts every message the database holds with a recipient
never attempted that is not in memory (send queue, attempt, pending result) back
in the send queue, and counts them (``SchedulerEvents.reconciled``). After a
failed commit it first shows with one small write that the spool can be
written again (retried with a growing delay), so a full disk does not repeat
deliveries in a loop.

Fast path: a message whose data is in memory and whose recipients all route
to one hop without a lookup goes from the dispatcher straight to a delivery
agent with a callback (``_start_fast``); everything else goes to the workers.
Data loaded from the spool for attempts stays within a byte budget.

Interface cost: ``queued_count`` and ``enqueue_new`` are O(1) and do no I/O
(they run on the SMTP hot path).

Untrusted input: none directly (messages were checked at acceptance).
Settings read: [delivery] retry settings, [limits] defaults, [spool]
reconcile_seconds (passed in); at a reload, ``reconfigure`` reads [limits]
and [delivery] bounces.
See also: relayd.delivery.client, relayd.queue.backoff, relayd.queue.ratelimit, relayd.store.spool.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from relayd.config import Config
from relayd.delivery.client import BodyFile, Hop, RcptReply
from relayd.delivery.routing import RouteError
from relayd.directory.accounts import Account, Directory
from relayd.queue import backoff
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
from relayd.store.deliverylog import DeliveryLog
from relayd.store.spool import AttemptResult, NewMessage, Spool

DATA_CACHE_MAX_MESSAGE = 256 * 1024
RETRY_LEASE_SECONDS = 900.0
RECORDS_PER_WORKER = 8  # results waiting for their commit, per delivery worker
FIRST_RECONCILE_DELAY = 1.0  # after a failed commit; doubles up to reconcile_seconds


class Sender(Protocol):
    """What the scheduler needs from delivery."""

    async def route(self, domain: str) -> list[Hop]:
        """Next hops for a recipient domain, best first (may raise RouteError)."""

    async def send(self, hop: Hop, sender: str, rcpts: list[str],
                   data: bytes | BodyFile) -> list[RcptReply]:
        """One transaction at one hop; a reply per recipient (a BodyFile: read there)."""


class SchedulerEvents(Protocol):
    """Observability hooks (cheap)."""

    def attempt(self, result: AttemptResult, seconds: float) -> None: ...
    def in_flight(self, delta: int) -> None: ...
    def reconciled(self, count: int) -> None: ...


@dataclass(slots=True)
class QMsg:
    """A message (or the part of it due now) in memory."""

    id: int
    account_id: int
    username: str
    domain: str
    sender: str
    received_at: float
    rcpts: dict[int, tuple[str, int]]  # idx -> (address, attempts so far)
    is_bounce: bool = False
    data: bytes | None = None
    retry: bool = False
    size: int = 0  # of the data: what loading it for an attempt costs in memory


class _Room:
    """Tasks waiting until a condition holds that plain (non-async) code makes true.

    ``wake`` wakes them all and each checks its condition again (asyncio.Condition
    would need its lock, which a callback cannot take). Cheap when nobody waits.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait_until(self, ok: Callable[[], bool]) -> None:
        while not ok():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def wake(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)


@dataclass(slots=True)
class _AccountQueue:
    pending: deque[QMsg] = field(default_factory=deque)
    window: RateWindow | None = None
    blocked_until: float | None = None


class Scheduler:
    """Send queue with limits and fairness, retry loop, and delivery workers."""

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
        self.sender = sender
        self.policy = policy
        self.default_limits = default_limits
        self.workers = workers
        self.events = events
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_failed = on_failed
        self._queues: dict[int, _AccountQueue] = {}
        self._rr: deque[int] = deque()
        self._live: dict[int, set[int]] = {}
        self._handed: dict[int, QMsg] = {}  # left the send queue, attempt not started yet
        self._jobs: asyncio.Queue[QMsg] = asyncio.Queue(maxsize=workers * 2)
        self._wake = asyncio.Event()
        self._wake_retry = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._cache_budget = data_cache_bytes
        self._cache_used = 0
        self._loaded_bytes = 0  # data loaded from the spool for running attempts
        self._load_room = _Room()
        self._stopping = False
        self._running_attempts = 0  # attempts running, and results not committed yet
        self._idle = asyncio.Event()
        self._idle.set()
        self._recording: set[asyncio.Future[Any]] = set()
        self._record_room_size = max(64, workers * RECORDS_PER_WORKER)
        self._record_room = asyncio.Semaphore(self._record_room_size)
        # The fast path (see _start_fast): attempts handed to a delivery agent
        # with a callback, counted from hand-over to the commit of their results.
        # No more at the agent than there are connections (a job handed over is
        # a transmission in progress: SEMANTICS §4.1), and a bounded number of
        # answered ones waiting for the commit of their results.
        self._at_agent = 0  # transmissions handed to the sender, either path, unanswered
        self._agent_room = _Room()  # workers waiting for room at the agent
        self._fast_recording = 0
        self._fast_capped = False  # the dispatcher waits for one of the above to fall
        self._fast_tails: set[asyncio.Task[None]] = set()
        # What memory holds, for the reconciliation with the database: first
        # attempts from the send queue to the commit of their results, and retries
        # from their dispatch to that commit; retries whose result commit failed
        # (their lease is released at the next reconciliation).
        self.reconcile_seconds = reconcile_seconds
        self._owned: set[int] = set()
        self._retrying: set[int] = set()
        self._unleased: set[int] = set()
        self._reconcile_now = asyncio.Event()
        self._reconcile_timer: asyncio.TimerHandle | None = None
        self._reconcile_delay = 0.0  # after failed commits: the next delay, growing
        self._probe = False  # a commit failed: show the spool is writable before pushing
        self._failing = False  # a failure since the last reconciliation began

    # -- hot path ------------------------------------------------------------------
    def queued_count(self, account_id: int) -> int:
        """Messages of this account not yet in a final state."""
        live = self._live.get(account_id)
        return len(live) if live else 0

    def enqueue_new(self, msg: NewMessage) -> None:
        """Put a freshly committed message at the end of its account's send queue."""
        data: bytes | None = None
        if len(msg.data) <= DATA_CACHE_MAX_MESSAGE and self._cache_used < self._cache_budget:
            data = msg.data
            self._cache_used += len(data)
        q = QMsg(msg.id, msg.account_id, msg.username, msg.domain, msg.sender,
                 msg.received_at, {i: (r, 0) for i, r in enumerate(msg.recipients)},
                 msg.is_bounce, data, size=len(msg.data))
        self._live.setdefault(msg.account_id, set()).add(msg.id)
        self._owned.add(msg.id)
        self._push(q)

    def _push(self, q: QMsg) -> None:
        aq = self._queues.get(q.account_id)
        if aq is None:
            aq = self._queues[q.account_id] = _AccountQueue()
        if not aq.pending:
            self._rr.append(q.account_id)
        aq.pending.append(q)
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
        aq = self._queues.get(account.id)
        if aq is not None and aq.window is not None:
            aq.window.set_limits(self.limits_of(account))
            aq.blocked_until = None
        self._wake.set()

    def limits_of(self, account: Account) -> Limits:
        """The account's limits, falling back to the workspace default per window.

        An account value of 0 means unlimited (as in ``[limits]``), overriding
        the workspace default; None means "use the default".
        """
        d = self.default_limits

        def pick(own: int | None, default: int | None) -> int | None:
            if own is None:
                return default
            return own or None

        return Limits(
            per_minute=pick(account.per_minute, d.per_minute),
            per_hour=pick(account.per_hour, d.per_hour),
            per_day=pick(account.per_day, d.per_day),
        )

    def account_state(self, account_id: int) -> tuple[str, float | None]:
        """The send-queue state of an account's pending mail, with the reset time if any."""
        acct = self.directory.accounts_by_id.get(account_id)
        if acct is None or not acct.usable:
            return "held", None
        aq = self._queues.get(account_id)
        if aq is not None and aq.window is not None:
            until = aq.window.blocked_until(self.clock())
            if until is not None:
                return "waiting_limit", until
        return "queued", None

    def send_queue_view(self) -> list[tuple[QMsg, str, float | None]]:
        """Messages in the send queue with their state (queued, held, waiting_limit)."""
        out: list[tuple[QMsg, str, float | None]] = []
        for acct_id, aq in self._queues.items():
            state, until = self.account_state(acct_id)
            out.extend((m, state, until) for m in aq.pending)
        out.extend((m, *self.account_state(m.account_id)) for m in self._handed.values())
        return out

    def drop_account(self, account_id: int, state: str | None = None) -> list[int]:
        """Forget the send queue of an account (purge); return the message ids dropped.

        With ``state`` (queued, waiting_limit or held), only if the account's
        pending mail is in that state.
        """
        if state is not None and self.account_state(account_id)[0] != state:
            return []
        aq = self._queues.pop(account_id, None)
        while account_id in self._rr:
            self._rr.remove(account_id)
        handed = [m for m in self._handed.values() if m.account_id == account_id]
        for m in handed:
            del self._handed[m.id]
        dropped = [m.id for m in (*(aq.pending if aq else ()), *handed)]
        for m in (*(aq.pending if aq else ()), *handed):
            if m.data is not None:
                self._cache_used -= len(m.data)
                m.data = None
        live = self._live.get(account_id)
        if live is not None:
            for mid in dropped:
                live.discard(mid)
        self._owned.difference_update(dropped)
        return dropped

    def forget(self, account_id: int, message_ids: list[int]) -> None:
        """Remove message ids from the live count (after a purge in the database)."""
        live = self._live.get(account_id)
        if live is not None:
            for mid in message_ids:
                live.discard(mid)

    # -- start and stop ------------------------------------------------------------
    async def start(self) -> None:
        """Load pending mail from the spool and start the loops."""
        now = self.clock()
        await self.spool.write(lambda db: self._release_leases(db, now))
        stored = await self.spool.pending_messages()
        requeue_as_retry: list[int] = []
        for sm in stored:
            self._live.setdefault(sm.account_id, set()).add(sm.id)
            queued = {r.idx: (r.rcpt, r.attempts) for r in sm.recipients if r.status == "queued"}
            deferred = [r for r in sm.recipients if r.status == "deferred"]
            if queued and not deferred:
                self._owned.add(sm.id)
                self._push(QMsg(sm.id, sm.account_id, sm.username, sm.domain, sm.sender,
                                sm.received_at, queued, sm.is_bounce, size=sm.size))
            elif queued:
                requeue_as_retry.append(sm.id)
        if requeue_as_retry:
            async def _defer(db: Any) -> None:
                await db.executemany(
                    "UPDATE recipients SET status='deferred', next_attempt=? WHERE message_id=?"
                    " AND status='queued'", [(now, m) for m in requeue_as_retry])
            await self.spool.write(_defer)
        orphans = await self.spool.orphan_messages()
        if orphans:
            await self.spool.record([], orphans)
        loop = asyncio.get_running_loop()
        self.spool.on_commit_failed = self._commit_failed
        self._tasks.append(loop.create_task(self._dispatch_loop()))
        self._tasks.append(loop.create_task(self._retry_loop()))
        self._tasks.append(loop.create_task(self._reconcile_loop()))
        for _ in range(self.workers):
            self._tasks.append(loop.create_task(self._worker()))

    @staticmethod
    async def _release_leases(db: Any, now: float) -> None:
        """Recipients leased by a retry that a crash interrupted: due now, not at lease end."""
        await db.execute("UPDATE recipients SET next_attempt=?, leased=0"
                         " WHERE leased=1 AND status='deferred'", (now,))

    async def stop(self, grace: float) -> None:
        """Stop starting attempts; let running ones finish within ``grace`` seconds."""
        self._stopping = True
        if self._reconcile_timer is not None:
            self._reconcile_timer.cancel()
        for t in self._tasks[:3]:
            t.cancel()
        if self._running_attempts:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                pass
        for t in (*self._tasks, *self._fast_tails):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._fast_tails, return_exceptions=True)
        self._tasks.clear()

    # -- loops -----------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            # Cleared before the pass, not after: a wake-up that comes while the
            # pass awaits (a new window, a full job queue) is not lost.
            self._wake.clear()
            progressed = False
            now = self.clock()
            earliest: float | None = None
            for _ in range(len(self._rr)):
                if not self._rr:
                    break  # emptied by a purge while this loop was waiting
                if (self._at_agent >= self.workers
                        or self._fast_recording >= self._record_room_size):
                    self._fast_capped = True  # an answer or a commit wakes us
                    break
                acct_id = self._rr[0]
                aq = self._queues.get(acct_id)
                if aq is None or not aq.pending:
                    self._rr.popleft()
                    continue
                self._rr.rotate(-1)
                acct = self.directory.accounts_by_id.get(acct_id)
                if acct is None or not acct.usable:
                    continue  # held until enable (or purge)
                if aq.window is None:
                    window = await self._new_window(acct, now)
                    if self._queues.get(acct_id) is not aq or not aq.pending:
                        continue  # purged meanwhile
                    aq.window = aq.window or window
                until = aq.window.try_consume(now)
                if until is not None:
                    aq.blocked_until = until
                    earliest = until if earliest is None else min(earliest, until)
                    continue
                aq.blocked_until = None
                msg = aq.pending.popleft()
                if not aq.pending:
                    try:
                        self._rr.remove(acct_id)
                    except ValueError:
                        pass
                progressed = True
                if self._start_fast(msg):
                    continue
                self._handed[msg.id] = msg
                await self._jobs.put(msg)
            if progressed:
                continue
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
            row = await self.spool.fetchone(
                "SELECT MIN(next_attempt) FROM recipients WHERE status='deferred'")
            nxt = row[0] if row else None
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
        rows = await self.spool.fetchall(
            "SELECT r.message_id, r.idx, r.rcpt, r.attempts, m.account_id, m.username,"
            " m.domain, m.sender, m.received_at, m.is_bounce, m.size FROM recipients r"
            " JOIN messages m ON m.id = r.message_id"
            " WHERE r.status='deferred' AND r.next_attempt <= ? ORDER BY r.next_attempt"
            " LIMIT 500", (now,))
        msgs: dict[int, QMsg] = {}
        for r in rows:
            q = msgs.get(r[0])
            if q is None:
                q = msgs[r[0]] = QMsg(r[0], r[4], r[5], r[6], r[7], r[8], {}, bool(r[9]),
                                      retry=True, size=r[10])
            q.rcpts[r[1]] = (r[2], r[3])
        lease = now + RETRY_LEASE_SECONDS
        if rows:
            async def _lease(db: Any) -> None:
                await db.executemany(
                    "UPDATE recipients SET next_attempt=?, leased=1 WHERE message_id=? AND"
                    " idx=? AND status='deferred'", [(lease, r[0], r[1]) for r in rows])
            await self.spool.write(_lease)
        for q in msgs.values():
            self._live.setdefault(q.account_id, set()).add(q.id)
            self._retrying.add(q.id)
            await self._jobs.put(q)

    def _busy(self, delta: int) -> None:
        self._running_attempts += delta
        if self._running_attempts:
            self._idle.clear()
        else:
            self._idle.set()

    async def _worker(self) -> None:
        while True:
            msg = await self._jobs.get()
            self._busy(1)
            try:
                await self._attempt(msg)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed attempt is repeated from the spool: reconcile
                self._lost(msg)
            finally:
                self._busy(-1)

    # -- one attempt -------------------------------------------------------------------
    def _hold(self, msg: QMsg) -> bool:
        """Put a send-queue message back in front if its account is disabled (SEMANTICS §4.1:
        mail not yet attempted is held); True if it was."""
        acct = self.directory.accounts_by_id.get(msg.account_id)
        if acct is not None and acct.usable:
            return False
        aq = self._queues.setdefault(msg.account_id, _AccountQueue())
        if not aq.pending:
            self._rr.append(msg.account_id)
        aq.pending.appendleft(msg)
        return True

    async def _attempt(self, msg: QMsg) -> None:
        handed = self._handed.pop(msg.id, None) is not None
        if handed and self._hold(msg):
            return  # disabled after dispatch, before the attempt
        data = msg.data
        if data is not None:
            self._cache_used -= len(data)
            msg.data = None
        if msg.id not in self._live.get(msg.account_id, ()):
            self._disown(msg)
            return  # purged after it was dispatched
        loaded = 0
        body: bytes | BodyFile | None = data
        if body is None:
            # Data loaded for attempts stays within a byte budget (one message always
            # fits): a backlog of large mail does not load 20 of them at once. A
            # message in a spool file of its own is read by whoever sends it (the
            # delivery agent), not here; it counts against the same budget.
            loaded = msg.size
            await self._take_load_room(loaded)
            try:
                path = self.spool.body_path(msg.id)
                if path is not None:
                    body = BodyFile(path, msg.size)
                else:
                    body = await self.spool.load_data(msg.id)
            finally:
                if body is None:
                    self._give_load_room(loaded)
            if body is None:
                self._disown(msg)
                return  # purged meanwhile
        try:
            await self._attempt_with(msg, body, handed)
        finally:
            if loaded:
                self._give_load_room(loaded)

    async def _take_load_room(self, size: int) -> None:
        await self._load_room.wait_until(
            lambda: not self._loaded_bytes or self._loaded_bytes + size <= self._cache_budget)
        self._loaded_bytes += size

    def _give_load_room(self, size: int) -> None:
        self._loaded_bytes -= size
        self._load_room.wake()

    async def _attempt_with(self, msg: QMsg, data: bytes | BodyFile, handed: bool) -> None:
        # Room at the agent first, shared with the fast path: a job handed over is a
        # transmission in progress, never one waiting there for a connection, so a
        # disable while this waited still holds the message.
        await self._agent_room.wait_until(lambda: self._at_agent < self.workers)
        if handed and self._hold(msg):
            return
        self._at_agent += 1
        if self.events is not None:
            self.events.in_flight(1)
        started = time.perf_counter()
        results: list[AttemptResult] = []
        try:
            await self._transmit(msg, data, results)
        except Exception as exc:  # a bug must not strand the message: defer what is left
            answered = {r.idx for r in results}
            now = self.clock()
            results.extend(self._result(msg, i, "-", None, f"internal error: {type(exc).__name__}",
                                        now) for i in msg.rcpts if i not in answered)
        finally:
            if self.events is not None:
                self.events.in_flight(-1)
            self._at_agent -= 1
            self._fast_room()
        elapsed = time.perf_counter() - started
        if self.events is not None:
            for r in results:
                self.events.attempt(r, elapsed)
        await self._bounce(msg, data, results)
        # The worker goes on to its next message while the results wait for
        # their group commit: a worker's pace is the next hop's, not fsync's.
        # Until the commit the message still counts (queued_count, stop waits).
        await self._record_room.acquire()
        self._busy(1)
        self._record(msg, results, self._record_room.release)

    async def _bounce(self, msg: QMsg, data: bytes | BodyFile,
                      results: list[AttemptResult]) -> None:
        """Queue the DSN for the recipients that failed (if any, and if bounces are on)."""
        failed = [r for r in results if r.outcome == "failed"]
        if failed and self.on_failed is not None:
            # Before the results are committed: a crash in between repeats the
            # attempt (and may send a second DSN) but never loses the bounce.
            # (a BodyFile is not loaded here: on_failed loads the data from the spool)
            msg.data = data if isinstance(data, bytes) else None
            try:
                await self.on_failed(msg, failed)
            except Exception:  # noqa: S110 - a bounce that cannot be queued is logged there
                pass
            finally:
                msg.data = None

    def _record(self, msg: QMsg, results: list[AttemptResult],
                release: Callable[[], None]) -> None:
        """Hand an attempt's results to the group commit; ``release`` runs after it.

        The caller counted the attempt busy (``_busy(1)``); that ends with the commit.
        """
        deferred = any(r.outcome == "deferred" for r in results)
        delivered = sum(1 for r in results if r.outcome == "delivered")
        for r in results:
            if r.outcome != "deferred":
                msg.rcpts.pop(r.idx, None)
        if delivered:
            acct = self.directory.accounts_by_id.get(msg.account_id)
            if acct is not None:
                acct.total_sent += delivered
        # A first attempt that ended every recipient: the spool may delete the
        # message without updating and re-checking its recipients' rows.
        complete = not deferred and not msg.retry
        try:
            fut = self.spool.record(results, [] if deferred else [msg.id], complete)
        except Exception:  # not queued (spool closed): repeated after a restart
            release()
            self._busy(-1)
            self._disown(msg)
            return
        self._recording.add(fut)
        fut.add_done_callback(lambda f: self._recorded(f, msg, deferred, release))

    # -- the fast path ---------------------------------------------------------------
    def _start_fast(self, msg: QMsg) -> bool:
        """Start an attempt without a worker, a task or a future, if it can be one.

        It can when the data is in memory, every recipient routes to one hop
        without a lookup (static route or smarthost) and a delivery agent runs:
        the job goes to the agent with a callback (``_fast_done``). Anything
        else (MX lookups, data to load, no agent) goes to the workers. The
        account was checked usable just before, in the same loop turn, so
        there is no window for a disable in between (unlike a queued job).
        """
        route_now = getattr(self.sender, "route_now", None)
        submit = getattr(self.sender, "submit", None)
        data = msg.data
        if route_now is None or submit is None or data is None or not msg.rcpts:
            return False
        hop: Hop | None = None
        for rcpt, _att in msg.rcpts.values():
            hops = route_now(rcpt.rpartition("@")[2].lower())
            if hops is None or len(hops) != 1 or (hop is not None and hops[0] != hop):
                return False
            hop = hops[0]
        assert hop is not None
        idxs = list(msg.rcpts)
        if msg.id not in self._live.get(msg.account_id, ()):
            return False  # purged: the worker path drops it
        started = time.perf_counter()
        chosen = hop

        def done(replies: list[RcptReply]) -> None:
            self._fast_done(msg, data, chosen, idxs, replies, started)

        if not submit(hop, msg.sender, [msg.rcpts[i][0] for i in idxs], data, done):
            return False
        self._cache_used -= len(data)
        msg.data = None
        self._at_agent += 1
        self._busy(1)
        if self.events is not None:
            self.events.in_flight(1)
        return True

    def _fast_done(self, msg: QMsg, data: bytes, hop: Hop, idxs: list[int],
                   replies: list[RcptReply], started: float) -> None:
        """The agent answered a fast-path job: results, metrics, DSN, then the commit."""
        self._at_agent -= 1
        self._fast_recording += 1
        self._fast_room()
        now = self.clock()
        try:
            results = [self._result(msg, i, hop.name, rep.code, rep.text, now)
                       for i, rep in zip(idxs, replies, strict=True)]
        except Exception as exc:  # a bug must not strand the message: defer it
            results = [self._result(msg, i, "-", None, f"internal error: {type(exc).__name__}",
                                    now) for i in idxs]
        if self.events is not None:
            self.events.in_flight(-1)
            elapsed = time.perf_counter() - started
            for r in results:
                self.events.attempt(r, elapsed)
        if self.on_failed is not None and any(r.outcome == "failed" for r in results):
            task = asyncio.get_running_loop().create_task(self._fast_bounce(msg, data, results))
            self._fast_tails.add(task)
            task.add_done_callback(self._fast_tails.discard)
            return
        self._record(msg, results, self._fast_released)

    async def _fast_bounce(self, msg: QMsg, data: bytes, results: list[AttemptResult]) -> None:
        try:
            await self._bounce(msg, data, results)
        finally:
            self._record(msg, results, self._fast_released)

    def _fast_released(self) -> None:
        """A fast-path attempt's results are committed (or given up)."""
        self._fast_recording -= 1
        self._fast_room()

    def _fast_room(self) -> None:
        """Room at the agent or for results: wake whoever waits for it (cheap when nobody)."""
        if self._fast_capped:
            self._fast_capped = False
            self._wake.set()
        self._agent_room.wake()

    def _recorded(self, fut: asyncio.Future[Any], msg: QMsg, deferred: bool,
                  release: Callable[[], None]) -> None:
        """An attempt's results are committed (or not): forget the message once it is final.

        Not committed: the database still has the message as it was before the
        attempt; memory lets go of it and the reconciliation puts it back (a
        retry: once its lease is released), after showing the spool is writable.
        """
        self._recording.discard(fut)
        release()
        self._busy(-1)
        if fut.cancelled() or fut.exception() is not None:
            self._lost(msg)
            return
        self._disown(msg)
        self._reconcile_delay = 0.0
        removed = fut.result()
        if removed:
            self.forget(msg.account_id, removed)
        if deferred:
            self._wake_retry.set()

    # -- reconciliation with the database ---------------------------------------------
    def _disown(self, msg: QMsg) -> None:
        """Memory no longer holds this message (its results are committed, or it is gone)."""
        self._owned.discard(msg.id)
        self._retrying.discard(msg.id)

    def _lost(self, msg: QMsg) -> None:
        """Memory lets go of a message the database still has as before its attempt
        (its result commit failed, or the attempt failed unexpectedly)."""
        self._disown(msg)
        if msg.retry:
            self._unleased.add(msg.id)
        self._commit_failed()

    def _commit_failed(self) -> None:
        """A commit failed (also ``Spool.on_commit_failed``): reconcile once the spool is
        writable again, after a delay that doubles (up to ``reconcile_seconds``) with
        each round of failures until a result commit succeeds."""
        self._probe = True
        if not self._failing:
            self._failing = True
            self._reconcile_delay = min(max(FIRST_RECONCILE_DELAY, 2 * self._reconcile_delay),
                                        self.reconcile_seconds)
        self.reconcile_soon(self._reconcile_delay)

    def reconcile_soon(self, delay: float = 0.0) -> None:
        """Reconcile with the database within ``delay`` seconds (or sooner)."""
        if self._stopping:
            return
        if delay <= 0:
            self._reconcile_now.set()
            return
        loop = asyncio.get_running_loop()
        timer = self._reconcile_timer
        if timer is not None and not timer.cancelled() and timer.when() <= loop.time() + delay:
            return
        if timer is not None:
            timer.cancel()
        self._reconcile_timer = loop.call_later(delay, self._reconcile_now.set)

    def first_attempts(self) -> int:
        """Messages never attempted that memory holds: send queue, attempt, pending result."""
        return len(self._owned)

    def in_memory(self, message_id: int) -> bool:
        """True if this scheduler holds the message (send queue, attempt, pending result)."""
        return message_id in self._owned or message_id in self._retrying

    def never_attempted_in_memory(self) -> frozenset[int]:
        """A snapshot of the never-attempted messages memory holds (send queue, attempt,
        pending result): taken before a read of the spool, it covers the messages whose
        result is committed while the read runs. O(n) copy: for the control path."""
        return frozenset(self._owned)

    async def reconcile(self) -> int:
        """Put back in the send queue the messages the database holds with a recipient
        never attempted that memory does not hold; release the leases of retries whose
        results were lost. Return how many messages were put back (and report them).

        Cost: one indexed read of the ids in the spool's writer transaction (after
        a failed commit, with one small write first); the rows only of the few
        messages found. Raises if the spool cannot be read (or written, to probe).
        """
        self._failing = False
        release = [m for m in self._unleased if m not in self._retrying]
        probe = self._probe
        ids = await self.spool.reconcile_ids(release, self.clock(), probe)
        self._unleased.difference_update(release)
        if probe:
            self._probe = False
        if release:
            self._wake_retry.set()
        unknown = [m for m in ids if not self.in_memory(m)]
        if not unknown or self._stopping:
            return 0
        found = 0
        for sm in await self.spool.queued_messages(unknown):
            if self.in_memory(sm.id) or not sm.recipients or self._stopping:
                continue  # taken up meanwhile
            rcpts = {r.idx: (r.rcpt, r.attempts) for r in sm.recipients}
            self._live.setdefault(sm.account_id, set()).add(sm.id)
            self._owned.add(sm.id)
            # retry=True: the results update and check the rows (other recipients of
            # the message may be in another state), never a blind delete.
            self._push(QMsg(sm.id, sm.account_id, sm.username, sm.domain, sm.sender,
                            sm.received_at, rcpts, sm.is_bounce, retry=True, size=sm.size))
            found += 1
        if found and self.events is not None:
            self.events.reconciled(found)
        return found

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reconcile_now.wait(), self.reconcile_seconds)
            except TimeoutError:
                pass
            self._reconcile_now.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # the spool cannot be read or written yet: try again later
                self._commit_failed()

    async def _transmit(self, msg: QMsg, data: bytes | BodyFile,
                        results: list[AttemptResult]) -> None:
        """Route the recipients, group them by next hop, send; append one result each."""
        by_domain: dict[str, list[int]] = {}
        for idx, (rcpt, _att) in msg.rcpts.items():
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(idx)
        groups: dict[tuple[Hop, ...], list[int]] = {}
        for domain, idxs in by_domain.items():
            try:
                hops = await self.sender.route(domain)
            except RouteError as exc:
                now = self.clock()
                if exc.permanent:
                    code: int | None = exc.code
                    text = f"{exc.status} {exc}"
                else:
                    code, text = None, str(exc)
                results.extend(self._result(msg, i, "-", code, text, now) for i in idxs)
                continue
            groups.setdefault(tuple(hops), []).extend(idxs)
        for chain, idxs in groups.items():
            pending = idxs
            for n, h in enumerate(chain):
                rcpts = [msg.rcpts[i][0] for i in pending]
                replies = await self.sender.send(h, msg.sender, rcpts, data)
                now = self.clock()
                retry_next: list[int] = []
                for i, rep in zip(pending, replies, strict=True):
                    if rep.code is None and n < len(chain) - 1:
                        retry_next.append(i)  # connection trouble: try the next MX
                    else:
                        results.append(self._result(msg, i, h.name, rep.code, rep.text, now))
                pending = retry_next
                if not pending:
                    break

    def _result(self, msg: QMsg, idx: int, hop: str, code: int | None, text: str,
                now: float) -> AttemptResult:
        rcpt, attempts = msg.rcpts[idx]
        outcome = "deferred" if code is None else backoff.classify(code)
        next_at: float | None = None
        if outcome == "deferred":
            if backoff.expired(self.policy, msg.received_at, now):
                outcome = "failed"
                text = f"4.4.7 {text} (gave up: queue lifetime exceeded)"
            else:
                next_at = backoff.next_attempt(self.policy, attempts + 1, now, self.rng)
        return AttemptResult(
            message_id=msg.id, idx=idx, recipient=rcpt, username=msg.username,
            domain=msg.domain, next_hop=hop, code=code, text=text, outcome=outcome, ts=now,
            next_attempt=next_at, account_id=msg.account_id,
        )

    def reconfigure(self, cfg: Config, policy: backoff.BackoffPolicy,
                    bounce: Callable[[QMsg, list[AttemptResult]], Any]) -> None:
        """A reload: the default sending limits of ``[limits]`` (applied at once to every
        account's window), the retry schedule ``policy`` (built from ``cfg`` by the
        caller: it can fail), and ``bounce`` as ``on_failed`` while ``[delivery] bounces``
        is on. Results already computed keep the schedule they were computed with."""
        self.default_limits = limits_from(cfg.limits)
        for acct in self.directory.accounts_by_id.values():
            self.set_limits(acct)
        self.policy = policy
        self.on_failed = bounce if cfg.delivery.bounces else None
