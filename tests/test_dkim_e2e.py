"""End to end: mail accepted by relayd arrives at the next hop with DKIM signatures that
dkimpy verifies against exactly the DNS records ``domain add`` told the operator to
publish (relaxed/relaxed; RSA-2048, plus Ed25519 with ``dkim.dual_ed25519``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import dkim
import pytest

from relayd.delivery.agents import AgentPool
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.test_dkim import _NACL  # the cryptography-backed stand-in for PyNaCl

DnsFunc = Callable[..., bytes | None]


@pytest.fixture(autouse=True)
def _nacl_for_dkimpy() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dkim, "nacl", _NACL, raising=False)
        yield


def published(dns_records: list[dict]) -> DnsFunc:
    """A resolver serving only the records from ``domain add`` (CNAMEs followed)."""
    txt = {r["name"].rstrip(".").lower(): r["value"] for r in dns_records if r["type"] == "TXT"}
    cname = {r["name"].rstrip(".").lower(): r["value"].rstrip(".").lower()
             for r in dns_records if r["type"] == "CNAME"}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        key = name.decode().rstrip(".").lower()
        for _ in range(5):
            if key in txt:
                return txt[key].encode()
            if key not in cname:
                return None
            key = cname[key]
        return None

    return dnsfunc


def signatures(data: bytes) -> list[dict[str, str]]:
    """The tags of every DKIM-Signature header, top first."""
    headers = data.split(b"\r\n\r\n", 1)[0].decode()
    out = []
    for m in re.finditer(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", headers, re.M | re.I):
        value = re.sub(r"\s+", "", m.group(1))
        out.append(dict(t.split("=", 1) for t in value.split(";") if t))
    return out


def verifies(data: bytes, dnsfunc: DnsFunc, idx: int) -> bool:
    """True when dkimpy verifies the idx-th signature."""
    try:
        return bool(dkim.DKIM(data).verify(idx=idx, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False


async def deliver_one(relay: RelayHandle, sink: Sink) -> tuple[bytes, list[dict]]:
    """Add example.com and an account, send one message; return it as received and the
    DNS records that were to be published."""
    dom = await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user()
    body = "Hello,  \r\n\r\nline with trailing space \r\n.dot\r\n\r\n\r\n"
    c = await relay.client(user, pw)
    await c.sendmail("app@example.com", ["r@dest.test"], message("dkim test", body))
    await c.quit()
    [got] = await sink.wait_for(1)
    return got.data, dom["dns_records"]


async def test_rsa_signature_verifies_with_published_record(relay: RelayHandle,
                                                            sink: Sink) -> None:
    """The received message carries one rsa-sha256 relaxed/relaxed signature that verifies
    with the published TXT record."""
    data, recs = await deliver_one(relay, sink)
    [sig] = signatures(data)
    assert (sig["a"], sig["c"], sig["d"]) == ("rsa-sha256", "relaxed/relaxed", "example.com")
    dnsfunc = published(recs)
    assert verifies(data, dnsfunc, 0)
    # the check can fail: a changed body does not verify
    assert not verifies(data.replace(b"line with", b"line without"), dnsfunc, 0)


async def test_signature_verifies_through_cname(relay_factory: RelayFactory,
                                                sink: Sink) -> None:
    """With dns.cname_target the signature verifies through the published CNAME."""
    relay = await relay_factory({"dns": {"cname_target": "keys.operator.test"}})
    data, recs = await deliver_one(relay, sink)
    assert {r["type"] for r in recs if r["purpose"] == "dkim"} == {"CNAME"}
    assert verifies(data, published(recs), 0)


async def test_dual_signing_both_verify(relay_factory: RelayFactory, sink: Sink) -> None:
    """With dkim.dual_ed25519 the message has an RSA and an Ed25519 signature, each verifying
    with its own published record."""
    relay = await relay_factory({"dkim": {"dual_ed25519": True}})
    data, recs = await deliver_one(relay, sink)
    sigs = signatures(data)
    assert sorted(s["a"] for s in sigs) == ["ed25519-sha256", "rsa-sha256"]
    assert len({s["s"] for s in sigs}) == 2
    dkim_txt = [r for r in recs if r["type"] == "TXT" and r["purpose"] == "dkim"]
    assert sorted(r["value"].split(";")[1].strip() for r in dkim_txt) == ["k=ed25519", "k=rsa"]
    dnsfunc = published(recs)
    assert verifies(data, dnsfunc, 0) and verifies(data, dnsfunc, 1)
    only_rsa = published([r for r in recs if "k=ed25519" not in r["value"]])
    ed_idx = next(i for i, s in enumerate(sigs) if s["a"] == "ed25519-sha256")
    assert not verifies(data, only_rsa, ed_idx)


async def test_deleted_domain_key_no_longer_signs(relay: RelayHandle, sink: Sink) -> None:
    """After domain delete and re-add, mail is signed with the new selector only."""
    await relay.ctl.add_domain("example.com")
    await relay.ctl.ok("POST", "/v1/domains/example.com/delete", {"confirm": "example.com"})
    data, recs = await deliver_one(relay, sink)  # re-adds example.com
    [sig] = signatures(data)
    new_selector = next(r["name"] for r in recs if r["purpose"] == "dkim").split(".")[0]
    assert sig["s"] == new_selector
    assert verifies(data, published(recs), 0)


@pytest.mark.parametrize("in_process", [True, False], ids=["local-thread", "signing-child"])
async def test_signed_in_a_child_when_one_runs(relay_factory: RelayFactory, sink: Sink,
                                               in_process: bool) -> None:
    """The RSA work runs in the signing child (the main process starts no signing
    thread), never in the delivering agent; with no child at all (the in-process test
    fake), in the local signing thread. All verify."""
    relay = await relay_factory(in_process=in_process)
    data, recs = await deliver_one(relay, sink)
    assert verifies(data, published(recs), 0)
    signer = relay.relay.signer
    assert signer is not None
    assert bool(signer._threads) is in_process
    pool = relay.relay.agents
    if not in_process:
        assert isinstance(pool, AgentPool)
        [delivering] = pool._agents
        assert pool._signer is not None
        # The key went to the child that signed, and only to it.
        assert not delivering.sent_keys
        assert pool._signer.sent_keys


async def test_agent_death_falls_back_to_local_signing(relay: RelayHandle,
                                                       sink: Sink) -> None:
    """A Sign the signing child never answers (it was killed) is signed by the local
    thread: the message is accepted, signed and verifies."""
    import asyncio
    import os
    import signal

    from relayd.delivery.agents import SigningUnavailable

    pool = relay.relay.agents
    assert isinstance(pool, AgentPool)
    dom = await relay.ctl.add_domain("example.com")
    user, pw = await relay.ctl.add_user()
    agent = pool._signer  # the child that signs (and only signs)
    assert agent is not None and agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGSTOP)  # it cannot answer...
    c = await relay.client(user, pw)
    send = asyncio.ensure_future(
        c.sendmail("app@example.com", ["r@dest.test"], message("while dying")))
    for _ in range(200):  # ...the Sign is out
        if agent.signing:
            break
        await asyncio.sleep(0.01)
    assert agent.signing
    waiting = list(agent.signing.values())
    os.kill(agent.proc.pid, signal.SIGKILL)  # ...and it dies
    await send
    await c.quit()
    assert all(isinstance(f.exception(), SigningUnavailable) for f in waiting)
    [got] = await sink.wait_for(1)
    assert verifies(got.data, published(dom["dns_records"]), 0)
    assert relay.relay.signer is not None and relay.relay.signer._threads
