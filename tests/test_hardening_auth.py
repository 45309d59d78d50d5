"""AUTH abuse over a real socket: RFC 4954 replies for protocol errors, brute force on one
username from one address (growing delay, then 421 4.7.0), and no difference an attacker
can use. The throttle's other rules are in test_holes_auth_throttle.py."""

from __future__ import annotations

import base64
import statistics
import time

import pytest

from tests.conftest import RelayFactory, RelayHandle
from tests.rawsmtp import Raw, plain

pytestmark = pytest.mark.timeout(60)

INVALID = "535 5.7.8 Authentication credentials invalid"
CLOSING = "421 4.7.0 Too many failed authentication attempts, closing connection"


async def _ehlo(relay: RelayHandle, source: str | None = None) -> Raw:
    raw = await Raw.open(relay.host, relay.port, source=source)
    assert (await raw.cmd("EHLO client.test")).startswith("250-")
    return raw


async def test_bad_base64_gets_501(relay: RelayHandle, account: tuple[str, str]) -> None:
    """An initial response that is not base64 gets 501 5.5.2 (RFC 4954 §4)."""
    raw = await _ehlo(relay)
    assert await raw.cmd("AUTH PLAIN not*base64!") == "501 5.5.2 Cannot decode base64"
    assert await raw.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert await raw.cmd("%%%") == "501 5.5.2 Cannot decode base64"
    raw.close()


async def test_cancelled_exchange_gets_501(relay: RelayHandle) -> None:
    """A client answering a challenge with "*" gets 501 5.7.0 (RFC 4954 §4)."""
    raw = await _ehlo(relay)
    assert await raw.cmd("AUTH PLAIN") == "334 "
    assert await raw.cmd("*") == "501 5.7.0 Authentication aborted"
    raw.close()


async def test_unknown_mechanism_gets_504(relay: RelayHandle) -> None:
    """An unknown SASL mechanism gets 504 5.5.4."""
    raw = await _ehlo(relay)
    assert await raw.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"
    assert await raw.cmd("AUTH") == "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
    raw.close()


async def test_auth_twice_gets_503(relay: RelayHandle, account: tuple[str, str]) -> None:
    """A second AUTH after a successful one gets 503 5.5.1 (RFC 4954 §4)."""
    raw = await _ehlo(relay)
    assert await raw.cmd(f"AUTH PLAIN {plain(*account)}") == \
        "235 2.7.0 Authentication successful"
    assert await raw.cmd(f"AUTH PLAIN {plain(*account)}") == "503 5.5.1 Already authenticated"
    raw.close()


async def test_auth_inside_a_transaction_gets_503(relay: RelayHandle) -> None:
    """AUTH while a mail transaction is open gets 503 5.5.1 (RFC 4954 §4)."""
    await relay.ctl.add_domain("example.com")
    account = await relay.ctl.add_user("example.com", networks=["127.0.0.1/32"])
    raw = await _ehlo(relay)
    assert await raw.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    assert await raw.cmd(f"AUTH PLAIN {plain(*account)}") == \
        "503 5.5.1 AUTH not permitted during a mail transaction"
    raw.close()


async def test_auth_before_ehlo_gets_503(relay: RelayHandle, account: tuple[str, str]) -> None:
    """AUTH before EHLO gets 503 5.5.1."""
    raw = await Raw.open(relay.host, relay.port)
    assert await raw.cmd(f"AUTH PLAIN {plain(*account)}") == "503 5.5.1 Send EHLO or HELO first"
    raw.close()


async def test_plain_with_bad_layout_gets_501(relay: RelayHandle) -> None:
    """A PLAIN response that decodes but lacks the two NUL separators gets 501 5.5.2."""
    raw = await _ehlo(relay)
    blob = base64.b64encode(b"user-and-password").decode()
    assert await raw.cmd(f"AUTH PLAIN {blob}") == "501 5.5.2 Cannot decode base64"
    raw.close()


async def test_brute_force_gets_growing_delay_then_421(relay_factory: RelayFactory) -> None:
    """Failures for one username from one address are answered ever later, then 421 4.7.0
    and close; a new connection from that address is closed at its first AUTH as that user."""
    relay = await relay_factory({"smtp": {
        "auth_failures_before_delay": 1, "auth_failures_before_disconnect": 4,
        "auth_failure_delay_seconds": 0.2, "auth_failure_max_delay_seconds": 5.0}})
    await relay.ctl.add_domain("example.com")
    user, _ = await relay.ctl.add_user("example.com")
    raw = await _ehlo(relay, source="127.0.0.2")
    took = []
    for i in range(3):
        t0 = time.monotonic()
        assert await raw.cmd(f"AUTH PLAIN {plain(user, f'guess{i}')}") == INVALID
        took.append(time.monotonic() - t0)
    assert took[0] < 0.15 and 0.2 <= took[1] < 0.4 and 0.4 <= took[2] < 0.7, took
    assert await raw.cmd(f"AUTH PLAIN {plain(user, 'guess3')}", timeout=5) == INVALID
    assert await raw.reply() == CLOSING
    assert await raw.closed_by_server()
    again = await _ehlo(relay, source="127.0.0.2")
    assert await again.cmd(f"AUTH PLAIN {plain(user, 'guess4')}") == CLOSING
    assert await again.closed_by_server()


async def test_attacker_does_not_lock_out_the_real_user(relay_factory: RelayFactory) -> None:
    """After a username is locked out from one address, it still logs in from another."""
    relay = await relay_factory({"smtp": {
        "auth_failures_before_delay": 0, "auth_failures_before_disconnect": 3,
        "auth_failure_delay_seconds": 0.01}})
    await relay.ctl.add_domain("example.com")
    user, password = await relay.ctl.add_user("example.com")
    attacker = await _ehlo(relay, source="127.0.0.2")
    for i in range(2):
        assert await attacker.cmd(f"AUTH PLAIN {plain(user, f'guess{i}')}") == INVALID
    assert await attacker.cmd(f"AUTH PLAIN {plain(user, 'guess2')}") == INVALID
    assert await attacker.reply() == CLOSING
    real = await _ehlo(relay, source="127.0.0.1")
    assert await real.cmd(f"AUTH PLAIN {plain(user, password)}") == \
        "235 2.7.0 Authentication successful"
    assert await real.cmd("MAIL FROM:<app@example.com>") == "250 2.1.0 Ok"
    real.close()


async def test_unknown_user_and_wrong_password_cost_the_same(
        relay_factory: RelayFactory) -> None:
    """Unknown users and wrong passwords get the same 535 after one argon2 verification
    each, in similar time (each guess a new password: a repeated one is not verified
    again)."""
    relay = await relay_factory({
        "smtp": {"auth_failures_before_delay": 1000, "auth_failures_before_disconnect": 1000},
        "credentials": {"argon2_time_cost": 2, "argon2_memory_cost_kib": 16384}})
    await relay.ctl.add_domain("example.com")
    user, _ = await relay.ctl.add_user("example.com")
    hasher = relay.relay.hasher
    raw = await _ehlo(relay)
    times: dict[str, list[float]] = {"unknown": [], "wrong": []}
    for i in range(7):
        for kind, name in (("unknown", "no-such-user"), ("wrong", user)):
            before = hasher.verifications
            t0 = time.perf_counter()
            assert await raw.cmd(f"AUTH PLAIN {plain(name, f'guess{i}')}") == INVALID
            times[kind].append(time.perf_counter() - t0)
            assert hasher.verifications == before + 1
    unknown, wrong = statistics.median(times["unknown"]), statistics.median(times["wrong"])
    print(f"median AUTH failure: unknown user {unknown * 1000:.1f} ms,"
          f" wrong password {wrong * 1000:.1f} ms")
    assert 0.5 < unknown / wrong < 2.0
    raw.close()
