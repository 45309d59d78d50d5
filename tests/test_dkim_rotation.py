"""DKIM key rotation end to end (relayctl domain rotate-key): mail submitted over SMTP is
signed with the old selector while a new key is pending and with the new one after
--activate, each signature verified by dkimpy against the DNS records relayd printed;
pending and active keys survive a restart; cancel; the errors; the relayctl command."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from control import schemas
from tests.conftest import RelayFactory, RelayHandle, Sink, decode, message, spool_at_schema
from tests.test_dkim_e2e import (
    _nacl_for_dkimpy,  # noqa: F401 - autouse: Ed25519 in dkimpy
    published,
    signatures,
    verifies,
)

REPO = Path(__file__).resolve().parent.parent
ROTATE = "/v1/domains/example.com/rotate-key"


async def send_one(relay: RelayHandle, sink: Sink, user: str, pw: str,
                   subject: str) -> bytes:
    """Submit one message over SMTP; the message as the next hop received it."""
    before = len(sink.messages)
    c = await relay.client(user, pw)
    await c.sendmail("app@example.com", ["r@dest.test"], message(subject))
    await c.quit()
    got = await sink.wait_for(before + 1)
    return got[before].data


def selectors_of(info: dict[str, Any], state: str) -> list[str]:
    return [k["selector"] for k in info["dkim_selectors"] if k["state"] == state]


def records(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for k in keys for r in k["dns_records"]]


async def test_old_selector_until_activate_then_the_new_one(relay: RelayHandle,
                                                            sink: Sink) -> None:
    """rotate-key: mail is still signed with the active key (verifies with the old record,
    not with the pending one); --activate: the next message is signed with the new
    selector and verifies with the record rotate-key printed; show lists it retired."""
    dom = await relay.ctl.add_domain("example.com")
    old_records = dom["dns_records"]
    user, pw = await relay.ctl.add_user()
    created = await relay.ctl.ok("POST", ROTATE)
    decode(created, schemas.KeyRotation)
    assert created["action"] == "created"
    [pending] = created["selectors"]
    assert pending["state"] == "pending" and pending["algorithm"] == "rsa"
    assert pending["selector"] != dom["selector"]
    new_records = pending["dns_records"]
    assert [r["name"] for r in new_records] == [f"{pending['selector']}._domainkey.example.com"]

    info = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert selectors_of(info, "active") == [dom["selector"]]
    assert selectors_of(info, "pending") == [pending["selector"]]
    assert info["selector"] == dom["selector"]

    data = await send_one(relay, sink, user, pw, "before")
    [sig] = signatures(data)
    assert sig["s"] == dom["selector"]
    assert verifies(data, published(old_records), 0)
    assert not verifies(data, published(new_records), 0)

    activated = await relay.ctl.ok("POST", ROTATE + "/activate")
    assert activated["action"] == "activated"
    assert [k["selector"] for k in activated["selectors"]] == [pending["selector"]]
    assert [k["selector"] for k in activated["retired"]] == [dom["selector"]]

    data = await send_one(relay, sink, user, pw, "after")
    [sig] = signatures(data)
    assert sig["s"] == pending["selector"]
    assert verifies(data, published(new_records), 0)
    assert not verifies(data, published(old_records), 0)

    info = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert info["selector"] == pending["selector"]
    assert selectors_of(info, "active") == [pending["selector"]]
    assert selectors_of(info, "pending") == []
    [retired] = [k for k in info["dkim_selectors"] if k["state"] == "retired"]
    assert retired["selector"] == dom["selector"] and retired["since"] > 0
    assert "dns_records" not in retired  # nothing left to publish
    listed = await relay.ctl.ok("GET", "/v1/domains")
    assert listed["domains"][0]["selector"] == pending["selector"]


async def test_dual_signing_rotates_both_keys(relay_factory: RelayFactory, sink: Sink) -> None:
    """With an Ed25519 key besides the RSA one, rotate-key makes one of each; after
    --activate both signatures use the new selectors and verify."""
    relay = await relay_factory({"dkim": {"dual_ed25519": True}})
    dom = await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user()
    created = await relay.ctl.ok("POST", ROTATE)
    assert sorted(k["algorithm"] for k in created["selectors"]) == ["ed25519", "rsa"]
    new = {k["selector"] for k in created["selectors"]}
    old = {k["selector"] for k in (await relay.ctl.ok("GET", "/v1/domains/example.com"))[
        "dkim_selectors"] if k["state"] == "active"}
    assert len(old) == 2 and not old & new
    await relay.ctl.ok("POST", ROTATE + "/activate")
    data = await send_one(relay, sink, user, pw, "dual")
    sigs = signatures(data)
    assert {s["s"] for s in sigs} == new
    dnsfunc = published(records(created["selectors"]))
    assert verifies(data, dnsfunc, 0) and verifies(data, dnsfunc, 1)
    assert not verifies(data, published(dom["dns_records"]), 0)
    info = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert set(selectors_of(info, "retired")) == old


async def test_a_restart_keeps_pending_and_active(relay_factory: RelayFactory, sink: Sink,
                                                  tmp_path: Path) -> None:
    """A pending key is still pending after a restart (mail signed with the old key);
    activated, the new key still signs after the next restart."""
    relay = await relay_factory()
    dom = await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user()
    [pending] = (await relay.ctl.ok("POST", ROTATE))["selectors"]
    await relay.stop()

    relay = await relay_factory()
    info = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert selectors_of(info, "pending") == [pending["selector"]]
    assert records(k for k in info["dkim_selectors"]  # type: ignore[arg-type]
                   if k["state"] == "pending") == pending["dns_records"]
    data = await send_one(relay, sink, user, pw, "restarted pending")
    assert [s["s"] for s in signatures(data)] == [dom["selector"]]
    await relay.ctl.ok("POST", ROTATE + "/activate")
    await relay.stop()

    relay = await relay_factory()
    data = await send_one(relay, sink, user, pw, "restarted active")
    assert [s["s"] for s in signatures(data)] == [pending["selector"]]
    assert verifies(data, published(pending["dns_records"]), 0)
    info = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert selectors_of(info, "retired") == [dom["selector"]]


async def test_cancel_drops_the_pending_key_and_never_reuses_its_selector(
        relay: RelayHandle, sink: Sink) -> None:
    """--cancel drops the pending key (mail keeps the active selector; nothing to
    activate any more); its selector is never drawn again."""
    dom = await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user()
    relay.relay.lifecycle.selector_token = lambda: "aaaaaaaaaa"
    [pending] = (await relay.ctl.ok("POST", ROTATE))["selectors"]
    cancelled = await relay.ctl.ok("POST", ROTATE + "/cancel")
    assert cancelled["action"] == "cancelled"
    assert [k["selector"] for k in cancelled["selectors"]] == [pending["selector"]]
    info = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert selectors_of(info, "pending") == [] and selectors_of(info, "active") == [
        dom["selector"]]
    status, err = await relay.ctl.call("POST", ROTATE + "/activate")
    assert (status, err["code"]) == (409, "no_pending_key")
    # the same token again would draw the cancelled selector: refused, not reused
    status, err = await relay.ctl.call("POST", ROTATE)
    assert status == 500 and "unused DKIM selector" in err["error"]
    relay.relay.lifecycle.selector_token = lambda: "bbbbbbbbbb"
    [again] = (await relay.ctl.ok("POST", ROTATE))["selectors"]
    assert again["selector"] != pending["selector"]
    data = await send_one(relay, sink, user, pw, "after cancel")
    assert [s["s"] for s in signatures(data)] == [dom["selector"]]


async def test_errors(relay: RelayHandle) -> None:
    """Unknown or deleted domain: 404; a second rotate-key while one is pending: 409
    naming the pending selector; activate or cancel with nothing pending: 409."""
    for suffix in ("", "/activate", "/cancel"):
        status, err = await relay.ctl.call("POST", "/v1/domains/nope.example/rotate-key"
                                           + suffix)
        assert (status, err["code"]) == (404, "not_found"), suffix
    await relay.ctl.add_domain("example.com")
    for suffix in ("/activate", "/cancel"):
        status, err = await relay.ctl.call("POST", ROTATE + suffix)
        assert (status, err["code"]) == (409, "no_pending_key"), suffix
    [pending] = (await relay.ctl.ok("POST", ROTATE))["selectors"]
    status, err = await relay.ctl.call("POST", ROTATE)
    assert (status, err["code"]) == (409, "key_pending")
    assert pending["selector"] in err["error"] and "--activate" in err["error"]
    await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
    status, err = await relay.ctl.call("POST", ROTATE + "/activate")
    assert (status, err["code"]) == (404, "not_found")
    # the deleted domain's pending key is destroyed with it; a new domain of that name
    # starts without one
    await relay.ctl.add_domain("example.com")
    info = await relay.ctl.ok("GET", "/v1/domains/example.com")
    assert selectors_of(info, "pending") == []
    assert pending["selector"] not in selectors_of(info, "active")


async def relayctl(relay: RelayHandle, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "--socket", relay.ctl.path, *args,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_relayctl_rotate_key(relay: RelayHandle) -> None:
    """relayctl domain rotate-key prints the DNS record to publish; show lists the
    pending selector; --activate names the retired one; a refusal is one line, exit 1."""
    dom = await relay.ctl.add_domain("example.com")
    rc, out, err = await relayctl(relay, "domain", "rotate-key", "example.com")
    assert rc == 0, err
    [line] = [x for x in out.splitlines() if "._domainkey.example.com. IN TXT" in x]
    new = line.split()[0].split(".")[0]
    assert "v=DKIM1; k=rsa; p=" in line and new != dom["selector"]
    assert "rotate-key example.com --activate" in out
    rc, out, err = await relayctl(relay, "domain", "show", "example.com")
    assert rc == 0, err
    assert f"{new}  pending (rsa)" in out and f"{dom['selector']}  active (rsa)" in out
    rc, out, err = await relayctl(relay, "domain", "rotate-key", "example.com")
    assert (rc, out) == (1, "") and len(err.strip().splitlines()) == 1
    assert "pending" in err
    rc, out, err = await relayctl(relay, "--json", "domain", "rotate-key", "example.com",
                                  "--activate")
    assert rc == 0, err
    result = json.loads(out)
    assert result["retired"][0]["selector"] == dom["selector"]
    rc, out, err = await relayctl(relay, "domain", "show", "example.com")
    assert f"{dom['selector']}  retired" in out and f"{new}  active" in out
    rc, out, err = await relayctl(relay, "domain", "rotate-key", "example.com", "--activate",
                                  "--cancel")
    assert rc == 2


async def test_schema_7_spool_gains_the_selector_table(tmp_path: Path) -> None:
    """An older spool (schema 7) opens at the current schema; its domain can rotate,
    activate (the active selector retired, never drawn again) and cancel."""
    from relayd.store.directory import DkimKey, KeyPending, NoPendingKey, SqliteDirectory
    from relayd.store.schema import SCHEMA_VERSION
    from relayd.store.spool import Spool

    path = tmp_path / "spool.db"
    spool_at_schema(path, 7, "INSERT INTO domains(name, selector, algorithm, private_key,"
                    " created_at) VALUES ('example.com', 's1', 'rsa', x'01', 1.0)")
    spool = Spool(str(path))
    await spool.open()
    try:
        store = SqliteDirectory(spool)
        [dom] = await store.domains()
        with pytest.raises(NoPendingKey):
            await store.activate_keys(dom.id, 2.0)
        await store.add_pending_keys(dom.id, [DkimKey("s2", "main", "pending", b"k2", 2.0)])
        with pytest.raises(KeyPending):
            await store.add_pending_keys(dom.id, [DkimKey("s3", "main", "pending", b"k3", 3)])
        assert not await store.selectors_used(["s3"])
        retired = await store.activate_keys(dom.id, 4.0)
        assert [(k.selector, k.state, k.at) for k in retired] == [("s1", "retired", 4.0)]
        rec = await store.domain(dom.id)
        assert rec is not None and (rec.selector, rec.private_key) == ("s2", b"k2")
        assert await store.selectors_used(["s1"]) and await store.selectors_used(["s2"])
        await store.add_pending_keys(dom.id, [DkimKey("s4", "main", "pending", b"k4", 5.0)])
        [dropped] = await store.cancel_keys(dom.id, 6.0)
        assert dropped.selector == "s4" and await store.selectors_used(["s4"])
        states = {k.selector: (k.state, k.private_key) for k in await store.dkim_keys(dom.id)}
        assert states == {"s1": ("retired", None), "s4": ("cancelled", None)}
        version = await spool.fetchone("PRAGMA user_version")
    finally:
        await spool.close()
    assert version[0] == SCHEMA_VERSION
