"""The failed-AUTH throttle (issue 12, item 5): per (client address, username) first, per
address only past many distinct usernames; attempts count from their start; the same
password through a second mechanism counts once; exempt networks; ``relayctl throttle``.

Over real sockets against the in-process relay, clients bound to their own 127.0.0.x
source address (so each test's throttle state is its own), plus pure tests of
relayd.smtp.policy.AuthThrottle with an injected clock.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from typing import Any

import pytest

from relayd.smtp import replies
from relayd.smtp.policy import AuthThrottle
from tests.conftest import RelayFactory, RelayHandle
from tests.rawsmtp import Raw, plain
from tests.test_ops_support import scrape, value
from tests.test_relayctl import relayctl

pytestmark = pytest.mark.timeout(120)

INVALID = "535 5.7.8 Authentication credentials invalid"
CLOSING = "421 4.7.0 Too many failed authentication attempts, closing connection"
OK = "235 2.7.0 Authentication successful"
FAST = {"auth_failure_delay_seconds": 0.01, "auth_failure_max_delay_seconds": 0.05}
#: argon2 costly enough (tens of ms) that parallel checks overlap.
SLOW_ARGON2 = {"argon2_time_cost": 2, "argon2_memory_cost_kib": 16384}


async def _ehlo(relay: RelayHandle, source: str) -> Raw:
    raw = await Raw.open(relay.host, relay.port, source=source)
    assert (await raw.cmd("EHLO client.test")).startswith("250-")
    return raw


async def _auth(relay: RelayHandle, source: str, user: str, password: str) -> str:
    """One AUTH PLAIN on a fresh connection from ``source``; its first reply line."""
    raw = await _ehlo(relay, source)
    try:
        return await raw.cmd(f"AUTH PLAIN {plain(user, password)}", timeout=10)
    finally:
        raw.close()


def _smtplib_login(relay: RelayHandle, source: str, user: str, password: str) -> None:
    """smtplib's ``login()`` (PLAIN, then LOGIN after a 535), from ``source``."""
    with smtplib.SMTP(relay.host, relay.port, source_address=(source, 0), timeout=10) as s:
        s.ehlo("client.test")
        s.login(user, password)


async def _relay(relay_factory: RelayFactory, smtp: dict[str, Any],
                 credentials: dict[str, Any] | None = None) -> RelayHandle:
    extra: dict[str, Any] = {"smtp": {**FAST, **smtp}}
    if credentials:
        extra["credentials"] = credentials
    relay = await relay_factory(extra)
    await relay.ctl.add_domain("example.com")
    return relay


async def test_innocent_tenant_logs_in_after_another_users_failures(
        relay_factory: RelayFactory) -> None:
    """A username locked out from an address does not stop another account logging in there."""
    relay = await _relay(relay_factory, {"auth_failures_before_disconnect": 3})
    careless, careless_pw = await relay.ctl.add_user()
    tenant, tenant_pw = await relay.ctl.add_user()
    raw = await _ehlo(relay, "127.0.0.21")
    for i in range(3):
        assert await raw.cmd(f"AUTH PLAIN {plain(careless, f'stale{i}')}") == INVALID
    assert await raw.reply() == CLOSING
    assert await _auth(relay, "127.0.0.21", careless, careless_pw) == CLOSING
    other = await _ehlo(relay, "127.0.0.21")
    assert await other.cmd(f"AUTH PLAIN {plain(tenant, tenant_pw)}") == OK
    assert await other.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    await other.quit()


async def test_parallel_wrong_passwords_get_at_most_the_cap_of_verifications(
        relay_factory: RelayFactory) -> None:
    """50 connections guessing one username at once get 5 argon2 checks (the cap), then 421."""
    relay = await _relay(relay_factory, {"auth_failures_before_delay": 100,
                                         "auth_failures_before_disconnect": 5}, SLOW_ARGON2)
    user, _ = await relay.ctl.add_user()
    conns = await asyncio.gather(*(_ehlo(relay, "127.0.0.22") for _ in range(50)))
    before = relay.relay.hasher.verifications
    got = await asyncio.gather(*(c.cmd(f"AUTH PLAIN {plain(user, f'guess{i}')}", timeout=30)
                                 for i, c in enumerate(conns)))
    checks = relay.relay.hasher.verifications - before
    print(f"50 parallel wrong passwords: {checks} argon2 verifications,"
          f" {got.count(INVALID)} x 535, {got.count(CLOSING)} x 421")
    assert checks <= 5
    assert got.count(INVALID) == 5 and got.count(CLOSING) == 45
    for c in conns:
        c.close()


async def test_a_guess_whose_client_hangs_up_during_the_check_still_counts(
        relay_factory: RelayFactory) -> None:
    """Clients that send AUTH and close while argon2 runs use up the cap all the same."""
    relay = await _relay(relay_factory, {"auth_failures_before_delay": 100,
                                         "auth_failures_before_disconnect": 3}, SLOW_ARGON2)
    user, _ = await relay.ctl.add_user()
    conns = await asyncio.gather(*(_ehlo(relay, "127.0.0.30") for _ in range(3)))
    for i, c in enumerate(conns):
        await c.send(f"AUTH PLAIN {plain(user, f'guess{i}')}\r\n".encode())
        c.close()
    assert await _auth(relay, "127.0.0.30", user, "guess3") == CLOSING


async def test_parallel_first_logins_share_one_verification(
        relay_factory: RelayFactory) -> None:
    """20 connections logging in at once with the right password all get 235 after one check."""
    relay = await _relay(relay_factory, {"auth_failures_before_disconnect": 3}, SLOW_ARGON2)
    user, password = await relay.ctl.add_user()
    conns = await asyncio.gather(*(_ehlo(relay, "127.0.0.23") for _ in range(20)))
    before = relay.relay.hasher.verifications
    got = await asyncio.gather(*(c.cmd(f"AUTH PLAIN {plain(user, password)}", timeout=30)
                                 for c in conns))
    assert got == [OK] * 20
    assert relay.relay.hasher.verifications - before == 1
    for c in conns:
        c.close()


async def test_cached_logins_of_one_account_neither_wait_nor_count(
        relay_factory: RelayFactory) -> None:
    """Once the password is cached, 30 concurrent logins of the account are answered from the
    cache: every one a hit, no verification, nothing left in the throttle."""
    relay = await _relay(relay_factory, {"auth_failures_before_disconnect": 3}, SLOW_ARGON2)
    user, password = await relay.ctl.add_user()
    assert await _auth(relay, "127.0.0.36", user, password) == OK  # argon2 once: cached
    conns = await asyncio.gather(*(_ehlo(relay, "127.0.0.36") for _ in range(30)))
    before = relay.relay.hasher.verifications
    hits = value(await scrape(relay.metrics_url), "relayd_credential_cache_hits_total")
    got = await asyncio.gather(*(c.cmd(f"AUTH PLAIN {plain(user, password)}", timeout=30)
                                 for c in conns))
    assert got == [OK] * 30
    assert relay.relay.hasher.verifications == before
    assert value(await scrape(relay.metrics_url),
                 "relayd_credential_cache_hits_total") == hits + 30
    assert (await relay.ctl.ok("GET", "/v1/throttle"))["entries"] == []
    for c in conns:
        c.close()


async def test_a_cached_password_does_not_pass_a_lockout(relay_factory: RelayFactory) -> None:
    """The cache answers no login that the throttle would refuse: a username locked from an
    address (and an address locked as a whole) gets 421 for its right, cached password too,
    so a lockout is no oracle for guesses; another address still logs in from the cache."""
    relay = await _relay(relay_factory, {"auth_failures_before_disconnect": 3,
                                         "auth_max_usernames_per_address": 3})
    user, password = await relay.ctl.add_user()
    assert await _auth(relay, "127.0.0.37", user, password) == OK  # now cached
    raw = await _ehlo(relay, "127.0.0.37")
    for i in range(3):
        assert await raw.cmd(f"AUTH PLAIN {plain(user, f'guess{i}')}") == INVALID
    assert await raw.reply() == CLOSING
    assert await _auth(relay, "127.0.0.37", user, password) == CLOSING
    assert await _auth(relay, "127.0.0.38", user, password) == OK
    for i in range(3):  # three unknown usernames from one address lock the address
        assert await _auth(relay, "127.0.0.39", f"nobody{i}", "x") == INVALID
    assert (await _auth(relay, "127.0.0.39", user, password)).startswith("421 ")


async def test_plain_then_login_with_the_same_wrong_password_counts_once(
        relay_factory: RelayFactory) -> None:
    """smtplib's login() with a wrong password (PLAIN, then LOGIN) is one failure, not two."""
    relay = await _relay(relay_factory, {"auth_failures_before_disconnect": 2})
    user, password = await relay.ctl.add_user()
    with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
        await asyncio.to_thread(_smtplib_login, relay, "127.0.0.24", user, "wrong")
    assert exc.value.smtp_code == 535
    listed = await relay.ctl.ok("GET", "/v1/throttle")
    assert listed["entries"] == [{"address": "127.0.0.24", "username": user, "failures": 1,
                                  "until": None}]
    await asyncio.to_thread(_smtplib_login, relay, "127.0.0.24", user, password)


async def test_correct_password_of_a_disabled_account_counts_once(
        relay_factory: RelayFactory) -> None:
    """Logging in again and again to a disabled account costs one check and no lockout;
    after enable the same password works at once."""
    relay = await _relay(relay_factory, {"auth_failures_before_disconnect": 3})
    user, password = await relay.ctl.add_user()
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    before = relay.relay.hasher.verifications
    for _ in range(3):  # six AUTH commands: PLAIN and LOGIN each time
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            await asyncio.to_thread(_smtplib_login, relay, "127.0.0.25", user, password)
        assert exc.value.smtp_code == 535
    assert relay.relay.hasher.verifications - before == 1
    await relay.ctl.ok("POST", f"/v1/users/{user}/enable")
    await asyncio.to_thread(_smtplib_login, relay, "127.0.0.25", user, password)


async def test_many_usernames_from_one_address_lock_the_address(
        relay_factory: RelayFactory) -> None:
    """Distinct usernames failing from one address past the threshold: every AUTH from it,
    a correct one too, gets 421 (counted as auth_rate_limited_address); others still log in."""
    relay = await _relay(relay_factory, {"auth_max_usernames_per_address": 4})
    user, password = await relay.ctl.add_user()
    raw = await _ehlo(relay, "127.0.0.26")
    for i in range(4):
        assert await raw.cmd(f"AUTH PLAIN {plain(f'guessed-{i}', 'pw')}") == INVALID
    assert await raw.reply() == CLOSING
    assert await raw.closed_by_server()
    assert await _auth(relay, "127.0.0.26", user, password) == CLOSING
    assert await _auth(relay, "127.0.0.27", user, password) == OK
    m = await scrape(relay.metrics_url)
    assert value(m, "relayd_smtp_rejections_total", reason="auth_rate_limited_address") == 2
    listed = await relay.ctl.ok("GET", "/v1/throttle")
    star = [e for e in listed["entries"] if e["username"] == "*"]
    assert len(star) == 1 and star[0]["address"] == "127.0.0.26"
    assert star[0]["failures"] == 4 and star[0]["until"] is not None


async def test_exempt_network_is_not_locked_by_address(relay_factory: RelayFactory) -> None:
    """From an exempt network many failing usernames lock no address, but one username is
    still locked out after its own failures."""
    relay = await _relay(relay_factory, {"auth_max_usernames_per_address": 3,
                                         "auth_failures_before_disconnect": 3,
                                         "auth_throttle_exempt_networks": ["127.0.0.28/32"]})
    user, password = await relay.ctl.add_user()
    raw = await _ehlo(relay, "127.0.0.28")
    for i in range(6):
        assert await raw.cmd(f"AUTH PLAIN {plain(f'tenant-{i}', 'pw')}") == INVALID
    assert await raw.pending() == b""
    raw.close()
    assert await _auth(relay, "127.0.0.28", user, password) == OK
    raw = await _ehlo(relay, "127.0.0.28")
    for i in range(3):
        assert await raw.cmd(f"AUTH PLAIN {plain(user, f'stale{i}')}") == INVALID
    assert await raw.reply() == CLOSING
    assert await _auth(relay, "127.0.0.28", user, password) == CLOSING


async def test_relayctl_throttle_list_and_clear(relay_factory: RelayFactory) -> None:
    """relayctl throttle list shows a locked-out username; throttle clear ADDRESS lets it
    log in again at once, without a restart."""
    relay = await _relay(relay_factory, {"auth_failures_before_disconnect": 2})
    user, password = await relay.ctl.add_user()
    raw = await _ehlo(relay, "127.0.0.29")
    for i in range(2):
        assert await raw.cmd(f"AUTH PLAIN {plain(user, f'old{i}')}") == INVALID
    assert await raw.reply() == CLOSING
    assert await _auth(relay, "127.0.0.29", user, password) == CLOSING
    sock = relay.ctl.path
    rc, out, err = await relayctl(sock, "throttle", "list")
    assert rc == 0, err
    row = next(line.split() for line in out.splitlines() if "127.0.0.29" in line)
    assert row[:3] == ["127.0.0.29", user, "2"] and row[3].startswith("20"), out
    rc, out, err = await relayctl(sock, "--json", "throttle", "list")
    assert rc == 0, err
    [entry] = json.loads(out)["entries"]
    assert entry["address"] == "127.0.0.29" and entry["until"] > 0
    rc, out, err = await relayctl(sock, "throttle", "clear", "127.0.0.29")
    assert (rc, out.strip()) == (0, "cleared 1 throttle entry of 127.0.0.29"), err
    assert await _auth(relay, "127.0.0.29", user, password) == OK
    rc, out, _ = await relayctl(sock, "throttle", "list")
    assert (rc, out.strip()) == (0, "(none)")


async def test_throttle_clear_refuses_a_bad_address(relay: RelayHandle) -> None:
    """throttle clear with something that is not an IP address: exit 1, the field named."""
    rc, out, err = await relayctl(relay.ctl.path, "throttle", "clear", "10.0.0.0/8")
    assert rc == 1 and out == ""
    assert "address" in err and "Traceback" not in err
    status, body = await relay.ctl.call("POST", "/v1/throttle/clear", {"address": 5})
    assert status == 400 and body["code"] == "invalid_request"


# --- pure decisions (relayd.smtp.policy.AuthThrottle, clock injected) ---------------------


def _throttle(**kw: Any) -> AuthThrottle:
    args: dict[str, Any] = {"free_failures": 1, "max_failures": 3, "base_delay": 1.0,
                            "max_delay": 4.0, "lockout": 100.0, "max_usernames": 4}
    args.update(kw)
    return AuthThrottle(**args)


def _fail(t: AuthThrottle, ip: str, user: str, secret: bytes,
          now: float) -> tuple[float, replies.Reply | None]:
    adm = t.begin(ip, user, secret, now)
    assert adm.attempt is not None, adm
    return t.finish(adm.attempt, now, ok=False, reason="bad_password")


def test_policy_delay_grows_then_locks_the_username_for_the_lockout() -> None:
    """Failures for one username: no delay, then doubling; the cap locks it until the
    lockout ends, and then it starts from zero."""
    t = _throttle()
    assert _fail(t, "10.0.0.1", "u", b"a", 0.0) == (0.0, None)
    assert _fail(t, "10.0.0.1", "u", b"b", 1.0) == (1.0, None)
    assert _fail(t, "10.0.0.1", "u", b"c", 2.0) == (2.0, replies.AUTH_RATE_LIMITED)
    assert t.begin("10.0.0.1", "u", b"right", 50.0).refusal == replies.AUTH_RATE_LIMITED
    assert t.begin("10.0.0.1", "v", b"x", 50.0).attempt is not None
    assert t.begin("10.0.0.2", "u", b"right", 50.0).attempt is not None
    assert t.begin("10.0.0.1", "u", b"right", 102.0).attempt is not None


def test_policy_counts_attempts_from_their_start() -> None:
    """Checks still running count: past the cap the next one waits, and once they have
    all failed it is refused."""
    t = _throttle()
    running = [t.begin("10.0.0.1", "u", bytes([i]), 0.0).attempt for i in range(3)]
    assert all(running)
    assert t.begin("10.0.0.1", "u", b"z", 0.0).wait
    for a in running:
        assert a is not None
        t.finish(a, 0.1, ok=False, reason="bad_password")
    assert t.begin("10.0.0.1", "u", b"z", 0.2).refusal == replies.AUTH_RATE_LIMITED


def test_policy_a_running_success_lets_the_waiting_attempt_go() -> None:
    """An attempt waiting behind a running check goes once that check succeeds; a success
    forgets the username's failures."""
    t = _throttle()
    _fail(t, "10.0.0.1", "u", b"a", 0.0)
    _fail(t, "10.0.0.1", "u", b"b", 0.0)
    first = t.begin("10.0.0.1", "u", b"good", 0.0).attempt
    assert first is not None
    assert t.begin("10.0.0.1", "u", b"good", 0.0).wait  # the same secret is running
    assert t.finish(first, 0.1, ok=True, reason="success") == (0.0, None)
    assert t.begin("10.0.0.1", "u", b"good", 0.2).attempt is not None
    assert t.entries(0.2) == []


def test_policy_locked_and_succeeded_change_nothing_else() -> None:
    """``locked`` says what ``begin`` would refuse as locked, counting nothing; ``succeeded``
    forgets the pair's failures as a successful check does."""
    t = _throttle()
    assert not t.locked("10.0.0.1", "u", 0.0)
    _fail(t, "10.0.0.1", "u", b"a", 0.0)
    assert not t.locked("10.0.0.1", "u", 0.0)
    t.succeeded("10.0.0.1", "u")
    assert t.entries(0.0) == []
    for i, secret in enumerate((b"a", b"b", b"c")):
        _fail(t, "10.0.0.1", "u", secret, float(i))
    assert t.locked("10.0.0.1", "u", 3.0) and not t.locked("10.0.0.1", "v", 3.0)
    assert not t.locked("10.0.0.2", "u", 3.0)
    assert t.begin("10.0.0.1", "u", b"right", 3.0).refusal == replies.AUTH_RATE_LIMITED
    assert not t.locked("10.0.0.1", "u", 200.0)  # the lockout is over


def test_policy_the_same_secret_again_is_a_repeat_not_a_failure() -> None:
    """The same fingerprint failing again within the window is answered from memory with
    its reason and not counted; after the window it is checked and counted again."""
    t = _throttle()
    adm = t.begin("10.0.0.1", "u", b"same", 0.0)
    assert adm.attempt is not None
    t.finish(adm.attempt, 0.0, ok=False, reason="account_disabled")
    for now in (1.0, 2.0, 30.0):
        rep = t.begin("10.0.0.1", "u", b"same", now)
        assert rep.attempt is None and rep.repeat == "account_disabled"
    assert [e.failures for e in t.entries(30.0)] == [1]
    assert t.begin("10.0.0.1", "u", b"same", 61.0).attempt is not None


def test_policy_distinct_usernames_lock_the_address_unless_exempt() -> None:
    """The max_usernames-th distinct username failing locks the address as a whole (a
    correct login too); an exempt address is never locked as a whole."""
    t = _throttle(exempt_networks=["10.9.0.0/16"])
    for ip in ("10.0.0.1", "10.9.0.1"):
        results = [_fail(t, ip, f"user{i}", b"x", 0.0)[1] for i in range(4)]
        if ip == "10.0.0.1":
            assert results == [None, None, None, replies.AUTH_RATE_LIMITED_ADDRESS]
            assert t.address_refusal(ip, 1.0) == replies.AUTH_RATE_LIMITED_ADDRESS
            assert t.begin(ip, "tenant", b"good", 1.0).refusal \
                == replies.AUTH_RATE_LIMITED_ADDRESS
        else:
            assert results == [None] * 4
            assert t.address_refusal(ip, 1.0) is None
            assert t.begin(ip, "tenant", b"good", 1.0).attempt is not None
    assert t.begin("10.0.0.1", "tenant", b"good", 101.0).attempt is not None


def test_policy_new_usernames_wait_while_checks_run_at_the_address_cap() -> None:
    """Distinct usernames running count toward the address cap: a further new username
    waits, a username already running does not."""
    t = _throttle()
    running = [t.begin("10.0.0.1", f"user{i}", b"x", 0.0).attempt for i in range(4)]
    assert t.begin("10.0.0.1", "user9", b"x", 0.0).wait
    assert t.begin("10.0.0.1", "user0", b"y", 0.0).attempt is not None
    for a in running:
        assert a is not None
        t.abandon(a)  # internal errors: nothing counted
    assert t.begin("10.0.0.1", "user9", b"x", 0.1).attempt is not None


def test_policy_list_and_clear() -> None:
    """entries lists per (address, username) and ``*`` for a locked address; clear forgets
    one address or all; an IPv4-mapped address is the IPv4 one."""
    t = _throttle(max_usernames=2)
    _fail(t, "::ffff:10.0.0.1", "a", b"x", 0.0)
    _fail(t, "10.0.0.1", "b", b"x", 0.0)
    _fail(t, "10.0.0.2", "a", b"x", 0.0)
    got = [(e.address, e.username, e.failures, e.until) for e in t.entries(1.0)]
    assert got == [("10.0.0.1", "*", 2, 100.0), ("10.0.0.1", "a", 1, None),
                   ("10.0.0.1", "b", 1, None), ("10.0.0.2", "a", 1, None)]
    assert t.clear(1.0, "::ffff:10.0.0.1") == 3
    assert [e.address for e in t.entries(1.0)] == ["10.0.0.2"]
    assert t.clear(1.0) == 1 and t.entries(1.0) == [] and len(t) == 0


def test_policy_memory_is_bounded_and_expires() -> None:
    """At most max_entries pairs are kept (the least recently active dropped), and counts
    are forgotten a lockout after the last failure."""
    t = _throttle(max_entries=100)
    for i in range(1000):
        _fail(t, f"10.1.{i // 250}.{i % 250}", "u", b"x", float(i) / 100)
        assert len(t) <= 100
    assert "10.1.3.249" in {e.address for e in t.entries(10.0)}  # the latest is kept
    assert t.entries(200.0) == [] and len(t) == 0
    long_name = "x" * 10_000
    _fail(t, "10.0.0.1", long_name, b"x", 0.0)
    assert len(t.entries(0.0)[0].username) < 200
