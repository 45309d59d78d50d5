"""The send queue: per-account sending limits (waiting_limit with a reset time),
workspace defaults, the per-account queued cap, and round-robin fairness."""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtplib
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.test_queue_support import eventually, install_clock, queue_items, submit


async def _user(relay: RelayHandle, **limits: int) -> tuple[str, str]:
    if relay.relay.directory.active_domain("example.com") is None:
        await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    if limits:
        await relay.ctl.ok("POST", f"/v1/users/{user}/limits", limits)
    return user, password


async def _waiting(relay: RelayHandle, n: int) -> list[dict[str, Any]] | None:
    items = await queue_items(relay, state="waiting_limit")
    return items if len(items) == n else None


async def test_over_limit_mail_waits_for_the_window(relay: RelayHandle, sink: Sink) -> None:
    """With 3 per minute, 5 messages: 3 go now, 2 wait with the reset time, then go."""
    clock = install_clock(relay)
    account = await _user(relay, per_minute=3)
    ids = await submit(relay, account, ["r@dest.test"], count=5)
    await sink.wait_for(3)
    waiting = await eventually(lambda: _waiting(relay, 2))
    reset = clock.now - clock.now % 60 + 60
    assert [w["id"] for w in waiting] == ids[3:]
    assert all(w["reset_at"] == reset for w in waiting)
    assert all(w["username"] == account[0] for w in waiting)
    await asyncio.sleep(0.1)
    assert len(sink.messages) == 3

    clock.advance(reset - clock.now)
    relay.relay.scheduler.wake()
    await sink.wait_for(5)
    assert await queue_items(relay) == []


async def test_workspace_default_limit_applies(relay_factory: RelayFactory, sink: Sink) -> None:
    """An account without its own limits gets the ``[limits]`` default."""
    relay = await relay_factory({"limits": {"per_minute": 2}})
    install_clock(relay)
    account = await _user(relay)
    await submit(relay, account, ["r@dest.test"], count=3)
    await sink.wait_for(2)
    [item] = await eventually(lambda: _waiting(relay, 1))
    assert item["reset_at"] is not None


async def test_account_zero_means_unlimited(relay_factory: RelayFactory, sink: Sink) -> None:
    """An account limit of 0 overrides the workspace default with "unlimited"."""
    relay = await relay_factory({"limits": {"per_minute": 1}})
    install_clock(relay)
    account = await _user(relay, per_minute=0)
    await submit(relay, account, ["r@dest.test"], count=4)
    await sink.wait_for(4)


async def test_raising_the_limit_releases_waiting_mail(relay: RelayHandle, sink: Sink) -> None:
    """Mail waiting for its limit goes at once when the operator raises the limit."""
    install_clock(relay)
    user, password = await _user(relay, per_minute=1)
    await submit(relay, (user, password), ["r@dest.test"], count=3)
    await eventually(lambda: _waiting(relay, 2))
    await relay.ctl.ok("POST", f"/v1/users/{user}/limits", {"per_minute": 10})
    await sink.wait_for(3)


async def test_queued_cap_refuses_mail(relay_factory: RelayFactory, sink: Sink) -> None:
    """Past ``max_queued_per_account`` queued messages, MAIL gets 452 4.3.1."""
    relay = await relay_factory({"limits": {"max_queued_per_account": 3}})
    install_clock(relay)
    account = await _user(relay, per_minute=1)
    await submit(relay, account, ["r@dest.test"])
    await sink.wait_for(1)
    await eventually(lambda: _no_live(relay))
    await submit(relay, account, ["r@dest.test"], count=3)  # all three wait
    client = await relay.client(*account)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await client.sendmail("app@example.com", ["r@dest.test"], message())
    await client.quit()
    assert err.value.code == 452 and err.value.message.startswith("4.3.1")


async def _no_live(relay: RelayHandle) -> bool:
    return sum(relay.relay.scheduler.queued_count(a) for a in
               relay.relay.directory.accounts_by_id) == 0


class _Gate:
    """Wraps the scheduler's sender: holds every send until opened, records the order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.open = asyncio.Event()
        self.order: list[str] = []

    async def route(self, domain: str) -> Any:
        return await self.inner.route(domain)

    async def send(self, hop: Any, sender: str, rcpts: list[str], data: Any) -> Any:
        await self.open.wait()
        self.order.append(rcpts[0])
        return await self.inner.send(hop, sender, rcpts, data)


async def test_accounts_take_turns(relay_factory: RelayFactory, sink: Sink) -> None:
    """A backlog of one account does not delay another's mail: accounts alternate."""
    relay = await relay_factory({"delivery": {"connections_per_host": 1}})
    gate = _Gate(relay.relay.scheduler.sender)
    relay.relay.scheduler.sender = gate
    big = await _user(relay)
    small = await _user(relay)
    await submit(relay, big, ["big@dest.test"], count=12)
    await submit(relay, small, ["small@dest.test"], count=3)
    gate.open.set()
    await sink.wait_for(15)
    # A few of the big backlog were already handed to the worker (the job queue
    # and the one the dispatcher holds) before the small account's mail came;
    # from then on the two alternate. FIFO would put small last (index 12-14).
    last_small = max(i for i, r in enumerate(gate.order) if r == "small@dest.test")
    assert last_small <= 10, gate.order


async def test_limit_counts_survive_a_restart(relay_factory: RelayFactory, sink: Sink) -> None:
    """Messages sent before a restart still count against the current window."""
    first = await relay_factory()
    clock = install_clock(first)
    account = await _user(first, per_minute=2)
    await submit(first, account, ["r@dest.test"], count=2)
    await sink.wait_for(2)
    await eventually(lambda: _no_live(first))
    await first.stop()

    second = await relay_factory()  # same spool
    install_clock(second, clock)  # still the same minute
    [mid] = await submit(second, account, ["r@dest.test"])
    [item] = await eventually(lambda: _waiting(second, 1))
    assert item["id"] == mid and len(sink.messages) == 2
    clock.advance(60)
    second.relay.scheduler.wake()
    await sink.wait_for(3)
