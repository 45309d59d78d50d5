"""The dispatcher built directly: a real Spool on a tmp dir, a fake Sender, a FakeClock.

No running relay: each test commits a message into the spool, hands it to the
dispatcher (relayd.queue.dispatch) the way a worker or the dispatch loop
does, and reads what the spool, the delivery log (its own file, fed from the
spool's result commits as in the relay) and the ledger hold afterwards.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relayd.delivery.routing import NullMxRouteError, TemporaryRouteError
from relayd.directory.accounts import Account, Directory, Domain
from relayd.queue.backoff import BackoffPolicy
from relayd.queue.dispatch import Dispatcher
from relayd.queue.ratelimit import Limits
from relayd.queue.scheduler import Scheduler
from relayd.queue.sendqueue import QMsg, SendQueue
from relayd.store.deliverylog import DeliveryLog, Row
from relayd.store.spool import AttemptResult, NewMessage, Spool
from tests.fake_sender import FakeSender
from tests.test_queue_support import FakeClock

POLICY = BackoffPolicy(first=300.0, maximum=4000.0, jitter=0.0, lifetime=86400.0)


@dataclass
class Events:
    """SchedulerEvents that remember what they were told."""

    attempts: list[tuple[str, str]] = field(default_factory=list)
    in_flight_now: int = 0
    reconciled_total: int = 0

    def attempt(self, result: AttemptResult, seconds: float) -> None:
        self.attempts.append((result.recipient, result.outcome))

    def in_flight(self, delta: int) -> None:
        self.in_flight_now += delta

    def reconciled(self, count: int) -> None:
        self.reconciled_total += count


@dataclass
class Rig:
    """A dispatcher with its spool, directory and the hooks it called."""

    spool: Spool
    dlog: DeliveryLog
    directory: Directory
    account: Account
    clock: FakeClock
    sender: FakeSender = field(default_factory=FakeSender)
    events: Events = field(default_factory=Events)
    lost: int = 0
    recorded: list[bool] = field(default_factory=list)
    bounced: list[tuple[int, list[str], bool]] = field(default_factory=list)
    dispatcher: Dispatcher = field(init=False)

    def __post_init__(self) -> None:
        self.dispatcher = Dispatcher(
            self.spool, self.directory, self.sender, SendQueue(1 << 20), policy=POLICY,
            workers=2, clock=self.clock, rng=random.Random(1), events=self.events,
            on_failed=self.on_failed, on_lost=self.on_lost, on_recorded=self.recorded.append,
            load_budget=1 << 20)

    def on_lost(self) -> None:
        self.lost += 1

    async def on_failed(self, msg: QMsg, failed: list[AttemptResult]) -> None:
        # Before the commit of the results: the spool still has the message.
        still = msg.id in {m.id for m in await self.spool.pending_messages()}
        self.bounced.append((msg.id, [r.recipient for r in failed], still))

    async def commit(self, rcpts: list[str], *, keep_data: bool = False) -> QMsg:
        """A message accepted into the spool, as the ledger holds it for its first attempt."""
        mid = self.spool.ids.next()
        data = b"Subject: t\r\n\r\nbody\r\n"
        await self.spool.accept(NewMessage(mid, self.account.id, self.account.username,
                                           "example.com", "app@example.com", rcpts, data,
                                           self.clock()))
        q = QMsg(mid, self.account.id, self.account.username, "example.com",
                 "app@example.com", self.clock(), {i: (r, 0) for i, r in enumerate(rcpts)},
                 data=data if keep_data else None, size=len(data))
        self.dispatcher.ledger.add(q)
        return q

    async def settled(self) -> None:
        """Every attempt's results committed (or given up), DSNs queued."""
        await asyncio.wait_for(self.dispatcher.idle.wait(), 10)

    async def entries(self) -> list[Row]:
        """The delivery log's rows, oldest first."""
        return list(reversed(await self.dlog.entries(None, None, None, 1000)))

    async def log(self) -> list[tuple[str, str]]:
        return [(r[4], r[8]) for r in await self.entries()]


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(str(tmp_path / "spool.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def dlog(tmp_path: Path, spool: Spool) -> AsyncIterator[DeliveryLog]:
    log = DeliveryLog(str(tmp_path / "log.db"))
    await log.open()
    spool.on_results = log.append  # as the relay wires it
    try:
        yield log
    finally:
        await log.close()


@pytest.fixture
def rig(spool: Spool, dlog: DeliveryLog) -> Rig:
    directory = Directory()
    domain = Domain(1, "example.com", "sel")
    directory.put_domain(domain)
    account = Account(1, "app-user", domain, "hash")
    directory.put_account(account)
    return Rig(spool, dlog, directory, account, FakeClock())


async def test_a_delivered_message_is_logged_and_forgotten(rig: Rig) -> None:
    q = await rig.commit(["a@dest.test", "b@dest.test"])
    await rig.dispatcher.run(q)
    await rig.settled()
    assert [s.rcpts for s in rig.sender.sent] == [["a@dest.test", "b@dest.test"]]
    assert sorted(await rig.log()) == [("a@dest.test", "delivered"), ("b@dest.test", "delivered")]
    assert await rig.spool.pending_messages() == []
    led = rig.dispatcher.ledger
    assert not led.holds(q.id) and not led.is_live(q)
    assert (led.at_sender, led.recording, led.running) == (0, 0, 0)
    assert rig.account.total_sent == 2 and rig.recorded == [False] and rig.lost == 0
    assert rig.events.in_flight_now == 0 and len(rig.events.attempts) == 2


async def test_a_deferred_recipient_waits_for_its_next_attempt(rig: Rig) -> None:
    rig.sender.replies["b@dest.test"] = (451, "4.3.0 try later")
    q = await rig.commit(["a@dest.test", "b@dest.test"])
    await rig.dispatcher.run(q)
    await rig.settled()
    [stored] = await rig.spool.pending_messages()
    [rcpt] = stored.recipients
    assert (rcpt.rcpt, rcpt.status, rcpt.attempts) == ("b@dest.test", "deferred", 1)
    assert rcpt.next_attempt == rig.clock() + POLICY.first  # no jitter in POLICY
    assert rig.recorded == [True]  # the retry loop is woken
    led = rig.dispatcher.ledger
    assert not led.holds(q.id) and led.is_live(q)  # not final: still counts for its account
    assert rig.bounced == []


async def test_no_answer_is_a_deferral_and_a_lost_route_too(rig: Rig) -> None:
    rig.sender.replies["a@dest.test"] = (None, "connection refused")
    rig.sender.no_route["gone.test"] = TemporaryRouteError("no MX yet")
    q = await rig.commit(["a@dest.test", "c@gone.test"])
    await rig.dispatcher.run(q)
    await rig.settled()
    assert sorted(await rig.log()) == [("a@dest.test", "deferred"), ("c@gone.test", "deferred")]
    [stored] = await rig.spool.pending_messages()
    assert {r.status for r in stored.recipients} == {"deferred"}


async def test_a_failed_recipient_is_bounced_before_its_result_is_committed(rig: Rig) -> None:
    rig.sender.replies["b@dest.test"] = (550, "5.1.1 no such user")
    rig.sender.no_route["null.test"] = NullMxRouteError()
    q = await rig.commit(["a@dest.test", "b@dest.test", "c@null.test"])
    await rig.dispatcher.run(q)
    await rig.settled()
    assert rig.bounced == [(q.id, ["c@null.test", "b@dest.test"], True)]
    assert sorted(await rig.log()) == [("a@dest.test", "delivered"), ("b@dest.test", "failed"),
                                       ("c@null.test", "failed")]
    [null] = [r for r in await rig.entries() if r[4] == "c@null.test"]
    assert (null[5], null[6]) == ("-", 556) and null[7].startswith("5.1.10 ")  # RFC 7505
    assert await rig.spool.pending_messages() == []
    assert not rig.dispatcher.ledger.is_live(q)


async def test_a_failed_result_commit_is_reconciled(rig: Rig) -> None:
    """The commit of the results fails: memory lets go, the spool still has the message as
    never attempted, and the reconciliation puts it back in the send queue to deliver."""
    sched = Scheduler(rig.spool, rig.directory, rig.sender, log=rig.dlog, policy=POLICY,
                      default_limits=Limits(), workers=2, events=rig.events, clock=rig.clock)

    def break_commit(db: Any) -> None:
        db.execute("CREATE TRIGGER no_room BEFORE DELETE ON recipients"
                   " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")

    def mend_commit(db: Any) -> None:
        db.execute("DROP TRIGGER no_room")

    rig.dispatcher = sched.dispatcher
    q = await rig.commit(["a@dest.test"])
    await rig.spool._transact(break_commit)
    await sched.dispatcher.run(q)
    await rig.settled()
    assert not sched.in_memory(q.id) and sched.first_attempts() == 0
    assert sched.reconciler.probe  # the reconciliation first shows the spool is writable again
    [stored] = await rig.spool.pending_messages()
    assert [r.status for r in stored.recipients] == ["queued"]
    await rig.spool._transact(mend_commit)
    assert await sched.reconcile() == 1
    assert rig.events.reconciled_total == 1 and sched.in_memory(q.id)
    assert [(m.id, st) for m, st, _ in sched.send_queue_view()] == [(q.id, "queued")]
    assert await sched.reconcile() == 0  # memory holds it now
    again = sched.queue.take(rig.clock(), lambda _a: True)
    if again is None:  # the account's window first (unlimited)
        sched.queue.set_window(rig.account.id, await sched._new_window(rig.account, rig.clock()))
        again = sched.queue.take(rig.clock(), lambda _a: True)
    assert again is not None and again.id == q.id
    await sched.dispatcher.run(again)
    await rig.settled()
    assert await rig.log() == [("a@dest.test", "delivered")]
    assert await rig.spool.pending_messages() == [] and not sched.in_memory(q.id)
    await sched.stop(0)


async def test_both_ways_of_sending_share_one_ledger(rig: Rig) -> None:
    """A job at a delivery agent (the fast way) takes the same room as a worker's
    transmission: with two transmissions out, nothing more may start."""
    rig.sender.agent = True
    rig.sender.replies["b@dest.test"] = (550, "5.1.1 no such user")
    fast = [await rig.commit([f"{n}@dest.test"], keep_data=True) for n in ("a", "b")]
    assert all(rig.dispatcher.start_fast(q) for q in fast)
    led = rig.dispatcher.ledger
    assert led.at_sender == 2 and not rig.dispatcher.may_start()
    assert rig.events.in_flight_now == 2 and all(q.data is None for q in fast)
    slow = await rig.commit(["c@dest.test"])  # data not in memory: a worker's job
    worker = asyncio.ensure_future(rig.dispatcher.run(slow))
    await asyncio.sleep(0.05)
    assert not worker.done() and len(rig.sender.sent) == 2  # waits for room
    rig.sender.answer()
    await asyncio.wait_for(worker, 5)
    await rig.settled()
    assert sorted(await rig.log()) == [("a@dest.test", "delivered"), ("b@dest.test", "failed"),
                                       ("c@dest.test", "delivered")]
    assert rig.bounced == [(fast[1].id, ["b@dest.test"], True)]
    assert (led.at_sender, led.recording, led.running) == (0, 0, 0)
    assert rig.events.in_flight_now == 0


async def test_a_held_account_keeps_a_handed_message(rig: Rig) -> None:
    """Disabled between dispatch and attempt: the message goes back to the send queue."""
    q = await rig.commit(["a@dest.test"])
    rig.dispatcher.queue.hand(q)
    rig.account.status = "disabled"
    await rig.dispatcher.run(q)
    await rig.settled()
    assert rig.sender.sent == []
    assert [(m.id, st) for m, st, _ in rig.dispatcher.queue.view(lambda _a: False, rig.clock())
            ] == [(q.id, "held")]
    assert rig.dispatcher.ledger.holds(q.id)
