"""End to end: a scripted mix of SMTP sessions, then exact values on /metrics.

A real relay (in the test's loop), real sockets, a real receiving server;
every counter is read back from the Prometheus endpoint as a scraper sees it.
"""

from __future__ import annotations

import asyncio

import pytest

from relayd.smtp.replies import REJECTION_REASONS
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.procs import free_port
from tests.rawsmtp import Raw, plain
from tests.test_ops_support import Samples, scrape, value

MIX_CONFIG = {"smtp": {"max_recipients": 2, "max_message_size_bytes": 2000}}

#: Rejections the mix causes, by reason; every other reason stays at zero.
EXPECTED_REJECTIONS = {
    "auth_failed": 2,          # wrong password, unknown user (535, same wire text)
    "auth_required": 1,        # MAIL without AUTH
    "sender_not_allowed": 1,   # MAIL FROM outside the account's domain
    "too_many_recipients": 1,  # third RCPT with max_recipients = 2
    "size": 2,                 # SIZE= too large at MAIL, and an oversize body
}


async def _session_mix(h: RelayHandle, user: str, password: str) -> None:
    """The scripted sessions (one behaviour each); asserts the wire replies."""
    c = await Raw.open(h.host, h.port)  # 1: AUTH (first: argon2) and send
    assert (await c.login(user, password)).startswith("235 ")
    assert (await c.transaction("app@example.com", ["a@dest.test"], message())).startswith("250 ")
    await c.quit()

    c = await Raw.open(h.host, h.port)  # 2: AUTH again (answered from the cache)
    assert (await c.login(user, password)).startswith("235 ")
    # 3: too many recipients, the message still goes to the first two
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<b@dest.test>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<c@dest.test>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<d@dest.test>")).startswith("452 ")
    assert (await c.cmd("DATA")).startswith("354 ")
    await c.send(message() + b"\r\n.\r\n")
    assert (await c.reply()).startswith("250 ")
    # 4: foreign sender
    assert (await c.cmd("MAIL FROM:<app@other.test>")).startswith("553 ")
    # 5: declared size too large
    assert (await c.cmd("MAIL FROM:<app@example.com> SIZE=999999")).startswith("552 ")
    # 6: actual body too large
    reply = await c.transaction("app@example.com", ["e@dest.test"],
                                message(body="x" * 70 + "\r\n") * 40)
    assert reply.startswith("552 "), reply
    await c.quit()

    c = await Raw.open(h.host, h.port)  # 7: wrong password for a known (cached) account
    assert (await c.login(user, password + "x")).startswith("535 ")
    await c.quit()
    c = await Raw.open(h.host, h.port)  # 8: unknown user
    assert (await c.login("nobody-here", password)).startswith("535 ")
    await c.quit()
    c = await Raw.open(h.host, h.port)  # 9: MAIL without AUTH
    assert (await c.cmd("EHLO client.test")).startswith("250")
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("530 ")
    await c.quit()


async def _settled(h: RelayHandle, predicate: str, timeout: float = 10.0) -> Samples:
    """Scrape until ``predicate`` (a Python expression over ``m``) holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        m = await scrape(h.metrics_url)
        if eval(predicate, {"value": value, "m": m}):  # noqa: S307 (test-local expressions)
            return m
        if asyncio.get_running_loop().time() > deadline:
            return m
        await asyncio.sleep(0.05)


@pytest.fixture
async def mixed(relay_factory: RelayFactory, sink: Sink) -> Samples:
    """A relay after the scripted session mix, all deliveries done."""
    h = await relay_factory(MIX_CONFIG)
    await h.ctl.add_domain("example.com")
    user, password = await h.ctl.add_user("example.com")
    await _session_mix(h, user, password)
    await sink.wait_for(2)
    return await _settled(
        h, "value(m, 'relayd_delivery_attempts_total', outcome='delivered') == 3"
        " and value(m, 'relayd_smtp_sessions_active') == 0"
        " and value(m, 'relayd_messages_in_flight') == 0")


@pytest.mark.slow
async def test_rejections_are_counted_exactly_by_reason(mixed: Samples) -> None:
    """Each refusal of the mix adds one to its reason's row and to no other row."""
    got = {r: value(mixed, "relayd_smtp_rejections_total", reason=r) for r in REJECTION_REASONS}
    assert got == {r: float(EXPECTED_REJECTIONS.get(r, 0)) for r in REJECTION_REASONS}


@pytest.mark.slow
async def test_auth_results_are_counted(mixed: Samples) -> None:
    """Two successful and two failed AUTH give success=2 and failure=2."""
    assert value(mixed, "relayd_auth_total", result="success") == 2
    assert value(mixed, "relayd_auth_total", result="failure") == 2


@pytest.mark.slow
async def test_credential_cache_hits_and_misses(mixed: Samples) -> None:
    """A repeated login is a hit; the first login and a wrong password are misses."""
    assert value(mixed, "relayd_credential_cache_hits_total") == 1
    assert value(mixed, "relayd_credential_cache_misses_total") == 2


@pytest.mark.slow
async def test_connections_and_active_sessions(mixed: Samples) -> None:
    """Five connections were made and none is open once the clients quit."""
    assert value(mixed, "relayd_smtp_connections_total") == 5
    assert value(mixed, "relayd_smtp_sessions_active") == 0


@pytest.mark.slow
async def test_accepted_messages_and_their_durations(mixed: Samples) -> None:
    """Two 250s: the accepted counter and the accept histogram both count two."""
    assert value(mixed, "relayd_messages_accepted_total") == 2
    assert value(mixed, "relayd_accept_duration_seconds_count") == 2
    assert value(mixed, "relayd_accept_duration_seconds_sum") > 0


@pytest.mark.slow
async def test_group_commit_batches_hold_every_accepted_message(mixed: Samples) -> None:
    """The batch-size histogram sums to at least the two accepted messages."""
    assert value(mixed, "relayd_spool_commit_batch_size_count") >= 1
    assert value(mixed, "relayd_spool_commit_batch_size_sum") >= 2


@pytest.mark.slow
async def test_delivery_attempts_and_durations(mixed: Samples) -> None:
    """Three recipients delivered: three attempts, three durations, none in flight."""
    assert value(mixed, "relayd_delivery_attempts_total", outcome="delivered") == 3
    assert value(mixed, "relayd_delivery_attempts_total", outcome="deferred") == 0
    assert value(mixed, "relayd_delivery_attempts_total", outcome="failed") == 0
    assert value(mixed, "relayd_delivery_duration_seconds_count") == 3
    assert value(mixed, "relayd_messages_in_flight") == 0


@pytest.mark.slow
async def test_queue_gauge_is_fresh_at_scrape_time(relay_factory: RelayFactory) -> None:
    """A deferred message shows in relayd_queue_messages at the next scrape, not minutes later."""
    h = await relay_factory({"spool": {"last_connection_flush_seconds": 3600.0}},
                            smarthost=f"127.0.0.1:{free_port()}")  # nothing listens there
    await h.ctl.add_domain("example.com")
    user, password = await h.ctl.add_user("example.com")
    c = await Raw.open(h.host, h.port)
    assert (await c.login(user, password)).startswith("235 ")
    assert (await c.transaction("app@example.com", ["a@dest.test"], message())).startswith("250 ")
    await c.quit()
    for _ in range(200):
        status = await h.ctl.ok("GET", "/v1/status")
        if status["queue"]["deferred"] == 1:
            break
        await asyncio.sleep(0.05)
    m = await scrape(h.metrics_url)
    assert value(m, "relayd_queue_messages", state="deferred") == 1
    assert value(m, "relayd_queue_messages", state="queued") == 0
    assert value(m, "relayd_delivery_attempts_total", outcome="deferred") == 1


async def _rejections(h: RelayHandle) -> dict[str, float]:
    """The non-zero rows of relayd_smtp_rejections_total."""
    m = await scrape(h.metrics_url)
    rows = {r: value(m, "relayd_smtp_rejections_total", reason=r) for r in REJECTION_REASONS}
    return {r: v for r, v in rows.items() if v}


async def _relay_with_account(relay_factory: RelayFactory,
                              extra: dict[str, object] | None = None,
                              ) -> tuple[RelayHandle, str, str]:
    h = await relay_factory(extra or {})
    await h.ctl.add_domain("example.com")
    user, password = await h.ctl.add_user("example.com")
    return h, user, password


@pytest.mark.slow
async def test_disabled_and_deleted_accounts_have_their_own_535_rows(
        relay_factory: RelayFactory) -> None:
    """The same 535 on the wire is counted as account_disabled, then account_deleted."""
    h, user, password = await _relay_with_account(relay_factory)
    await h.ctl.ok("POST", f"/v1/users/{user}/disable")
    c = await Raw.open(h.host, h.port)
    reply = await c.login(user, password)
    assert reply == "535 5.7.8 Authentication credentials invalid"
    await c.quit()
    await h.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user})
    c = await Raw.open(h.host, h.port)
    assert await c.login(user, password) == reply
    await c.quit()
    assert await _rejections(h) == {"account_disabled": 1, "account_deleted": 1}


@pytest.mark.slow
async def test_plaintext_auth_refusal_is_counted(relay_factory: RelayFactory) -> None:
    """AUTH without TLS from a network not allowed plaintext AUTH: 538, auth_needs_tls."""
    h, user, password = await _relay_with_account(
        relay_factory, {"smtp": {"plaintext_auth_networks": []}})
    c = await Raw.open(h.host, h.port)
    assert (await c.login(user, password)).startswith("538 ")
    await c.quit()
    assert await _rejections(h) == {"auth_needs_tls": 1}


@pytest.mark.slow
async def test_bare_lf_in_data_is_counted(relay_factory: RelayFactory) -> None:
    """A body with a bare LF gets 550 5.5.2 and counts as bad_line_ending."""
    h, user, password = await _relay_with_account(relay_factory)
    c = await Raw.open(h.host, h.port)
    assert (await c.login(user, password)).startswith("235 ")
    reply = await c.transaction("app@example.com", ["a@dest.test"],
                                b"Subject: x\r\n\r\nbare\nline\r\n")
    assert reply.startswith("550 5.5.2")
    await c.quit()
    assert await _rejections(h) == {"bad_line_ending": 1}


@pytest.mark.slow
async def test_full_account_queue_is_counted(relay_factory: RelayFactory) -> None:
    """Past max_queued_per_account MAIL gets 452 4.3.1, counted as queue_full."""
    h = await relay_factory({"limits": {"max_queued_per_account": 1}},
                            smarthost=f"127.0.0.1:{free_port()}")
    await h.ctl.add_domain("example.com")
    user, password = await h.ctl.add_user("example.com")
    c = await Raw.open(h.host, h.port)
    assert (await c.login(user, password)).startswith("235 ")
    assert (await c.transaction("app@example.com", ["a@dest.test"], message())).startswith("250 ")
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("452 4.3.1")
    await c.quit()
    assert await _rejections(h) == {"queue_full": 1}


@pytest.mark.slow
async def test_too_many_failed_auth_is_counted(relay_factory: RelayFactory) -> None:
    """After the allowed failures the client gets 421 4.7.0, counted as auth_rate_limited."""
    h, user, _ = await _relay_with_account(
        relay_factory, {"smtp": {"auth_failures_before_delay": 5,
                                 "auth_failures_before_disconnect": 2}})
    c = await Raw.open(h.host, h.port)
    assert (await c.login(user, "wrong")).startswith("535 ")
    assert (await c.cmd(f"AUTH PLAIN {plain(user, 'wrong again')}")).startswith("535 ")
    assert (await c.reply()).startswith("421 ")
    c.close()
    assert await _rejections(h) == {"auth_failed": 2, "auth_rate_limited": 1}
