"""One dispatcher: takes a message, transmits it, classifies, bounces, records.

Owns: everything between "this message is attempted now" and "its results
are committed", for every attempt (first attempts from the send queue,
retries, either way of sending), and the one in-flight ledger that says what
memory holds (``Ledger``).

Two ways to transmit, one bookkeeping. A message whose data is in memory and
whose recipients all route to one hop without a lookup goes to a delivery
agent with a callback (``start_fast``: no task, no future); everything else
(MX lookups, data to load from the spool, no agent running) is run by a
worker (``run``), which groups the recipients by destination and sends each
group through ``Sender.send``, several at once (relayd.queue.destinations; a
group's results are committed as it ends while others run: ``_commit_part``).
Both end in ``_answered``: metrics, the DSN for failed recipients (before the
commit: a crash in between repeats the attempt and may send a second DSN, but
never loses one), then the results go
to the spool's group commit (``_record``) and the message is forgotten once
its last recipient is final (at-least-once).

Suppression. A recipient on its domain's suppression list fails at dispatch, without
a connection (``suppressed``; the fast way leaves a message with any to a worker), and a
permanent "no such address" reply to a recipient's RCPT puts it there (``learn``).

Shaping (MX mode). A worker sends each group of recipients routed by MX through
``shaping`` (relayd.queue.shaped): it may wait for the destination's limits, or defer
the group without a connection while the destination is backed off.

Room. No more transmissions at the sender than ``workers`` (a job handed over
is a transmission in progress: SEMANTICS §4.1), and about ``record_limit``
answered attempts waiting for the commit of their results: an attempt starts
only when both have room (``may_start``). Data loaded from the spool for
attempts stays within a byte budget (one message always fits).

Failure. A result commit that fails (disk full), or an attempt that fails
unexpectedly, leaves the database as it was before the attempt: memory lets go
of the message and ``on_lost`` asks the scheduler to reconcile.

Untrusted input: reply codes and texts of next hops (classified by
relayd.queue.backoff; any int is accepted).
Settings read: none directly (policy and hooks are passed in, and replaced on reload).
See also: relayd.queue.scheduler (loops and wiring), relayd.queue.sendqueue,
relayd.queue.backoff, relayd.store.spool (``record``), relayd.delivery.client.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

from relayd.delivery.client import BodyFile, Hop, RcptReply
from relayd.directory.accounts import Directory
from relayd.directory.suppression import failure_text, suppresses
from relayd.queue import backoff
from relayd.queue.destinations import destination_groups, send_group, send_groups
from relayd.queue.sendqueue import QMsg, SendQueue
from relayd.queue.shaped import Shaping
from relayd.store.spool import AttemptResult, Spool

RECORDS_PER_WORKER = 8  # results waiting for their commit, per delivery worker
_FAILED = ("failed", "suppressed")  # outcomes the sender gets a DSN for


class Sender(Protocol):
    """What the dispatcher needs from delivery."""

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


class Room:
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


class Ledger:
    """What memory holds, for the hot path's counts and the reconciliation.

    ``live``: per account, the messages not yet final (``queued_count``).
    ``owned``: never-attempted messages, from the send queue to the commit of
    their results; ``retrying``: retries from their dispatch to that commit;
    ``held``: messages the operator held (``queue hold``), never attempted while held;
    ``unleased``: retries whose result commit failed (their lease is released
    at the next reconciliation). ``at_sender``: transmissions handed to the
    sender, unanswered; ``recording``: answered attempts whose results are not
    committed yet; ``running``: attempts from their start to that commit.
    """

    __slots__ = ("at_sender", "held", "live", "owned", "recording", "retrying", "running",
                 "unleased")

    def __init__(self) -> None:
        self.live: dict[int, set[int]] = {}
        self.owned: set[int] = set()
        self.retrying: set[int] = set()
        self.unleased: set[int] = set()
        self.held: set[int] = set()
        self.at_sender = 0
        self.recording = 0
        self.running = 0

    def add(self, msg: QMsg) -> None:
        """A message memory now holds (a first attempt, or a retry when ``msg.retry``)."""
        self.live.setdefault(msg.account_id, set()).add(msg.id)
        (self.retrying if msg.retry else self.owned).add(msg.id)

    def is_live(self, msg: QMsg) -> bool:
        """False once the message was purged."""
        return msg.id in self.live.get(msg.account_id, ())

    def forget(self, account_id: int, message_ids: list[int]) -> None:
        """These messages are final, or gone."""
        live = self.live.get(account_id)
        if live is not None:
            for mid in message_ids:
                live.discard(mid)
        if self.held:
            self.held.difference_update(message_ids)

    def disown(self, message_id: int) -> None:
        """Memory no longer holds this message (results committed, or it is gone)."""
        self.owned.discard(message_id)
        self.retrying.discard(message_id)

    def holds(self, message_id: int) -> bool:
        """True if memory holds the message (send queue, attempt, pending result)."""
        return message_id in self.owned or message_id in self.retrying


class Dispatcher:
    """Attempts from start to commit, through either way of sending, with one ledger."""

    def __init__(self, spool: Spool, directory: Directory, sender: Sender, queue: SendQueue, *,
                 policy: backoff.BackoffPolicy, workers: int,
                 clock: Callable[[], float], rng: random.Random,
                 events: SchedulerEvents | None,
                 on_failed: Callable[[QMsg, list[AttemptResult]], Any] | None,
                 on_lost: Callable[[], None], on_recorded: Callable[[bool], None],
                 load_budget: int) -> None:
        self.spool = spool
        self.directory = directory
        self.sender = sender
        self.queue = queue
        self.policy = policy
        self.workers = workers
        self.clock = clock
        self.rng = rng
        self.events = events
        self.on_failed = on_failed
        self.on_lost, self.on_recorded = on_lost, on_recorded
        self.on_room: Callable[[], None] | None = None  # set by whoever waits in may_start
        self.shaping: Shaping | None = None  # MX mode: per-destination shaping (app sets it)
        self.ledger = Ledger()
        self.record_limit = max(64, workers * RECORDS_PER_WORKER)
        self.load_budget = load_budget
        self.loaded_bytes = 0  # data loaded from the spool for running attempts
        self.idle = asyncio.Event()
        self.idle.set()
        self._room = Room()  # workers waiting for room at the sender, for results, for data
        self._recording: set[asyncio.Future[Any]] = set()
        self._tails: set[asyncio.Task[None]] = set()
        # per message: the commits of groups that ended before its attempt, and their idxs
        self._parts: dict[int, tuple[list[asyncio.Future[Any]], set[int]]] = {}

    # -- room ---------------------------------------------------------------------------
    def may_start(self) -> bool:
        """Room at the sender and for results: an attempt may start now."""
        led = self.ledger
        return led.at_sender < self.workers and led.recording < self.record_limit

    def _roomier(self) -> None:
        """Room at the sender, for results or for data: wake whoever waits (cheap if none)."""
        self._room.wake()
        if self.on_room is not None:
            self.on_room()

    def _busy(self, delta: int) -> None:
        self.ledger.running += delta
        if self.ledger.running:
            self.idle.clear()
        else:
            self.idle.set()

    # -- the fast way: a delivery agent with a callback ------------------------------------
    def start_fast(self, msg: QMsg) -> bool:
        """Start an attempt without a worker, a task or a future, if it can be one.

        It can when the data is in memory, every recipient routes to one hop
        without a lookup (static route or smarthost) and a delivery agent runs.
        Anything else goes to the workers (False). The account was checked
        usable just before, in the same loop turn: no disable can come between.
        """
        route_now = getattr(self.sender, "route_now", None)
        submit = getattr(self.sender, "submit", None)
        data = msg.data
        if route_now is None or submit is None or data is None or not msg.rcpts \
                or suppressing(self.directory, msg) is not None:  # (a worker fails those)
            return False
        hop: Hop | None = None
        for rcpt, _att in msg.rcpts.values():
            hops = route_now(rcpt.rpartition("@")[2].lower())
            if hops is None or len(hops) != 1 or (hop is not None and hops[0] != hop):
                return False
            hop = hops[0]
        assert hop is not None
        if not self.ledger.is_live(msg):
            return False  # purged: the worker path drops it
        idxs = list(msg.rcpts)
        started = time.perf_counter()
        chosen = hop

        def done(replies: list[RcptReply]) -> None:
            now = self.clock()
            try:
                results = [self._result(msg, i, chosen.name, rep.code, rep.text, now,
                                        rep.at_rcpt) for i, rep in zip(idxs, replies, strict=True)]
            except Exception as exc:  # a bug must not strand the message: defer it
                results = self._internal_error(msg, exc, idxs)
            self._answered(msg, data, results, started)

        if not submit(hop, msg.sender, [msg.rcpts[i][0] for i in idxs], data, done):
            return False
        self.queue.take_data(msg)
        self._busy(1)
        self._handed_over()
        return True

    def _handed_over(self) -> None:
        self.ledger.at_sender += 1
        if self.events is not None:
            self.events.in_flight(1)

    # -- the worker way ----------------------------------------------------------------
    async def run(self, msg: QMsg) -> None:
        """A worker's attempt of ``msg``: hold, load, transmit, then as every attempt."""
        self._busy(1)
        recording = False
        try:
            recording = await self._attempt(msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed attempt is repeated from the spool: reconcile
            self._lost(msg)
        finally:
            if not recording:
                self._parts.pop(msg.id, None)
                self._busy(-1)

    def _hold(self, msg: QMsg, handed: bool) -> bool:
        """Put a send-queue message back in front if its account is disabled (SEMANTICS
        §4.1: mail not yet attempted is held); True if it was."""
        if not handed:
            return False
        acct = self.directory.accounts_by_id.get(msg.account_id)
        if acct is not None and acct.usable:
            return False
        self.queue.push_front(msg)
        return True

    async def _attempt(self, msg: QMsg) -> bool:
        """True once the results went to ``_record`` (which then ends the attempt)."""
        handed = self.queue.unhand(msg.id)
        if self._hold(msg, handed):
            return False  # disabled after dispatch, before the attempt
        data = self.queue.take_data(msg)
        if not self.ledger.is_live(msg) or msg.id in self.ledger.held:
            self.ledger.disown(msg.id)
            return False  # purged or held after it was dispatched
        if data is not None:
            return await self._attempt_with(msg, data, handed)
        # Data loaded for attempts stays within a byte budget (one message always
        # fits). A message in a spool file of its own is read by whoever sends it
        # (the delivery agent), not here; it counts against the same budget.
        size = msg.size
        await self._room.wait_until(
            lambda: not self.loaded_bytes or self.loaded_bytes + size <= self.load_budget)
        self.loaded_bytes += size
        try:
            path = self.spool.body_path(msg.id)
            body = BodyFile(path, size) if path is not None else await self.spool.load_data(msg.id)
            if body is None:
                self.ledger.disown(msg.id)
                return False  # purged meanwhile
            return await self._attempt_with(msg, body, handed)
        finally:
            self.loaded_bytes -= size
            self._roomier()

    async def _attempt_with(self, msg: QMsg, data: bytes | BodyFile, handed: bool) -> bool:
        # Room first, shared with the fast way: a job handed over is a transmission in
        # progress, never one waiting there, so a disable while this waited still holds.
        await self._room.wait_until(self.may_start)
        if self._hold(msg, handed):
            return False
        if msg.id in self.ledger.held:  # held by the operator while this waited
            self.ledger.disown(msg.id)
            return False
        self._handed_over()
        started = time.perf_counter()
        results: list[AttemptResult] = []
        try:
            await self._transmit(msg, data, results)
        except Exception as exc:  # a bug must not strand the message: defer what is left
            answered = {r.idx for r in results}
            results.extend(self._internal_error(msg, exc, [i for i in msg.rcpts
                                                            if i not in answered]))
        except BaseException:
            self._unanswered()
            raise
        self._answered(msg, data, results, started)
        return True

    async def _transmit(self, msg: QMsg, data: bytes | BodyFile,
                        results: list[AttemptResult]) -> None:
        """Fail the suppressed recipients; group the others by destination and send each
        group (relayd.queue.destinations): one is awaited here, several run at once."""
        results.extend(suppressed(self.directory, msg, self.clock()))
        done = {r.idx for r in results}
        groups = destination_groups(msg, done, getattr(self.sender, "route_now", None))
        send = functools.partial(send_group, self.sender, msg, data, clock=self.clock,
                                 result=functools.partial(self._result, msg),
                                 shaping=self.shaping)
        if len(groups) == 1:
            results.extend(await send(groups[0]))
        elif groups:
            results.extend(await send_groups(
                groups, send, lambda g, exc: self._internal_error(msg, exc, g.idxs),
                functools.partial(self._commit_part, msg)))

    def _commit_part(self, msg: QMsg, part: list[AttemptResult]) -> None:
        """Queue one finished group's results while the attempt goes on, unless one
        failed (failures wait for the attempt's one DSN, which comes before their
        commit); the attempt's own commit (``_record``) then leaves them out."""
        if any(r.outcome in _FAILED for r in part):
            return
        try:
            fut = self.spool.record(part, [], False)
        except Exception:  # not queued (spool closed): the attempt's own commit fails too
            return
        parts = self._parts.setdefault(msg.id, ([], set()))
        parts[0].append(fut)
        parts[1].update(r.idx for r in part)

    # -- every attempt ends here -----------------------------------------------------------
    def _unanswered(self) -> None:
        self.ledger.at_sender -= 1
        if self.events is not None:
            self.events.in_flight(-1)
        self._roomier()

    def _answered(self, msg: QMsg, data: bytes | BodyFile, results: list[AttemptResult],
                  started: float) -> None:
        """The sender answered: metrics, the DSN if any recipient failed, then the commit.

        From here until the commit the attempt counts in ``recording``.
        """
        self.ledger.recording += 1
        self._unanswered()
        if self.events is not None:
            elapsed = time.perf_counter() - started
            for r in results:
                self.events.attempt(r, elapsed)
        learn(self.directory, msg, results)
        if self.on_failed is not None and any(r.outcome in _FAILED for r in results):
            task = asyncio.get_running_loop().create_task(self._bounce(msg, data, results))
            self._tails.add(task)
            task.add_done_callback(self._tails.discard)
            return
        self._record(msg, results)

    async def _bounce(self, msg: QMsg, data: bytes | BodyFile,
                      results: list[AttemptResult]) -> None:
        """Queue the DSN for the recipients that failed, then record the results."""
        try:
            on_failed = self.on_failed
            if on_failed is not None:
                # (a BodyFile is not loaded here: on_failed loads the data from the spool)
                msg.data = data if isinstance(data, bytes) else None
                try:
                    await on_failed(msg, [r for r in results if r.outcome in _FAILED])
                except Exception:  # noqa: S110 - a bounce that cannot be queued is logged there
                    pass
                finally:
                    msg.data = None
        finally:
            self._record(msg, results)

    def _record(self, msg: QMsg, results: list[AttemptResult]) -> None:
        """Hand an attempt's results to the group commit; the attempt ends with it."""
        deferred = any(r.outcome == "deferred" for r in results)
        delivered = sum(1 for r in results if r.outcome == "delivered")
        for r in results:
            if r.outcome != "deferred":
                msg.rcpts.pop(r.idx, None)
        if delivered and not msg.is_bounce:  # a DSN relayd generated is not sent mail
            acct = self.directory.accounts_by_id.get(msg.account_id)
            if acct is not None:
                acct.total_sent += delivered
        # A first attempt that ended every recipient: the spool may delete the
        # message without updating and re-checking its recipients' rows (not when a
        # group's results were committed already: the spool checks them).
        parts = self._parts.get(msg.id)
        complete = not deferred and not msg.retry and parts is None
        if parts is not None:
            results = [r for r in results if r.idx not in parts[1]]
        try:
            fut = self.spool.record(results, [] if deferred else [msg.id], complete)
        except Exception:  # not queued (spool closed): repeated after a restart
            self._parts.pop(msg.id, None)
            self._ended()
            self.ledger.disown(msg.id)
            return
        self._recording.add(fut)
        fut.add_done_callback(lambda f: self._recorded(f, msg, deferred))

    def _ended(self) -> None:
        self.ledger.recording -= 1
        self._busy(-1)
        self._roomier()

    def _recorded(self, fut: asyncio.Future[Any], msg: QMsg, deferred: bool) -> None:
        """An attempt's results are committed (or not): forget the message once it is final.

        Not committed: the database still has the message as it was before the
        attempt; memory lets go of it and the reconciliation puts it back (a
        retry: once its lease is released), after showing the spool is writable.
        """
        self._recording.discard(fut)
        self._ended()
        parts = self._parts.pop(msg.id, ([], set()))[0]
        if any(failed(f) for f in (fut, *parts)):  # (parts were queued first: done)
            self._lost(msg)
            return
        self.ledger.disown(msg.id)
        removed = fut.result()
        if removed:
            self.ledger.forget(msg.account_id, removed)
        self.on_recorded(deferred)

    def _lost(self, msg: QMsg) -> None:
        """Memory lets go of a message the database still has as before its attempt."""
        self.ledger.disown(msg.id)
        if msg.retry:
            self.ledger.unleased.add(msg.id)
        self.on_lost()

    def _internal_error(self, msg: QMsg, exc: Exception, idxs: list[int]) -> list[AttemptResult]:
        now = self.clock()
        return [self._result(msg, i, "-", None, f"internal error: {type(exc).__name__}", now)
                for i in idxs]

    def _result(self, msg: QMsg, idx: int, hop: str, code: int | None, text: str,
                now: float, at_rcpt: bool = False, tls: str = "") -> AttemptResult:
        """One recipient's result, classified; a deferral gets its next attempt."""
        rcpt, attempts = msg.rcpts[idx]
        outcome = "deferred" if code is None else backoff.classify(code)
        next_at: float | None = None
        if outcome == "deferred":
            if backoff.expired(self.policy, msg.received_at, now):
                outcome = "failed"
                text = f"4.4.7 {text} {backoff.GAVE_UP}"
            else:
                next_at = backoff.next_attempt(self.policy, attempts + 1, now, self.rng)
        return AttemptResult(
            message_id=msg.id, idx=idx, recipient=rcpt, username=msg.username,
            domain=msg.domain, next_hop=hop, code=code, text=text, outcome=outcome, ts=now,
            next_attempt=next_at, account_id=msg.account_id, is_bounce=msg.is_bounce,
            attempts=attempts + 1, at_rcpt=at_rcpt, tls=tls)

    async def stop(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for running attempts; then cancel the DSN tails."""
        if self.ledger.running:
            try:
                await asyncio.wait_for(self.idle.wait(), grace)
            except TimeoutError:
                pass
        for t in self._tails:
            t.cancel()
        await asyncio.gather(*self._tails, return_exceptions=True)


def failed(fut: asyncio.Future[Any]) -> bool:
    """A commit that did not happen (cancelled or raised) or has not happened yet."""
    return not fut.done() or fut.cancelled() or fut.exception() is not None


# -- the suppression list (relayd.directory.suppression) -----------------------------------
def suppressing(directory: Directory, msg: QMsg) -> int | None:
    """The id of the message's domain if it has suppressed recipients, else None."""
    acct = directory.accounts_by_id.get(msg.account_id)
    if acct is None or not directory.suppressions.has_any(acct.domain.id):
        return None
    return acct.domain.id


def learn(directory: Directory, msg: QMsg, results: list[AttemptResult]) -> None:
    """Suppress the recipients a next hop refused for good, at their RCPT, as not
    existing (a reply to MAIL or DATA is about the message or the sender; a DSN's
    failures suppress nothing)."""
    if msg.is_bounce:
        return
    acct = None
    for r in results:
        if r.outcome == "failed" and r.at_rcpt and r.code is not None \
                and suppresses(r.code, r.text):
            acct = acct or directory.accounts_by_id.get(msg.account_id)
            if acct is not None:
                directory.suppressions.learn(acct.domain.id, r.recipient, r.code, r.text, r.ts)


def suppressed(directory: Directory, msg: QMsg, now: float) -> list[AttemptResult]:
    """The results of the message's suppressed recipients: final, no next hop, no code."""
    domain_id = suppressing(directory, msg)
    if domain_id is None:
        return []
    out = []
    for idx, (rcpt, _att) in msg.rcpts.items():
        entry = directory.suppressions.find(domain_id, rcpt, now)
        if entry is not None:
            out.append(AttemptResult(
                message_id=msg.id, idx=idx, recipient=rcpt, username=msg.username,
                domain=msg.domain, next_hop="-", code=None, text=failure_text(entry),
                outcome="suppressed", ts=now, next_attempt=None,
                account_id=msg.account_id, is_bounce=msg.is_bounce))
    return out
