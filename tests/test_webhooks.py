"""Issue 16 item 5: delivery events pushed to a domain's webhook.

A real relay (real SMTP submission, real control socket) delivering to the test's sink;
the webhook is a real aiohttp server on loopback. What is proven: delivered, failed (a
550 at the sink) and bounced (queue lifetime exceeded) recipients each give one signed
event whose HMAC verifies with the secret printed once; the secret is never shown again;
a webhook that is down keeps the events across a restart, and they are posted when it
comes back; the cap drops the oldest events and the metric counts them; a domain without
a webhook stores nothing; removing the webhook drops its events (counted); a bad URL is a
400 naming the field; relayctl sets and shows it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relayd.webhooks.policy import (
    SIGNATURE_HEADER,
    check_url,
    retry_delay,
    signature_header,
    verify,
)
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.procs import free_port

REPO = Path(__file__).resolve().parent.parent
FAST = {"webhooks": {"retry_first_seconds": 0.2, "retry_max_seconds": 0.5,
                     "timeout_seconds": 2.0}}


class Hook:
    """A webhook receiver on loopback: records every post; answers ``status``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def start(self) -> Hook:
        async def handle(request: web.Request) -> web.Response:
            self.posts.append((dict(request.headers), await request.read()))
            self.arrived.set()
            return web.Response(status=self.status, text="noted")
        app = web.Application()
        app.router.add_post("/events", handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _h, body in self.posts]

    async def wait_for(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        async def wait() -> None:
            while len({e["id"] for e in self.events()}) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(wait(), timeout)
        return self.events()


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    h = await Hook().start()
    yield h
    await h.stop()


async def _send(relay: RelayHandle, user: str, password: str, rcpts: list[str],
                subject: str = "hook") -> None:
    c = await relay.client(user, password)
    await c.sendmail("app@example.com", rcpts, message(subject))
    await c.quit()


async def _set_hook(relay: RelayHandle, url: str) -> str:
    info = await relay.ctl.ok("POST", "/v1/domains/example.com/settings", {"webhook": url})
    assert info["webhook_url"] == url
    secret: str = info["webhook_secret"]
    assert secret
    return secret


async def _stored(relay: RelayHandle) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await relay.relay.spool.fetchall(
        "SELECT id, domain, body, attempts FROM webhook_events ORDER BY id")]


async def _until(check: Callable[[], Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _metric(relay: RelayHandle, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(relay.metrics_url) as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_delivered_and_failed_events_signed(relay: RelayHandle, sink: Sink,
                                                  hook: Hook) -> None:
    """One event per final recipient, each with a signature that verifies with the secret
    shown once; `domain show` never shows the secret."""
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    secret = await _set_hook(relay, hook.url)
    shown = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert shown["webhook_url"] == hook.url and shown["webhook_secret"] is None
    sink.rcpt_script["gone@dest.test"] = "550 5.1.1 no such user"
    await _send(relay, user, password, ["ok@dest.test", "gone@dest.test"])
    events = await hook.wait_for(2)
    by_rcpt = {e["recipient"]: e for e in events}
    ok, gone = by_rcpt["ok@dest.test"], by_rcpt["gone@dest.test"]
    assert ok["outcome"] == "delivered" and ok["reply"].startswith("250")
    assert gone["outcome"] == "failed" and gone["reply"].startswith("550 5.1.1")
    for e in (ok, gone):
        assert e["account"] == user and e["domain"] == "example.com"
        assert e["attempts"] == 1 and len(e["message_id"]) == 16
        assert abs(e["time"] - time.time()) < 60
    assert ok["id"] != gone["id"] and ok["message_id"] == gone["message_id"]
    for headers, body in hook.posts:
        sig = headers[SIGNATURE_HEADER]
        assert verify(secret, sig, body, time.time())
        assert not verify(secret + "x", sig, body, time.time())
        assert not verify(secret, sig, body + b" ", time.time())
        assert not verify(secret, sig, body, time.time() + 3600)  # a replay, later
    await _until(lambda: _empty(relay))  # posted events are deleted
    assert await _metric(relay, "relayd_webhook_posts_total") >= 2


async def _empty(relay: RelayHandle) -> bool:
    return not await _stored(relay)


async def test_expired_recipient_is_bounced(relay_factory: RelayFactory, sink: Sink,
                                            hook: Hook) -> None:
    """A recipient relayd gives up on (queue lifetime) is a `bounced` event; relayd's own
    DSN to the sender gives none."""
    relay = await relay_factory({"delivery": {"max_queue_lifetime_seconds": 0.001}})
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    await _set_hook(relay, hook.url)
    sink.rcpt_script["later@dest.test"] = "451 4.3.0 try again later"
    await _send(relay, user, password, ["later@dest.test"])
    events = await hook.wait_for(1)
    await sink.wait_for(1)  # the DSN, delivered to the sender
    await asyncio.sleep(0.5)
    assert [e["outcome"] for e in hook.events()] == ["bounced"]
    assert events[0]["reply"].startswith("451 4.4.7")


async def test_down_webhook_keeps_events_across_restart(relay_factory: RelayFactory,
                                                        tmp_path: Path, sink: Sink) -> None:
    """Refused connections: the event stays stored with its failed posts counted, survives
    a restart, and is posted (same id) once the webhook answers."""
    down = Hook()
    relay = await relay_factory(FAST, data=tmp_path)
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    secret = await _set_hook(relay, down.url)
    await _send(relay, user, password, ["ok@dest.test"])
    await sink.wait_for(1)

    async def retried() -> bool:
        rows = await _stored(relay)
        return len(rows) == 1 and rows[0][3] >= 2
    await _until(retried)
    event_id = json.loads((await _stored(relay))[0][2])["id"]
    assert await _metric(relay, "relayd_webhook_posts_total{result=\"failed\"}") >= 2
    assert await _metric(relay, "relayd_webhook_backlog") == 1
    await relay.stop()

    relay = await relay_factory(FAST, data=tmp_path)
    up = await Hook(down.port).start()
    try:
        events = await up.wait_for(1)
        assert [e["id"] for e in events][:1] == [event_id]
        headers, body = up.posts[0]
        assert verify(secret, headers[SIGNATURE_HEADER], body, time.time())
        await _until(lambda: _empty(relay))
    finally:
        await up.stop()


async def test_cap_drops_the_oldest_and_counts(relay_factory: RelayFactory, sink: Sink) -> None:
    """Past [webhooks] max_events the oldest events go, counted in the metric."""
    down = Hook()
    relay = await relay_factory({"webhooks": {"max_events": 3, "retry_first_seconds": 60.0}})
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    await _set_hook(relay, down.url)
    for n in range(6):
        await _send(relay, user, password, [f"r{n}@dest.test"], subject=f"m{n}")
    await sink.wait_for(6)

    async def six_recorded() -> bool:
        return await _metric(relay, "relayd_webhook_events_dropped_total") >= 3
    await _until(six_recorded)
    rows = await _stored(relay)
    assert len(rows) == 3
    assert sorted(json.loads(r[2])["recipient"] for r in rows) == \
        ["r3@dest.test", "r4@dest.test", "r5@dest.test"]
    assert await _metric(relay, "relayd_webhook_events_dropped_total") == 3


async def test_no_webhook_stores_nothing_and_removal_drops(relay: RelayHandle, sink: Sink,
                                                           hook: Hook) -> None:
    """Without a webhook no event is written; removing a webhook drops its stored events
    (counted) and stops new ones."""
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    await _send(relay, user, password, ["a@dest.test"])
    await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert await _stored(relay) == []
    assert hook.posts == []
    hook.status = 503  # the webhook answers, but not 2xx: kept
    info = await relay.ctl.ok("POST", "/v1/domains/example.com/settings",
                              {"webhook": hook.url})
    await _send(relay, user, password, ["b@dest.test"])
    await hook.wait_for(1)
    assert len(await _stored(relay)) == 1
    assert info["webhook_secret"]
    gone = await relay.ctl.ok("POST", "/v1/domains/example.com/settings", {"webhook": "off"})
    assert gone["webhook_url"] is None
    assert await _stored(relay) == []

    async def counted() -> bool:  # the poster's next round counts it
        return await _metric(relay, "relayd_webhook_events_dropped_total") == 1
    await _until(counted)
    await _send(relay, user, password, ["c@dest.test"])
    await sink.wait_for(3)
    await asyncio.sleep(0.3)
    assert await _stored(relay) == []


async def test_rotation_and_validation(relay: RelayHandle, hook: Hook) -> None:
    """A bad URL is a 400 naming the field; the secret changes only when rotated."""
    await relay.ctl.add_domain("example.com")
    for bad in ("ftp://x.test/", "not a url", "http://", "http://u:p@x.test/"):
        status, body = await relay.ctl.call("POST", "/v1/domains/example.com/settings",
                                            {"webhook": bad})
        assert status == 400 and "webhook" in body["error"], (bad, body)
    status, body = await relay.ctl.call("POST", "/v1/domains/example.com/settings",
                                        {"rotate_webhook_secret": True})
    assert status == 400
    first = await _set_hook(relay, hook.url)
    again = await relay.ctl.ok("POST", "/v1/domains/example.com/settings",
                               {"webhook": hook.url + "?v=2"})
    assert again["webhook_secret"] is None  # same secret, new URL
    rotated = await relay.ctl.ok("POST", "/v1/domains/example.com/settings",
                                 {"rotate_webhook_secret": True})
    assert rotated["webhook_secret"] and rotated["webhook_secret"] != first
    dom = relay.relay.directory.active_domain("example.com")
    assert dom is not None and dom.webhook_secret == rotated["webhook_secret"]


async def test_relayctl_domain_set_webhook(relay: RelayHandle, hook: Hook) -> None:
    """relayctl prints the secret once when it sets the webhook; `show` gives the URL only."""
    await relay.ctl.add_domain("example.com")

    async def ctl(*args: str) -> tuple[int, str, str]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control.cli", "--socket", relay.ctl.path, *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await ctl("domain", "set", "example.com", "--webhook", hook.url)
    assert code == 0, err
    dom = relay.relay.directory.active_domain("example.com")
    secret = dom.webhook_secret if dom is not None else None
    assert secret and secret in out and hook.url in out
    code, out, err = await ctl("domain", "show", "example.com")
    assert code == 0 and hook.url in out and secret not in out
    code, out, err = await ctl("domain", "set", "example.com", "--webhook", "gopher://x")
    assert code != 0 and "webhook" in err and len(err.strip().splitlines()) == 1
    code, out, err = await ctl("domain", "set", "example.com", "--webhook", "off")
    assert code == 0 and "webhook: none" in out


def test_pure_rules() -> None:
    """The URL check, the signature format and the backoff."""
    import random
    assert check_url("https://app.example/hooks/relayd") is None
    assert check_url("http://127.0.0.1:8080/x?a=1") is None
    assert check_url("https://x.test/#frag") is not None
    assert check_url("http://x.test:99999/") is not None
    header = signature_header("s", 1700000000, b'{"a":1}')
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify("s", header, b'{"a":1}', 1700000100)
    rng = random.Random(1)
    delays = [retry_delay(n, 10.0, 100.0, rng) for n in range(1, 8)]
    assert 8.0 <= delays[0] <= 10.0 and all(d <= 100.0 for d in delays)
    assert delays[3] > delays[1] and delays[-1] >= 80.0


async def test_domain_delete_drops_its_events(relay: RelayHandle, sink: Sink,
                                              hook: Hook) -> None:
    """Deleting a domain ends its webhook: its stored events are dropped and counted."""
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    hook.status = 500
    await _set_hook(relay, hook.url)
    await _send(relay, user, password, ["a@dest.test", "b@dest.test"])
    await hook.wait_for(1)
    assert len(await _stored(relay)) == 2
    await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
    assert await _stored(relay) == []
    assert relay.relay.spool.hooks.domains == frozenset()

    async def counted() -> bool:
        return await _metric(relay, "relayd_webhook_events_dropped_total") == 2
    await _until(counted)


async def test_purged_recipient_event(relay: RelayHandle, sink: Sink, hook: Hook) -> None:
    """A deferred recipient removed by `queue purge` gives a `purged` event (reply: what
    removed it), written in the purge's own transaction."""
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    secret = await _set_hook(relay, hook.url)
    sink.rcpt_script["later@dest.test"] = "451 4.3.0 try again later"
    await _send(relay, user, password, ["later@dest.test"])

    async def deferred() -> bool:
        q = await relay.ctl.ok("GET", "/v1/queue", state="deferred")
        return bool(q["items"])
    await _until(deferred)
    assert hook.posts == []  # a deferral is no event
    await relay.ctl.ok("POST", "/v1/queue/purge", {"user": user})
    [event] = await hook.wait_for(1)
    assert event["outcome"] == "purged" and event["recipient"] == "later@dest.test"
    assert "queue purge" in event["reply"] and event["attempts"] == 0
    headers, body = hook.posts[0]
    assert verify(secret, headers[SIGNATURE_HEADER], body, time.time())


async def test_suppressed_recipient_event(relay: RelayHandle, sink: Sink, hook: Hook) -> None:
    """A recipient on the domain's suppression list is not sent: its event says
    `suppressed`, with the reason it was listed, and the sink never saw it."""
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    await _set_hook(relay, hook.url)
    await relay.ctl.ok("POST", "/v1/domains/example.com/suppressions",
                       {"addresses": ["gone@dest.test"], "reason": "imported list"})
    await _send(relay, user, password, ["gone@dest.test", "ok@dest.test"])
    events = {e["recipient"]: e for e in await hook.wait_for(2)}
    assert events["gone@dest.test"]["outcome"] == "suppressed"
    assert "imported list" in events["gone@dest.test"]["reply"]
    assert events["ok@dest.test"]["outcome"] == "delivered"
    assert all("gone@dest.test" not in m.rcpt_tos for m in sink.messages)
