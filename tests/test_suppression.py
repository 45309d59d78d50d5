"""The suppression list end to end: real SMTP submission to a relay delivering to a sink that
refuses one address with ``550 5.1.1``; the control socket and relayctl to list and remove.

The sink's scripted RCPT replies count how often each address was asked for: a suppressed
recipient is never offered to it again.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.procs import REPO
from tests.rawsmtp import Raw
from tests.test_queue_cli import relayctl

pytestmark = pytest.mark.timeout(90)

GONE = "gone@dest.test"
LIST = "/v1/domains/example.com/suppressions"


class Asked(dict[str, str]):
    """A sink's ``rcpt_script`` that counts the RCPTs it is asked about, per address."""

    def __init__(self, replies: dict[str, str]) -> None:
        super().__init__(replies)
        self.count: Counter[str] = Counter()

    def get(self, address: str, default: Any = None) -> Any:
        self.count[address.lower()] += 1
        return super().get(address, default)


async def setup(relay: RelayHandle, domain: str = "example.com") -> tuple[str, str]:
    await relay.ctl.add_domain(domain)
    return await relay.ctl.add_user(domain)


async def send(relay: RelayHandle, account: tuple[str, str], rcpt: str,
               sender: str = "app@example.com") -> str:
    """Submit one message over SMTP; its id."""
    raw = await Raw.open(relay.host, relay.port)
    try:
        assert (await raw.login(*account)).startswith("235 ")
        reply = await raw.transaction(sender, [rcpt], message(f"to {rcpt}", sender=sender,
                                                               to=rcpt))
        assert reply.startswith("250 2.0.0 "), reply
        return reply.rsplit(" ", 1)[1]
    finally:
        raw.close()


async def outcome(relay: RelayHandle, msg_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """The final log entry of a message's (only) recipient, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        entries = (await relay.ctl.ok("GET", "/v1/log", message=msg_id))["entries"]
        final = [e for e in entries if e["outcome"] not in ("queued", "deferred")]
        if final:
            return final[-1]
        assert time.monotonic() < deadline, entries
        await asyncio.sleep(0.05)


async def dsn_for(sink: Sink, msg_id: str, timeout: float = 20.0) -> bytes:
    """The DSN the sink received about ``msg_id``."""
    deadline = time.monotonic() + timeout
    while True:
        for m in sink.messages:
            if m.mail_from in ("", "<>") and msg_id.encode() in m.data:
                return m.data
        assert time.monotonic() < deadline, [m.rcpt_tos for m in sink.messages]
        await asyncio.sleep(0.05)


async def listed(relay: RelayHandle, path: str = LIST) -> list[str]:
    return [e["address"] for e in (await relay.ctl.ok("GET", path))["entries"]]


async def suppressed_after_first_bounce(relay: RelayHandle, sink: Sink,
                                        account: tuple[str, str]) -> None:
    """The first message to GONE bounces (5.1.1) and GONE is listed."""
    first = await send(relay, account, GONE)
    e = await outcome(relay, first)
    assert (e["outcome"], e["code"]) == ("failed", 550)
    assert b"5.1.1" in await dsn_for(sink, first)
    deadline = time.monotonic() + 10
    while await listed(relay) != [GONE]:  # written in the background
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def metric(relay: RelayHandle, line: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(relay.metrics_url) as resp:
        text = await resp.text()
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    raise AssertionError(f"{line} not in the metrics")


async def test_a_5_1_1_suppresses_the_recipient(relay_factory: RelayFactory, sink: Sink) -> None:
    """After one ``550 5.1.1``, later messages to the address (any case in its domain part)
    are not offered to the next hop: they fail at once as ``suppressed`` with a DSN saying
    so, since when and why; relayctl lists the entry."""
    sink.rcpt_script = asked = Asked({GONE: "550 5.1.1 No such user here"})
    relay = await relay_factory()
    account = await setup(relay)
    await suppressed_after_first_bounce(relay, sink, account)
    assert asked.count[GONE] == 1

    second = await send(relay, account, "gone@DEST.TEST")
    e = await outcome(relay, second)
    assert e["outcome"] == "suppressed" and e["next_hop"] == "-"
    assert "suppressed" in e["text"] and "No such user here" in e["text"]
    dsn = await dsn_for(sink, second)
    assert b"suppressed" in dsn and b"5.1.1" in dsn and b"No such user here" in dsn
    assert asked.count[GONE] == 1  # never offered to the sink again
    assert await metric(relay, 'relayd_delivery_attempts_total{outcome="suppressed"}') == 1
    assert [x["outcome"] for x in (await relay.ctl.ok(
        "GET", "/v1/log", status="suppressed"))["entries"]] == ["suppressed"]

    shown = await relayctl(relay, "suppression", "list", "example.com")
    assert shown["total"] == 1 and shown["entries"][0]["address"] == GONE
    assert "5.1.1" in shown["entries"][0]["reason"]
    assert shown["entries"][0]["expires"] == pytest.approx(
        shown["entries"][0]["since"] + 30 * 86400)


async def test_policy_rejection_does_not_suppress(relay_factory: RelayFactory,
                                                  sink: Sink) -> None:
    """A ``550 5.7.1`` (policy, reputation) fails the recipient but does not suppress it:
    the next message is offered to the next hop again."""
    blocked = "blocked@dest.test"
    sink.rcpt_script = asked = Asked({blocked: "550 5.7.1 Rejected by policy"})
    relay = await relay_factory()
    account = await setup(relay)
    for n in (1, 2):
        e = await outcome(relay, await send(relay, account, blocked))
        assert e["outcome"] == "failed"
        assert asked.count[blocked] == n
    assert await listed(relay) == []


async def test_remove_then_delivered(relay_factory: RelayFactory, sink: Sink) -> None:
    """relayctl suppression remove: the next message is sent (and delivered); removing it
    again, or from an unknown domain, is a 404 with a one-line error."""
    sink.rcpt_script = asked = Asked({GONE: "550 5.1.1 No such user"})
    relay = await relay_factory()
    account = await setup(relay)
    await suppressed_after_first_bounce(relay, sink, account)
    done = await relayctl(relay, "suppression", "remove", "example.com", GONE)
    assert (done["domain"], done["count"]) == ("example.com", 1)
    assert await listed(relay) == []
    del asked[GONE]  # the mailbox exists again
    e = await outcome(relay, await send(relay, account, GONE))
    assert e["outcome"] == "delivered" and asked.count[GONE] == 2
    assert any(GONE in m.rcpt_tos for m in sink.messages)

    status, body = await relay.ctl.call("POST", LIST + "/remove", {"address": GONE})
    assert (status, body["code"]) == (404, "not_found")
    status, body = await relay.ctl.call("GET", "/v1/domains/nope.test/suppressions")
    assert (status, body["code"]) == (404, "not_found")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "--socket", relay.ctl.path, "suppression",
        "remove", "example.com", GONE, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await proc.communicate()
    assert proc.returncode != 0 and out == b""
    assert len(err.decode().strip().splitlines()) == 1 and b"not suppressed" in err


async def test_entries_expire(relay_factory: RelayFactory, sink: Sink) -> None:
    """30 days (the default) after the failure, the entry no longer applies nor is listed."""
    sink.rcpt_script = asked = Asked({GONE: "550 5.1.1 No such user"})
    relay = await relay_factory()
    account = await setup(relay)
    await suppressed_after_first_bounce(relay, sink, account)
    later = time.time() + 31 * 86400
    relay.relay.scheduler.dispatcher.clock = lambda: later
    relay.relay.lifecycle.clock = lambda: later
    e = await outcome(relay, await send(relay, account, GONE))
    assert e["outcome"] == "failed" and asked.count[GONE] == 2  # offered again
    assert await listed(relay) == [GONE]  # ... and suppressed again, from then on


async def test_restart_keeps_the_list(relay_factory: RelayFactory, sink: Sink,
                                      tmp_path: Path) -> None:
    """The list is in the spool's database: after a restart the address is still
    suppressed and another domain (its own list) still sends to it."""
    sink.rcpt_script = asked = Asked({GONE: "550 5.1.1 No such user"})
    relay = await relay_factory()
    account = await setup(relay)
    other = await setup(relay, "other.test")
    await suppressed_after_first_bounce(relay, sink, account)
    await relay.stop()

    relay = await relay_factory(data=tmp_path)
    assert await listed(relay) == [GONE]
    e = await outcome(relay, await send(relay, account, GONE))
    assert e["outcome"] == "suppressed" and asked.count[GONE] == 1
    e = await outcome(relay, await send(relay, other, GONE, sender="app@other.test"))
    assert e["outcome"] == "failed" and asked.count[GONE] == 2
    assert await listed(relay, "/v1/domains/other.test/suppressions") == [GONE]


async def test_operator_add_and_bad_input(relay_factory: RelayFactory, sink: Sink) -> None:
    """relayctl suppression add (an import) suppresses at once; a bad address is a 400."""
    sink.rcpt_script = asked = Asked({})
    relay = await relay_factory()
    account = await setup(relay)
    added = await relayctl(relay, "suppression", "add", "example.com", "x@Dest.Test",
                           "--reason", "imported")
    assert added["count"] == 1
    assert await listed(relay) == ["x@dest.test"]
    e = await outcome(relay, await send(relay, account, "x@dest.test"))
    assert e["outcome"] == "suppressed" and "imported" in e["text"]
    assert asked.count["x@dest.test"] == 0
    status, body = await relay.ctl.call("POST", LIST, {"addresses": ["no at sign"]})
    assert (status, body["code"]) == (400, "invalid_address")


async def test_a_reply_after_rcpt_does_not_suppress(relay_factory: RelayFactory,
                                                    sink: Sink) -> None:
    """A ``550 5.1.1`` to the end of DATA (so not to the recipient's RCPT: about the message
    or the sender) fails the recipient without suppressing it."""
    sink.rcpt_script = asked = Asked({})
    sink.script.append("550 5.1.1 No such user")
    relay = await relay_factory()
    account = await setup(relay)
    e = await outcome(relay, await send(relay, account, GONE))
    assert (e["outcome"], e["code"]) == ("failed", 550)
    e = await outcome(relay, await send(relay, account, GONE))
    assert e["outcome"] == "delivered" and asked.count[GONE] == 2
    assert await listed(relay) == []


@pytest.mark.parametrize(("code", "text", "expected"), [
    (550, "5.1.1 No such user", True),
    (550, "5.1.10 Null MX", True),
    (551, "5.1.6 Moved", True),
    (550, "5.2.1 Mailbox disabled", True),
    (550, "No such user here", True),
    (553, "mailbox name not allowed", True),
    (551, "User not local", True),
    (550, "5.7.1 Rejected by policy", False),
    (554, "5.7.1 Spam", False),
    (552, "5.2.2 Mailbox full", False),
    (552, "5.3.4 Too big", False),
    (550, "5.4.4 Unable to route", False),
    (554, "Transaction failed", False),
    (450, "4.1.1 Try later", False),
    (None, "connection refused", False),
])
def test_which_replies_suppress(code: int | None, text: str, expected: bool) -> None:
    from relayd.directory.suppression import suppresses
    assert suppresses(code, text) is expected


def test_addresses_compare_by_domain_case_only() -> None:
    from relayd.directory.suppression import Suppressions
    mem = Suppressions(ttl=100.0)
    mem.learn(1, "Bob@Dest.Test", 550, "5.1.1 No such user", now=1000.0)
    assert mem.find(1, "Bob@dest.test", 1001.0) is not None
    assert mem.find(1, "bob@dest.test", 1001.0) is None  # the local part as stored
    assert mem.find(2, "Bob@dest.test", 1001.0) is None  # another domain
    assert mem.find(1, "Bob@dest.test", 1100.0) is None  # expired
    assert mem.remove(1, "Bob@DEST.test") and not mem.has_any(1)
