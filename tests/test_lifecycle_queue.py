"""Mail already accepted when an account is disabled or deleted (SEMANTICS §4.1, §4.2):
not-yet-attempted mail is held until enable, retries go on, delete needs an empty queue
or --purge-queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.delivery.agents import AgentPool
from relayd.queue.scheduler import DATA_CACHE_MAX_MESSAGE
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.test_queue_support import install_clock, queued, until

ZERO = {"messages": 0, "recipients": 0}  # an empty queue in a domain delete's answer


async def send(relay: RelayHandle, user: str, pw: str, n: int, tag: str = "m",
               sender: str = "app@example.com") -> list[str]:
    """Submit ``n`` messages on one connection; return their queue ids."""
    c = await relay.client(user, pw)
    ids = []
    for i in range(n):
        _, reply = await c.sendmail(sender, [f"{tag}{i}@dest.test"], message(f"{tag}{i}"))
        ids.append(reply.rsplit(" ", 1)[1])
    await c.quit()
    return ids


def states(relay: RelayHandle, user: str) -> Callable[[], Awaitable[list[str]]]:
    """A probe: the sorted queue states of an account's messages."""
    async def probe() -> list[str]:
        q = await relay.ctl.ok("GET", "/v1/queue", user=user)
        return sorted(i["state"] for i in q["items"])
    return probe


async def limited_account(relay: RelayHandle, sink: Sink) -> tuple[str, str, list[str]]:
    """An account limited to 1 message a minute with 3 accepted: 1 delivered, 2 waiting
    (on a clock that stands still, so the minute cannot roll over while a test looks)."""
    install_clock(relay)
    user, pw = await relay.ctl.add_user()
    info = await relay.ctl.ok("POST", f"/v1/users/{user}/limits", {"per_minute": 1})
    assert info["limits"]["per_minute"] == 1
    ids = await send(relay, user, pw, 3)
    await sink.wait_for(1)
    await until(states(relay, user), ["waiting_limit", "waiting_limit"])
    # the delivered one stops counting once its result is committed
    await until(lambda: queued(relay, user), 2)
    return user, pw, ids


async def test_held_mail_waits_for_enable(relay: RelayHandle, sink: Sink,
                                          account: tuple[str, str]) -> None:
    """Not-yet-attempted mail of a disabled account is held, even once its limit is lifted,
    and is delivered after enable."""
    user, _, ids = await limited_account(relay, sink)
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    held = await relay.ctl.ok("GET", "/v1/queue", state="held")
    assert sorted(i["id"] for i in held["items"]) == sorted(ids[1:])
    # lift the limit (0 = unlimited): the mail stays held while the account is disabled
    await relay.ctl.ok("POST", f"/v1/users/{user}/limits", {"per_minute": 0})
    assert await states(relay, user)() == ["held", "held"]
    # another account's mail goes through meanwhile: the dispatcher did run
    other_user, other_pw = account
    await send(relay, other_user, other_pw, 1, tag="other")
    got = await sink.wait_for(2)
    assert [m.rcpt_tos[0] for m in got] == ["m0@dest.test", "other0@dest.test"]
    assert await states(relay, user)() == ["held", "held"]
    await relay.ctl.ok("POST", f"/v1/users/{user}/enable")
    got = await sink.wait_for(4)
    assert sorted(m.rcpt_tos[0] for m in got[2:]) == ["m1@dest.test", "m2@dest.test"]
    await until(states(relay, user), [])


async def test_held_mail_shows_in_user_views(relay: RelayHandle, sink: Sink) -> None:
    """user show and domain delete report the held messages of a disabled account."""
    await relay.ctl.add_domain("example.com")
    user, _, _ = await limited_account(relay, sink)
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert (info["status"], info["queued"]) == ("disabled", 2)
    r = await relay.ctl.ok("POST", "/v1/domains/example.com/delete",
                           {"confirm": "example.com"})
    assert r == {"name": "example.com", "accounts_disabled": 1, "messages_held": 2,
                 "held": {"messages": 2, "recipients": 2}, "retrying": ZERO, "purged": ZERO}


async def test_deferred_mail_of_disabled_account_keeps_retrying(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """Mail in the retry queue of a disabled account is retried and delivered."""
    user, pw = account
    sink.script.append("451 4.3.0 try later")
    [msg_id] = await send(relay, user, pw, 1)
    await until(states(relay, user), ["deferred"])
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    r = await relay.ctl.ok("POST", "/v1/queue/retry", {})
    assert r == {"count": 1}
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["m0@dest.test"]
    await until(states(relay, user), [])
    log = await relay.ctl.ok("GET", "/v1/log", user=user)
    assert [(e["message_id"], e["outcome"]) for e in reversed(log["entries"])] == [
        (msg_id, "deferred"), (msg_id, "delivered")]


async def test_delete_with_queued_mail_is_refused_with_the_count(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """Delete of an account with 2 queued messages is refused, naming the count."""
    user, _, _ = await limited_account(relay, sink)
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/delete", {"confirm": user})
    assert status == 409 and body["code"] == "queue_not_empty"
    assert "2 queued message(s)" in body["error"] and "--purge-queue" in body["error"]
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["status"] == "active"


async def test_delete_with_purge_queue_removes_the_mail(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """Delete with purge_queue removes the queued messages; they are never delivered."""
    user, _, ids = await limited_account(relay, sink)
    r = await relay.ctl.ok("POST", f"/v1/users/{user}/delete",
                           {"confirm": user, "purge_queue": True})
    assert r == {"username": user, "purged": 2}
    assert (await relay.ctl.ok("GET", "/v1/queue"))["items"] == []
    assert relay.relay.scheduler.queued_count(
        relay.relay.directory.accounts_by_name[user].id) == 0
    row = await relay.relay.spool.fetchone(
        "SELECT COUNT(*) FROM messages WHERE id IN (?,?)",
        [int(i, 16) for i in ids[1:]])
    assert row[0] == 0
    # the relay keeps working for others, and the purged mail never shows up
    other_user, other_pw = account
    await send(relay, other_user, other_pw, 1, tag="other")
    got = await sink.wait_for(2)
    assert [m.rcpt_tos[0] for m in got] == ["m0@dest.test", "other0@dest.test"]


async def test_delete_with_deferred_mail_is_refused(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """Mail in the retry queue counts as queued: delete is refused until purged."""
    user, pw = account
    sink.script.append("451 4.3.0 try later")
    await send(relay, user, pw, 1)
    await until(states(relay, user), ["deferred"])
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/delete", {"confirm": user})
    assert status == 409 and "1 queued message(s)" in body["error"]
    r = await relay.ctl.ok("POST", f"/v1/users/{user}/delete",
                           {"confirm": user, "purge_queue": True})
    assert r["purged"] == 1
    assert await relay.ctl.ok("GET", "/v1/queue", state="deferred") == {"items": []}


async def test_queue_purge_of_held_mail(relay: RelayHandle, sink: Sink,
                                        account: tuple[str, str]) -> None:
    """queue purge removes a disabled account's held mail; enable then sends nothing more."""
    user, _, _ = await limited_account(relay, sink)
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": user, "state": "held"})
    assert r == {"count": 2}
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["queued"] == 0
    await relay.ctl.ok("POST", f"/v1/users/{user}/enable")
    other_user, other_pw = account
    await send(relay, other_user, other_pw, 1, tag="other")
    got = await sink.wait_for(2)
    assert [m.rcpt_tos[0] for m in got] == ["m0@dest.test", "other0@dest.test"]


class GatedSink:
    """A receiving server that holds every message at end of DATA until ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0
        self.more = asyncio.Event()
        self.delivered: list[str] = []
        self.server: asyncio.base_events.Server | None = None
        self.address = ""

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        self.waiting += 1
        self.more.set()
        await self.gate.wait()
        self.delivered.extend(envelope.rcpt_tos)
        self.more.set()
        return "250 2.0.0 OK"

    async def wait(self, probe: Callable[[], bool]) -> None:
        """Wait until ``probe()`` holds (checked at every arrival or delivery)."""
        async def _wait() -> None:
            while not probe():
                self.more.clear()
                await self.more.wait()
        await asyncio.wait_for(_wait(), 10)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: AioSMTP(self, hostname="gated.test"), "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

async def gated_relay(relay_factory: RelayFactory,
                      connections: int) -> tuple[GatedSink, RelayHandle, str, str]:
    """A relay with ``connections`` per host to a GatedSink, example.com and one account."""
    gated = GatedSink()
    await gated.start()
    relay = await relay_factory({"delivery": {"connections_per_host": connections}},
                                smarthost=gated.address)
    await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user()
    return gated, relay, user, pw


async def test_dispatched_but_unattempted_mail_is_held_on_disable(
        relay_factory: RelayFactory) -> None:
    """On disable, transmissions in progress complete and every message not yet attempted
    (even one already handed to a delivery worker) is held."""
    gated, relay, user, pw = await gated_relay(relay_factory, 2)
    await send(relay, user, pw, 12)
    await gated.wait(lambda: gated.waiting == 2)  # both workers are transmitting
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    held = await relay.ctl.ok("GET", "/v1/queue", user=user, state="held")
    assert len(held["items"]) == 10
    gated.gate.set()
    await gated.wait(lambda: len(gated.delivered) >= 2)
    await until(states(relay, user), ["held"] * 10)
    assert len(gated.delivered) == 2, gated.delivered
    await relay.ctl.ok("POST", f"/v1/users/{user}/enable")
    await gated.wait(lambda: len(gated.delivered) == 12)
    assert sorted(gated.delivered) == sorted(f"m{i}@dest.test" for i in range(12))
    assert gated.server is not None
    gated.server.close()


async def test_purging_deferred_mail_frees_the_account_queue(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """After queue purge --state deferred the account's queued count is back to zero."""
    user, pw = account
    sink.script.append("451 4.3.0 try later")
    await send(relay, user, pw, 1)
    await until(states(relay, user), ["deferred"])
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["queued"] == 1
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": user, "state": "deferred"})
    assert r == {"count": 1}
    assert await states(relay, user)() == []
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["queued"] == 0


async def test_purging_a_large_message_removes_its_spool_file(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """A deferred message kept in a file of its own: queue purge removes the file too."""
    from pathlib import Path

    user, pw = account
    sink.script.append("451 4.3.0 try later")
    c = await relay.client(user, pw)
    await c.sendmail("app@example.com", ["big@dest.test"],
                     message("big", body=("P" * 70 + "\r\n") * 5000))
    await c.quit()
    await until(states(relay, user), ["deferred"])
    bodies = Path(relay.relay.spool.bodies.dir)
    assert len(list(bodies.iterdir())) == 1
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": user, "state": "deferred"})
    assert r == {"count": 1}
    assert list(bodies.iterdir()) == []


async def test_purge_by_state_leaves_other_states(relay: RelayHandle, sink: Sink,
                                                  account: tuple[str, str]) -> None:
    """queue purge --state queued leaves mail that is waiting for its sending limit."""
    user, _, _ = await limited_account(relay, sink)
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": user, "state": "queued"})
    assert r == {"count": 0}
    assert await states(relay, user)() == ["waiting_limit", "waiting_limit"]
    r = await relay.ctl.ok("POST", "/v1/queue/purge", {"user": user, "state": "waiting_limit"})
    assert r == {"count": 2}
    assert await states(relay, user)() == []


async def test_domain_delete_counts_only_held_mail(relay: RelayHandle, sink: Sink,
                                                   account: tuple[str, str]) -> None:
    """domain delete reports held mail only: a deferred message keeps retrying, not held."""
    user, pw = account
    sink.script.append("451 4.3.0 try later")
    await send(relay, user, pw, 1)
    await until(states(relay, user), ["deferred"])
    r = await relay.ctl.ok("POST", "/v1/domains/example.com/delete",
                           {"confirm": "example.com"})
    assert r == {"name": "example.com", "accounts_disabled": 1, "messages_held": 0,
                 "held": ZERO, "retrying": {"messages": 1, "recipients": 1}, "purged": ZERO}
    await relay.ctl.ok("POST", "/v1/queue/retry", {})
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ["m0@dest.test"]


async def test_data_loaded_for_attempts_stays_within_its_byte_budget(
        relay_factory: RelayFactory) -> None:
    """Messages too large for the in-memory cache are loaded from the spool for their
    attempt; with a budget for one such message, only one is out at a time however many
    workers there are, and all of them are delivered in the end."""
    gated, relay, user, pw = await gated_relay(relay_factory, 4)
    sched = relay.relay.scheduler
    c = await relay.client(user, pw)
    body = "L" * 70 + "\r\n"
    big = message("big", body=body * 4000)  # ~290 kB: above DATA_CACHE_MAX_MESSAGE
    assert len(big) > DATA_CACHE_MAX_MESSAGE
    budget = len(big) + len(big) // 2  # room for one loaded message only
    sched.queue.cache_budget = sched.dispatcher.load_budget = budget
    for i in range(3):
        await c.sendmail("app@example.com", [f"b{i}@dest.test"], big)
    await c.quit()
    await gated.wait(lambda: gated.waiting == 1)
    await asyncio.sleep(0.3)  # three workers are free: only the budget holds them back
    assert gated.waiting == 1 and 0 < sched.dispatcher.loaded_bytes <= budget
    gated.gate.set()
    await gated.wait(lambda: len(gated.delivered) == 3)
    assert sorted(gated.delivered) == ["b0@dest.test", "b1@dest.test", "b2@dest.test"]
    await until(lambda: _async(sched.dispatcher.loaded_bytes), 0)
    assert gated.server is not None
    gated.server.close()


async def _async(value: int) -> int:
    return value


async def test_jobs_of_both_paths_share_the_agent_connections_so_disable_holds_the_rest(
        relay_factory: RelayFactory) -> None:
    """Large messages go through the workers, small ones through the fast path: both count
    against the agent's connections, so nothing waits inside the agent for a connection.
    With both connections held by large messages, the small ones are still in the send
    queue when the account is disabled: they are held, and enable sends them."""
    gated, relay, user, pw = await gated_relay(relay_factory, 2)
    c = await relay.client(user, pw)
    big = message("big", body=("B" * 70 + "\r\n") * 5000)  # above the in-memory cache limit
    for i in range(2):
        await c.sendmail("app@example.com", [f"big{i}@dest.test"], big)
    await c.quit()
    await gated.wait(lambda: gated.waiting == 2)  # both connections, held at end of DATA
    await send(relay, user, pw, 2, tag="small")
    await asyncio.sleep(0.3)
    agent = relay.relay.agents
    assert isinstance(agent, AgentPool) and sum(len(a.pending) for a in agent._agents) == 2
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    gated.gate.set()
    await gated.wait(lambda: len(gated.delivered) >= 2)
    await until(states(relay, user), ["held", "held"])
    assert sorted(gated.delivered) == ["big0@dest.test", "big1@dest.test"]
    await relay.ctl.ok("POST", f"/v1/users/{user}/enable")
    await gated.wait(lambda: len(gated.delivered) == 4)
    assert sorted(gated.delivered)[2:] == ["small0@dest.test", "small1@dest.test"]
    assert gated.server is not None
    gated.server.close()
