"""Issue 12, items 4, 7 and 8: the control plane refuses what it used to take quietly.

Item 4: a network bound to an account is no broader than the configured prefix, has
no host bits set and overlaps no other account's network (checked in the transaction
that stores it); what an older version stored is reported at start, not refused.
Item 7: bad bodies and query values (invalid UTF-8, numbers out of range or not
finite, repeated keys) get a 400 naming the field, never a 500 or a silent clamp;
relayctl refuses the same values itself. Item 8: an irreversible delete takes the
name exactly as it is listed.

All through the real control socket (raw HTTP where aiohttp's client would not send
the bytes), relayctl in a subprocess, and SMTP over a real socket.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.conftest import RelayFactory, RelayHandle, Sink
from tests.procs import RelayProcess
from tests.test_cli_prompt import Terminal
from tests.test_ops_support import log_lines
from tests.test_relayctl import relayctl

pytestmark = pytest.mark.timeout(90)


async def _http(sock: str, method: str, url: str, body: bytes = b"") -> tuple[int, Any]:
    """One raw HTTP/1.1 request on the control socket; (status, decoded JSON body)."""
    import json

    reader, writer = await asyncio.open_unix_connection(sock)
    head = (f"{method} {url} HTTP/1.1\r\nHost: relayd\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    writer.write(head.encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload) if payload else None


async def _mail_code(relay: RelayHandle, sender: str) -> int:
    """The reply code to an unauthenticated MAIL from 127.0.0.1."""
    c = await relay.client()
    try:
        await c.ehlo()
        try:
            return (await c.mail(sender)).code
        except aiosmtplib.SMTPSenderRefused as exc:
            return exc.code
    finally:
        c.close()


# -- item 4: network bindings ----------------------------------------------------------

async def test_open_relay_network_is_refused_and_does_not_relay(relay: RelayHandle) -> None:
    """user add --allow-network 0.0.0.0/0 is a 400 naming allow_networks, creates no
    account, and an unauthenticated MAIL from 127.0.0.1 still gets 530."""
    await relay.ctl.add_domain("dd.test")
    status, body = await relay.ctl.call("POST", "/v1/users", {
        "domain": "dd.test", "allow_networks": ["0.0.0.0/0"]})
    assert (status, body["code"]) == (400, "network_too_broad"), body
    assert "allow_networks" in body["error"] and "max_network_prefix_v4" in body["error"]
    assert (await relay.ctl.ok("GET", "/v1/users"))["users"] == []
    assert await _mail_code(relay, "a@dd.test") == 530


async def test_networks_add_too_broad_is_refused_and_does_not_relay(
        relay: RelayHandle) -> None:
    """user networks add 127.0.0.0/8 (broader than /24) is a 400 naming cidr; the
    account stays unbound and MAIL without AUTH still gets 530."""
    await relay.ctl.add_domain("dd.test")
    user, _ = await relay.ctl.add_user("dd.test")
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/networks",
                                        {"action": "add", "cidr": "127.0.0.0/8"})
    assert (status, body["code"]) == (400, "network_too_broad"), body
    assert body["error"].startswith("cidr:")
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["networks"] == []
    assert await _mail_code(relay, "a@dd.test") == 530


async def test_relayctl_refuses_open_network_in_one_line(relay: RelayHandle) -> None:
    """relayctl user add --allow-network 0.0.0.0/0 exits 1 with one line on stderr."""
    await relay.ctl.add_domain("dd.test")
    rc, out, err = await relayctl(relay.ctl.path, "user", "add", "--domain", "dd.test",
                                  "--allow-network", "0.0.0.0/0")
    assert rc == 1, (out, err)
    assert len(err.strip().splitlines()) == 1 and "0.0.0.0/0 is broader than /24" in err


async def test_same_address_for_two_domains_is_refused(relay: RelayHandle) -> None:
    """A /32 already bound to an account of one domain cannot be bound (nor a network
    containing it) to an account of another; sessions stay with the first."""
    await relay.ctl.add_domain("one.test")
    await relay.ctl.add_domain("two.test")
    first, _ = await relay.ctl.add_user("one.test", ["127.0.0.1/32"])
    status, body = await relay.ctl.call("POST", "/v1/users", {
        "domain": "two.test", "allow_networks": ["127.0.0.1/32"]})
    assert (status, body["code"]) == (400, "network_overlap"), body
    assert "allow_networks" in body["error"] and first in body["error"]
    second, _ = await relay.ctl.add_user("two.test")
    status, body = await relay.ctl.call("POST", f"/v1/users/{second}/networks",
                                        {"action": "add", "cidr": "127.0.0.0/24"})
    assert (status, body["code"]) == (400, "network_overlap"), body
    assert body["error"].startswith("cidr:")
    assert await _mail_code(relay, "a@two.test") == 553
    assert await _mail_code(relay, "a@one.test") == 250


async def test_host_bits_are_refused_not_rewritten(relay: RelayHandle) -> None:
    """10.0.0.1/24 is a 400 naming the field (not silently 10.0.0.0/24), in user add and
    in user networks add."""
    await relay.ctl.add_domain("example.com")
    status, body = await relay.ctl.call("POST", "/v1/users", {
        "domain": "example.com", "allow_networks": ["10.0.0.1/24"]})
    assert (status, body["code"]) == (400, "network_host_bits"), body
    assert "allow_networks" in body["error"] and "10.0.0.0/24" in body["error"]
    user, _ = await relay.ctl.add_user()
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/networks",
                                        {"action": "add", "cidr": "10.0.0.1/24"})
    assert (status, body["code"]) == (400, "network_host_bits"), body
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["networks"] == []


async def test_ipv6_default_broadest_prefix_is_48(relay: RelayHandle) -> None:
    """By default an IPv6 /47 is refused and a /48 accepted."""
    await relay.ctl.add_domain("example.com")
    status, body = await relay.ctl.call("POST", "/v1/users", {
        "domain": "example.com", "allow_networks": ["2001:db8::/47"]})
    assert (status, body["code"]) == (400, "network_too_broad"), body
    await relay.ctl.add_user(networks=["2001:db8::/48"])


async def test_broadest_prefix_is_configurable(relay_factory: RelayFactory) -> None:
    """[limits] max_network_prefix_v4/_v6 allow broader networks, and no broader."""
    relay = await relay_factory({"limits": {"max_network_prefix_v4": 8,
                                            "max_network_prefix_v6": 32}})
    await relay.ctl.add_domain("example.com")
    await relay.ctl.add_user(networks=["10.0.0.0/8", "2001:db8::/32"])
    for net in ("12.0.0.0/7", "2001:db6::/31"):
        status, body = await relay.ctl.call("POST", "/v1/users", {
            "domain": "example.com", "allow_networks": [net]})
        assert (status, body["code"]) == (400, "network_too_broad"), (net, body)


async def test_concurrent_overlapping_adds_bind_once(relay: RelayHandle) -> None:
    """Two concurrent user adds binding the same /32 to two domains: exactly one wins."""
    await relay.ctl.add_domain("one.test")
    await relay.ctl.add_domain("two.test")
    results = await asyncio.gather(*(
        relay.ctl.call("POST", "/v1/users", {"domain": d, "allow_networks": ["192.0.2.7"]})
        for d in ("one.test", "two.test", "one.test", "two.test")))
    assert sorted(s for s, _ in results) == [201, 400, 400, 400], results
    users = (await relay.ctl.ok("GET", "/v1/users"))["users"]
    assert [u["networks"] for u in users] == [["192.0.2.7/32"]]


async def test_disabled_account_keeps_its_network_deleted_frees_it(
        relay: RelayHandle) -> None:
    """A disabled account's network stays reserved; once it is deleted, another account
    may bind it."""
    await relay.ctl.add_domain("one.test")
    await relay.ctl.add_domain("two.test")
    first, _ = await relay.ctl.add_user("one.test", ["192.0.2.0/24"])
    await relay.ctl.ok("POST", f"/v1/users/{first}/disable")
    status, body = await relay.ctl.call("POST", "/v1/users", {
        "domain": "two.test", "allow_networks": ["192.0.2.128/25"]})
    assert (status, body["code"]) == (400, "network_overlap"), body
    await relay.ctl.ok("POST", f"/v1/users/{first}/delete", {"confirm": first})
    await relay.ctl.add_user("two.test", ["192.0.2.128/25"])


@pytest.mark.slow
async def test_stored_bindings_breaking_the_rules_warn_at_start(
        relay_factory: RelayFactory, sink: Sink, tmp_path: Path) -> None:
    """Networks an older version stored (too broad, host bits, overlapping) do not stop
    relayd from starting: one warning each, and they can still be removed."""
    relay = await relay_factory({"limits": {"max_network_prefix_v4": 8}})
    await relay.ctl.add_domain("one.test")
    await relay.ctl.add_domain("two.test")
    wide, _ = await relay.ctl.add_user("one.test", ["10.0.0.0/8"])
    b, _ = await relay.ctl.add_user("one.test")
    c, _ = await relay.ctl.add_user("two.test")
    await relay.stop()
    db = sqlite3.connect(relay.data_dir / "relayd.sqlite3")
    with db:
        db.executemany("INSERT INTO account_networks(account_id, cidr)"
                       " SELECT id, ? FROM accounts WHERE username=?",
                       [("192.0.2.1/24", wide), ("127.0.0.1/32", b), ("127.0.0.0/24", c)])
    db.close()
    rp = RelayProcess(tmp_path, sink.address)  # default limits: /24
    await rp.start()
    try:
        warned = {(x["username"], x["cidr"]) for x in log_lines(rp.log)
                  if x.get("event") == "legacy_network_binding"
                  and x.get("level") == "warning"}
        assert warned == {(wide, "10.0.0.0/8"), (wide, "192.0.2.1/24"),
                          (b, "127.0.0.1/32"), (c, "127.0.0.0/24")}
        info = await rp.ctl("user", "networks", "remove", wide, "10.0.0.0/8")
        assert info["networks"] == ["192.0.2.1/24"]
    finally:
        assert await rp.terminate() == 0


# -- item 7: bad input gets a 400 naming the field -------------------------------------

async def test_invalid_utf8_in_a_body_gets_400(relay: RelayHandle) -> None:
    """A JSON body with invalid UTF-8 inside a string is a 400 malformed_json, not a 500."""
    status, body = await _http(relay.ctl.path, "POST", "/v1/domains", b'{"name": "\xff.com"}')
    assert (status, body["code"]) == (400, "malformed_json"), body
    assert "UTF-8" in body["error"]


@pytest.mark.parametrize(("field", "value"), [
    ("per_hour", 10**30), ("per_minute", 2**63), ("per_day", -1)])
async def test_out_of_range_limits_get_400_naming_the_field(
        relay: RelayHandle, account: tuple[str, str], field: str, value: int) -> None:
    """A sending limit below 0 or beyond SQLite's INTEGER is a 400 naming the field; the
    largest INTEGER itself is taken."""
    url = f"/v1/users/{account[0]}/limits"
    status, body = await relay.ctl.call("POST", url, {field: value})
    assert (status, body["code"]) == (400, "invalid_request"), body
    assert f"`$.{field}`" in body["error"]
    info = await relay.ctl.ok("POST", url, {field: 2**63 - 1})
    assert info["limits"][field] == 2**63 - 1


@pytest.mark.parametrize("url", [
    "/v1/log?limit=-1", "/v1/log?limit=0", "/v1/log?limit=10001",
    "/v1/log?limit=99999999999999999999999", "/v1/log?since=nan", "/v1/log?since=inf",
    "/v1/log?since=1e400", "/v1/log?since=-1", "/v1/dormant?days=nan",
    "/v1/dormant?days=1e400", "/v1/dormant?days=-inf",
    "/v1/dormant?max_sent=9223372036854775808",
])
async def test_bad_query_numbers_get_400_naming_the_parameter(relay: RelayHandle,
                                                              url: str) -> None:
    """A query number that is out of range or not finite is a 400 naming the parameter,
    never clamped or taken."""
    name = url.split("?")[1].split("=")[0]
    status, body = await _http(relay.ctl.path, "GET", url)
    assert (status, body["code"]) == (400, "invalid_request"), (url, body)
    assert f"`$.{name}`" in body["error"]


async def test_duplicate_json_keys_get_400_naming_the_key(relay: RelayHandle,
                                                          account: tuple[str, str]) -> None:
    """A body with a key twice is a 400 naming it, and nothing happens (domain delete with
    a wrong confirmation first and the right one last does not delete)."""
    status, body = await _http(relay.ctl.path, "POST", "/v1/domains/example.com/delete",
                               b'{"confirm": "nope", "confirm": "example.com"}')
    assert (status, body["code"]) == (400, "invalid_request"), body
    assert "duplicate key `confirm`" in body["error"]
    assert [d["name"] for d in (await relay.ctl.ok("GET", "/v1/domains"))["domains"]] == [
        "example.com"]
    status, body = await _http(relay.ctl.path, "POST", f"/v1/users/{account[0]}/limits",
                               b'{"per_hour": 5, "per_hour": 50}')
    assert status == 400 and "duplicate key `per_hour`" in body["error"], body


async def test_repeated_or_unknown_query_parameters_get_400(relay: RelayHandle) -> None:
    """A query parameter given twice, or one the endpoint does not know, is a 400 naming it
    (not the first value taken, or the typo ignored)."""
    status, body = await _http(relay.ctl.path, "GET", "/v1/log?limit=1&limit=2")
    assert (status, body["code"]) == (400, "invalid_request"), body
    assert "`limit`" in body["error"]
    status, body = await _http(relay.ctl.path, "GET", "/v1/queue?usr=alice")
    assert (status, body["code"]) == (400, "invalid_request"), body
    assert "`usr`" in body["error"]


async def test_message_id_must_be_hex_digits_only(relay: RelayHandle) -> None:
    """A message id with a sign, spaces or underscores (which int() takes) is a 400."""
    for bad in ("-000000000000001", "+000000000000001", "0000_0000_0000_1",
                "%20000000000000001"):
        status, body = await _http(relay.ctl.path, "GET", f"/v1/queue/{bad}")
        assert status == 400 and "16 hex digits" in body["error"], (bad, body)


@pytest.mark.parametrize("args", [
    ("user", "limits", "NAME", "--per-hour", str(10**30)),
    ("user", "limits", "NAME", "--per-minute", str(2**63)),
    ("user", "limits", "NAME", "--per-day", "-1"),
    ("user", "dormant", "--days", "nan"),
    ("user", "dormant", "--days", "1e400"),
    ("user", "dormant", "--max-sent", "-1"),
    ("log", "--since", "nan"),
    ("log", "--since", "1e400"),
    ("log", "--since", "99999999999d"),
    ("log", "--limit", "0"),
    ("log", "--limit", "-1"),
])
async def test_relayctl_refuses_bad_numbers_itself(relay: RelayHandle,
                                                   account: tuple[str, str],
                                                   args: tuple[str, ...]) -> None:
    """relayctl refuses an out-of-range or non-finite number before calling relayd: one
    line on stderr, exit 2, no traceback."""
    argv = [account[0] if a == "NAME" else a for a in args]
    rc, out, err = await relayctl(relay.ctl.path, *argv)
    assert rc == 2, (argv, rc, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# -- item 8: irreversible operations take the exact name ---------------------------------

@pytest.mark.parametrize("confirm", ["EXAMPLE.COM", "example.com ", " example.com",
                                     "example.com.", "Example.com"])
async def test_domain_delete_needs_the_name_exactly(relay: RelayHandle,
                                                    account: tuple[str, str],
                                                    confirm: str) -> None:
    """domain delete refuses a confirmation that differs from the listed name in case,
    spaces or a trailing dot, and deletes nothing."""
    status, body = await relay.ctl.call("POST", "/v1/domains/example.com/delete",
                                        {"confirm": confirm})
    assert (status, body["code"]) == (400, "confirm_mismatch"), body
    assert "'example.com'" in body["error"]
    assert (await relay.ctl.ok("GET", f"/v1/users/{account[0]}"))["status"] == "active"
    await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})


async def test_relayctl_domain_delete_with_loose_confirm_exits_1(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """relayctl domain delete --confirm 'EXAMPLE.COM ' exits 1 with one line; the domain
    is still there."""
    rc, out, err = await relayctl(relay.ctl.path, "domain", "delete", "example.com",
                                  "--confirm", "EXAMPLE.COM ")
    assert rc == 1, (out, err)
    assert err.strip().splitlines()[-1].startswith("relayctl: confirmation does not match")
    assert (await relay.ctl.ok("GET", "/v1/domains"))["domains"]


async def test_terminal_prompt_takes_the_name_as_typed(relay: RelayHandle,
                                                       account: tuple[str, str]) -> None:
    """On a terminal, a username typed with a trailing space does not confirm user delete
    (the prompt no longer strips what was typed)."""
    user = account[0]
    term = Terminal()
    await term.start(relay.ctl.path, "user", "delete", user)
    await term.expect(b"Type the username to confirm: ")
    term.type(user + " ")
    rc, out = await term.finish()
    assert rc == 1, out
    assert "confirmation does not match" in out
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["status"] == "active"
