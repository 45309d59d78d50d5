"""The delivery agent process: outbound SMTP runs in a child, fed over a
socketpair; a killed child loses nothing, a stopped relay stops it. The same
client also runs in this process behind the test fake (tests/delivery_fake.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.delivery.agents import AgentPool
from tests.conftest import RelayFactory, Sink, _SinkHandler
from tests.delivery_fake import InProcessTransport
from tests.procs import RelayProcess, free_port
from tests.test_queue_support import eventually, log_entries, queue_items, submit

# In the delivery agent process (relayd), and in this process (the test fake).
IN_PROCESS = pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "agent"])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


class _SlowHandler(_SinkHandler):
    """A sink that takes a while to answer the end of DATA."""

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)


async def _slow_sink() -> Sink:
    sink = Sink()
    handler = _SlowHandler(sink)

    def factory() -> AioSMTP:
        sink.connections += 1
        return AioSMTP(handler, hostname="sink.test")

    sink.server = await asyncio.get_running_loop().create_server(factory, sink.host, 0)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


async def _account(relay: Any) -> tuple[str, str]:
    await relay.ctl.add_domain("example.com")
    result: tuple[str, str] = await relay.ctl.add_user("example.com")
    return result


@IN_PROCESS
async def test_delivery_reaches_the_sink(relay_factory: RelayFactory, sink: Sink,
                                         in_process: bool) -> None:
    """Messages with several recipients arrive intact, each recipient logged delivered."""
    relay = await relay_factory(in_process=in_process)
    pool = relay.relay.agents
    if not in_process:
        assert isinstance(pool, AgentPool) and len(pool.delivery_pids) == 1
        assert pool.signer_pid is not None  # DKIM is on: a signing child runs too
        assert os.getpid() not in pool.pids
    else:
        assert isinstance(pool, InProcessTransport)
    account = await _account(relay)
    await submit(relay, account, ["a@dest.test", "b@dest.test"], count=5)
    got = await sink.wait_for(5)
    assert all(sorted(m.rcpt_tos) == ["a@dest.test", "b@dest.test"] for m in got)
    assert all(b"Subject: m" in m.data for m in got)

    async def ten() -> list[dict[str, Any]] | None:
        entries = await log_entries(relay)
        return entries if len(entries) == 10 else None

    entries = await eventually(ten)
    assert {(e["outcome"], e["code"]) for e in entries} == {("delivered", 250)}
    assert 1 <= relay.relay.deliverer.connections_opened == sink.connections


@IN_PROCESS
async def test_per_recipient_replies_cross_the_agent(relay_factory: RelayFactory, sink: Sink,
                                                     in_process: bool) -> None:
    """A refused recipient fails (and bounces) while the other one is delivered."""
    sink.rcpt_script["bad@dest.test"] = "550 5.1.1 no such user"
    relay = await relay_factory(in_process=in_process)
    account = await _account(relay)
    [mid] = await submit(relay, account, ["ok@dest.test", "bad@dest.test"])

    async def both() -> dict[str, Any] | None:
        got = {e["recipient"]: (e["outcome"], e["code"], e["text"])
               for e in await log_entries(relay) if e["message_id"] == mid}
        return got if len(got) == 2 else None

    got = await eventually(both)
    assert got["ok@dest.test"][:2] == ("delivered", 250)
    assert got["bad@dest.test"] == ("failed", 550, "5.1.1 no such user")
    await sink.wait_for(2)  # the message and the DSN


@IN_PROCESS
async def test_unreachable_hop_defers(relay_factory: RelayFactory, in_process: bool) -> None:
    """A next hop that refuses connections leaves the recipient deferred (no code)."""
    relay = await relay_factory(smarthost=f"127.0.0.1:{free_port()}", in_process=in_process)
    account = await _account(relay)
    [mid] = await submit(relay, account, ["a@dest.test"])

    async def one() -> list[dict[str, Any]] | None:
        return [e for e in await log_entries(relay) if e["message_id"] == mid]

    [entry] = await eventually(one)
    assert (entry["outcome"], entry["code"]) == ("deferred", None)
    [item] = await queue_items(relay, state="deferred")
    assert item["recipients"] == ["a@dest.test"]


async def test_killed_agent_loses_nothing(relay_factory: RelayFactory) -> None:
    """SIGKILL of the agent mid-stream defers its jobs; after the restart and a
    ``queue retry`` every message is delivered."""
    sink = await _slow_sink()
    try:
        relay = await relay_factory(smarthost=sink.address)
        pool = relay.relay.agents
        assert isinstance(pool, AgentPool)
        account = await _account(relay)
        sending = asyncio.ensure_future(submit(relay, account, ["r@dest.test"], count=60))
        await sink.wait_for(5)
        [pid] = pool.delivery_pids
        os.kill(pid, signal.SIGKILL)
        ids = await sending

        async def restarted() -> bool:
            return bool(pool.delivery_pids) and pool.delivery_pids != [pid]

        await eventually(restarted)
        assert not _alive(pid)

        async def settled() -> bool:
            entries = await log_entries(relay, limit=1000)
            done = {e["message_id"] for e in entries if e["outcome"] != "deferred"}
            deferred = {e["message_id"] for e in entries if e["outcome"] == "deferred"}
            return len(done | deferred) == len(ids)

        await eventually(settled, timeout=20)
        entries = await log_entries(relay, limit=1000)
        lost = [e for e in entries if e["outcome"] == "deferred"]
        assert lost and all("delivery agent exited" in e["text"] for e in lost)
        await relay.ctl.ok("POST", "/v1/queue/retry", {})

        async def all_delivered() -> bool:
            subjects = {m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
                        for m in sink.messages}
            return len(subjects) == 60 and not await queue_items(relay)

        await eventually(all_delivered, timeout=20)
    finally:
        assert sink.server is not None
        sink.server.close()


async def test_relay_stop_stops_the_agent(relay_factory: RelayFactory, sink: Sink) -> None:
    """A graceful stop waits for the agent to close its connections and exit."""
    relay = await relay_factory()
    pool = relay.relay.agents
    assert isinstance(pool, AgentPool)
    pids = pool.pids
    assert len(pids) == 2  # the delivering child and the signing one
    account = await _account(relay)
    await submit(relay, account, ["a@dest.test"])
    await sink.wait_for(1)
    await relay.stop()
    assert not pool.pids and not any(_alive(pid) for pid in pids)


async def test_agent_follows_the_daemon(tmp_path: Path, sink: Sink) -> None:
    """relayd's SIGTERM stops its agent in order; a SIGKILLed relayd's agent exits too."""
    (tmp_path / "a").mkdir()
    rp = RelayProcess(tmp_path / "a", sink.address)
    await rp.start()
    assert rp.proc is not None
    # The delivering child and the signing one (DKIM is on by default).
    children = await eventually(lambda: _async(_children(rp.proc.pid)))  # type: ignore[union-attr]
    assert len(children) == 2
    assert await rp.terminate() == 0
    assert not any(_alive(child) for child in children)

    (tmp_path / "b").mkdir()
    rp = RelayProcess(tmp_path / "b", sink.address)
    await rp.start()
    assert rp.proc is not None
    children = await eventually(lambda: _async(_children(rp.proc.pid)))  # type: ignore[union-attr]
    assert len(children) == 2
    await rp.kill()

    async def gone() -> bool:
        return not any(_alive(child) for child in children)

    await eventually(gone, timeout=5)


async def _async(value: Any) -> Any:
    return value


@IN_PROCESS
async def test_large_message_goes_from_its_spool_file(relay_factory: RelayFactory, sink: Sink,
                                                      in_process: bool) -> None:
    """A message stored in a file of its own is read from that file by whoever sends it
    (the agent, or this process with the test fake): it arrives byte for byte, and the file
    is gone once the delivery is recorded."""
    from relayd.store.spool import EXTERNAL_MIN
    from tests.conftest import message

    relay = await relay_factory(in_process=in_process)
    account = await _account(relay)
    body = "".join(f"line {i:06d} " + "q" * 60 + "\r\n" for i in range(6000))
    big = message("big", body=body)
    assert len(big) > EXTERNAL_MIN
    client = await relay.client(*account)
    await client.sendmail("app@example.com", ["big@dest.test"], big)
    await client.quit()
    [got] = await sink.wait_for(1)
    assert got.data.endswith(big.split(b"\r\n\r\n", 1)[1])
    bodies = Path(relay.relay.spool.bodies.dir)

    async def no_files() -> bool | None:
        return True if not list(bodies.iterdir()) else None

    assert await eventually(no_files)


@IN_PROCESS
async def test_unreadable_body_file_defers_with_a_clear_text(relay_factory: RelayFactory,
                                                             in_process: bool) -> None:
    """A spool file that is gone when its transaction starts (purged meanwhile) is a
    temporary failure with a text saying so, in the agent and in this process (the fake)."""
    from relayd.delivery.client import BodyFile

    relay = await relay_factory(in_process=in_process)
    d = relay.relay.deliverer
    replies = await d.send(d.router.smarthost, "app@example.com", ["a@dest.test", "b@dest.test"],
                           BodyFile("/nonexistent/relayd-body", 1000))
    assert [(r.code, r.text) for r in replies] == [
        (None, "message data is gone (purged or delivered meanwhile)")] * 2


async def test_a_key_the_agent_cannot_load_fails_only_its_own_signature() -> None:
    """The Sign frames of one batch are answered one by one: a key that does not load
    in the signing child fails its own message (the session then says 451), the rest
    are signed."""
    from relayd.config import DeliveryConfig
    from relayd.delivery.agent_child import SIGN_SLICE
    from relayd.dkim import signature as dkim

    now = 1_700_000_000
    pool = AgentPool(DeliveryConfig(), "test.invalid", 1, signer=True)
    await pool.start()
    try:
        good = dkim.Signer("example.com", "s1", dkim.generate_private_key("ed25519"))
        bad = dkim.Signer("example.org", "s2", dkim.generate_private_key("ed25519"))
        bad.pem = b"not a key"  # what the child gets: it cannot load it
        # More than one slice of the child's signing (SIGN_SLICE), the bad key in the middle.
        n = SIGN_SLICE + 12
        middle = n // 2
        msgs = [b"From: a@example.com\r\n\r\nbody %d\r\n" % i for i in range(n)]
        keys = [[bad] if i == middle else [good] for i in range(n)]
        futs = [pool.sign(k, m, now) for k, m in zip(keys, msgs, strict=True)]
        started = [f for f in futs if f is not None]
        assert len(started) == n
        answers = await asyncio.wait_for(asyncio.gather(*started, return_exceptions=True), 30)
        failed = answers.pop(middle)
        assert isinstance(failed, RuntimeError) and "unknown DKIM key" in str(failed)
        del msgs[middle]
        assert answers == [dkim.signature_headers([good], m, now) for m in msgs]
    finally:
        await pool.close()


async def test_a_key_whose_signer_is_gone_is_dropped_by_the_agent() -> None:
    """When a key's Signer is collected (domain deleted, key replaced), the child drops the
    key: a Sign naming it afterwards is refused, so no child keeps every key it ever had."""
    import gc

    from relayd.config import DeliveryConfig
    from relayd.delivery.wire import Sign
    from relayd.dkim import signature as dkim

    now = 1_700_000_000
    msg = b"From: a@example.com\r\n\r\nbody\r\n"
    pool = AgentPool(DeliveryConfig(), "test.invalid", 1, signer=True)
    await pool.start()
    try:
        signer = dkim.Signer("example.com", "s1", dkim.generate_private_key("ed25519"))
        first = pool.sign([signer], msg, now)
        assert first is not None
        assert await first == dkim.signature_headers([signer], msg, now)
        key_id = signer.key_id
        agent = pool._signer
        assert agent is not None and key_id in agent.sent_keys
        del signer, first
        gc.collect()
        for _ in range(100):
            if key_id not in agent.sent_keys:
                break
            await asyncio.sleep(0.01)
        assert key_id not in agent.sent_keys
        # Ask the child for that key anyway, as the pool never would: it no longer has it.
        assert agent.side is not None
        pool._ids += 1
        probe: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        agent.signing[pool._ids] = probe
        agent.side.send(Sign(pool._ids, [key_id], now, len(msg)), msg)
        with pytest.raises(RuntimeError, match="unknown DKIM key"):
            await asyncio.wait_for(probe, 10)
    finally:
        await pool.close()


async def test_the_signing_child_only_signs_and_comes_back_after_a_kill(sink: Sink) -> None:
    """With ``signer=True`` one more child signs every message and delivers none; the
    delivering child never sees a key. Killed, the signing child fails what it had not
    answered (SigningUnavailable: the session signs locally), deliveries go on, and a
    new signing child takes over, with the keys sent to it afresh."""
    from relayd.config import DeliveryConfig
    from relayd.delivery.agents import SigningUnavailable
    from relayd.delivery.client import Hop
    from relayd.dkim import signature as dkim

    now = 1_700_000_000
    msg = b"From: a@example.com\r\nTo: b@example.net\r\n\r\nbody\r\n"
    pool = AgentPool(DeliveryConfig(), "test.invalid", 1, signer=True)
    await pool.start()
    try:
        first_signer = pool.signer_pid
        assert first_signer is not None and len(pool.pids) == 2 and first_signer in pool.pids
        signer = dkim.Signer("example.com", "s1", dkim.generate_private_key("ed25519"))
        fut = pool.sign([signer], msg, now)
        assert fut is not None
        assert await asyncio.wait_for(fut, 10) == dkim.signature_headers([signer], msg, now)
        assert not pool._agents[0].sent_keys  # the delivering child has no key

        hop = Hop(sink.host, sink.port)
        replies = await pool.send(hop, "a@example.com", ["b@example.net"], msg)
        assert [r.code for r in replies] == [250]

        # A Sign the signing child will never answer: it is killed first.
        os.kill(first_signer, signal.SIGSTOP)
        pending = pool.sign([signer], msg, now)
        assert pending is not None
        os.kill(first_signer, signal.SIGKILL)
        with pytest.raises(SigningUnavailable):
            await asyncio.wait_for(pending, 10)
        replies = await pool.send(hop, "a@example.com", ["c@example.net"], msg)
        assert [r.code for r in replies] == [250]  # delivery did not wait for the signer
        await sink.wait_for(2)

        async def replaced() -> bool:
            return pool.signer_pid not in (None, first_signer)

        await eventually(replaced)
        again = pool.sign([signer], msg, now + 1)
        assert again is not None
        assert await asyncio.wait_for(again, 10) == dkim.signature_headers([signer], msg,
                                                                           now + 1)
        assert len(pool.pids) == 2
    finally:
        await pool.close()
    assert not _alive(first_signer)


def test_the_child_refuses_a_command_line_it_does_not_know(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--fd N --role deliver|sign``; anything else is a usage error
    (exit 2), never a child running on a bad socket."""
    from relayd.delivery.agent_child import main

    for argv in (["--fd"], ["--fd", "3"], ["--fd", "3", "--role"],
                 ["--fd", "3", "--role", "boss"], ["--fd", "x", "--role", "sign"],
                 ["--role", "sign", "--fd", "3"]):
        assert main(argv) == 2, argv
        assert ("usage: python -m relayd.delivery.agent_child --fd N --role deliver|sign"
                in capsys.readouterr().err)
