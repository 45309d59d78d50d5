"""Delivery to a next hop that advertises PIPELINING (RFC 2920): MAIL, RCPTs and
DATA go in one write, and every recipient still gets its own result."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relayd.config import DeliveryConfig
from relayd.delivery import client as delivery
from tests.conftest import RelayFactory, RelayHandle, Sink, _SinkHandler
from tests.procs import free_port
from tests.test_queue_support import eventually, log_entries, queue_items, submit
from tests.tools import require_tool


class _PipeliningHandler(_SinkHandler):
    async def handle_EHLO(self, server: AioSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


async def _start(idle_timeout: float = 300.0) -> Sink:
    sink = Sink()
    handler = _PipeliningHandler(sink)

    def factory() -> AioSMTP:
        sink.connections += 1
        return AioSMTP(handler, hostname="pipe.test", enable_SMTPUTF8=True,
                       timeout=idle_timeout)

    sink.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


@pytest.fixture
async def pipe_sink() -> AsyncIterator[Sink]:
    """A receiving server that advertises PIPELINING."""
    s = await _start()
    yield s
    assert s.server is not None
    s.server.close()


@pytest.fixture
def pipelined(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts transactions that went through the pipelined path."""
    calls: list[int] = []
    real = delivery.Pool._pipelined

    async def counting(self: delivery.Pool, *args: Any) -> Any:
        calls.append(1)
        return await real(self, *args)

    monkeypatch.setattr(delivery.Pool, "_pipelined", counting)
    return calls


async def _relay(relay_factory: RelayFactory, sink: Sink, extra: dict[str, Any] | None = None,
                 in_process: bool = True) -> tuple[RelayHandle, tuple[str, str]]:
    # In-process delivery (the test fake): the ``pipelined`` fixture counts calls here.
    relay = await relay_factory(extra, smarthost=sink.address, in_process=in_process)
    await relay.ctl.add_domain("example.com")
    return relay, await relay.ctl.add_user("example.com")


async def test_pipelined_delivery_keeps_body_intact(relay_factory: RelayFactory,
                                                    pipe_sink: Sink,
                                                    pipelined: list[int]) -> None:
    """A pipelined transaction delivers envelope and dot-stuffed body unchanged."""
    relay, account = await _relay(relay_factory, pipe_sink)
    client = await relay.client(*account)
    body = b"From: app@example.com\r\nSubject: dots\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n"
    await client.sendmail("app@example.com", ["a@dest.test", "b@dest.test"], body)
    await client.quit()
    [got] = await pipe_sink.wait_for(1)
    assert sorted(got.rcpt_tos) == ["a@dest.test", "b@dest.test"]
    assert got.data.endswith(b"\r\n\r\n.one\r\n..two\r\n.\r\nend\r\n")
    assert pipelined


async def test_pipelined_mixed_recipients(relay_factory: RelayFactory, pipe_sink: Sink,
                                          pipelined: list[int]) -> None:
    """With pipelining, one recipient is delivered, one deferred and one failed."""
    pipe_sink.rcpt_script["later@dest.test"] = "450 4.2.1 mailbox busy"
    pipe_sink.rcpt_script["bad@dest.test"] = "550 5.1.1 no such user"
    relay, account = await _relay(relay_factory, pipe_sink)
    [mid] = await submit(relay, account, ["ok@dest.test", "later@dest.test", "bad@dest.test"])
    await pipe_sink.wait_for(2)  # the message, and the DSN for bad@

    async def three() -> dict[str, Any] | None:
        got = {e["recipient"]: (e["outcome"], e["code"]) for e in await log_entries(relay)
               if e["message_id"] == mid}
        return got if len(got) == 3 else None

    assert await eventually(three) == {"ok@dest.test": ("delivered", 250),
                                       "later@dest.test": ("deferred", 450),
                                       "bad@dest.test": ("failed", 550)}
    [item] = await queue_items(relay, state="deferred")
    assert item["recipients"] == ["later@dest.test"]
    assert pipelined


async def test_pipelined_all_refused_then_next_message(relay_factory: RelayFactory,
                                                       pipe_sink: Sink,
                                                       pipelined: list[int]) -> None:
    """When every recipient is refused, no body is sent and the connection stays usable."""
    pipe_sink.rcpt_script["bad@dest.test"] = "550 5.1.1 no such user"
    relay, account = await _relay(relay_factory, pipe_sink,
                                  {"delivery": {"bounces": False, "connections_per_host": 1}})
    await submit(relay, account, ["bad@dest.test"])
    [entry] = await eventually(lambda: log_entries(relay))
    assert (entry["outcome"], entry["code"]) == ("failed", 550)
    await submit(relay, account, ["ok@dest.test"])
    [got] = await pipe_sink.wait_for(1)
    assert got.rcpt_tos == ["ok@dest.test"] and pipe_sink.connections == 1


async def test_pipelined_data_4xx_defers_all(relay_factory: RelayFactory, pipe_sink: Sink,
                                             pipelined: list[int]) -> None:
    """A 451 after the pipelined body defers every accepted recipient."""
    pipe_sink.script.append("451 4.3.0 try later")
    relay, account = await _relay(relay_factory, pipe_sink)
    await submit(relay, account, ["a@dest.test", "b@dest.test"])

    async def two() -> list[dict[str, Any]] | None:
        entries = await log_entries(relay)
        return entries if len(entries) == 2 else None

    entries = await eventually(two)
    assert {(e["outcome"], e["code"]) for e in entries} == {("deferred", 451)}


async def test_stale_pooled_connection_is_replaced(relay_factory: RelayFactory,
                                                   pipelined: list[int]) -> None:
    """A pooled connection the next hop closed meanwhile is replaced, not deferred."""
    sink = await _start(idle_timeout=0.2)
    try:
        relay, account = await _relay(relay_factory, sink,
                                      {"delivery": {"connections_per_host": 1}})
        await submit(relay, account, ["a@dest.test"])
        await sink.wait_for(1)
        await asyncio.sleep(0.4)  # the next hop's idle timeout closes the pooled connection
        await submit(relay, account, ["b@dest.test"])
        await sink.wait_for(2)
        assert sink.connections == 2

        async def both() -> list[str] | None:
            outcomes = [e["outcome"] for e in await log_entries(relay)]
            return outcomes if len(outcomes) == 2 else None

        assert await eventually(both) == ["delivered", "delivered"]
    finally:
        assert sink.server is not None
        sink.server.close()


async def _postfix_sink(*flags: str) -> tuple[asyncio.subprocess.Process, int]:
    """Postfix's smtp-sink (advertises PIPELINING) on a free loopback port."""
    sink = require_tool("smtp-sink")  # Debian's postfix package (scripts/install-debs.sh)
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it will not run as root
    proc = await asyncio.create_subprocess_exec(
        sink, *user, *flags, f"127.0.0.1:{port}", "50",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def up() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True

    await eventually(up, timeout=5)
    return proc, port


async def test_pipelining_against_postfix_smtp_sink(relay_factory: RelayFactory,
                                                    pipelined: list[int]) -> None:
    """Postfix's smtp-sink takes 30 pipelined two-recipient messages on few connections."""
    proc, port = await _postfix_sink()
    try:
        relay = await relay_factory(smarthost=f"127.0.0.1:{port}", in_process=True)
        await relay.ctl.add_domain("example.com")
        account = await relay.ctl.add_user("example.com")
        await submit(relay, account, ["a@dest.test", "b@dest.test"], count=30)

        async def all_done() -> list[dict[str, Any]] | None:
            entries = await log_entries(relay, limit=1000)
            return entries if len(entries) == 60 else None

        entries = await eventually(all_done)
        assert {(e["outcome"], e["code"]) for e in entries} == {("delivered", 250)}
        assert len(pipelined) == 30
        assert relay.relay.deliverer.connections_opened <= 20
    finally:
        proc.kill()
        await proc.wait()


async def test_pipelined_drop_after_data_defers(relay_factory: RelayFactory,
                                                pipelined: list[int]) -> None:
    """A hop that hangs up after the body, with RCPTs accepted, leaves them deferred."""
    proc, port = await _postfix_sink("-q", ".")
    try:
        relay = await relay_factory(smarthost=f"127.0.0.1:{port}", in_process=True)
        await relay.ctl.add_domain("example.com")
        account = await relay.ctl.add_user("example.com")
        await submit(relay, account, ["a@dest.test", "b@dest.test"])

        async def two() -> list[dict[str, Any]] | None:
            entries = await log_entries(relay)
            return entries if len(entries) == 2 else None

        entries = await eventually(two)
        assert {(e["outcome"], e["code"]) for e in entries} == {("deferred", None)}
        assert pipelined
    finally:
        proc.kill()
        await proc.wait()


def _dotted_body(size: int) -> bytes:
    """A message of about ``size`` bytes whose body lines often start with one or two dots."""
    head = b"From: app@example.com\r\nSubject: big dots\r\n\r\n"
    lines = [b".%d leading dot" % i if i % 3 == 0 else
             b"..%d two dots" % i if i % 3 == 1 else b"plain %d ." % i
             for i in range(size // 16)]
    return head + b"\r\n".join(lines) + b"\r\n.\r\n..\r\nend\r\n"


async def test_large_dotted_body_arrives_byte_exact(relay_factory: RelayFactory,
                                                    pipe_sink: Sink) -> None:
    """A 10 MB body full of dot-led lines crosses the delivery agent and arrives byte-exact."""
    relay, account = await _relay(relay_factory, pipe_sink, in_process=False)
    body = _dotted_body(10 * 1024 * 1024)
    assert len(body) > 10_000_000
    client = await relay.client(*account)
    await client.sendmail("app@example.com", ["a@dest.test"], body)
    await client.quit()
    [got] = await pipe_sink.wait_for(1, timeout=30)
    assert got.data.endswith(body)
    assert b"Received: " in got.data[:len(got.data) - len(body)]  # only headers were added


async def test_unpipelined_body_with_leading_dot_arrives_exact(sink: Sink) -> None:
    """Without PIPELINING, data that starts with a dot and has dot lines arrives unchanged."""
    cfg = DeliveryConfig(smarthost=sink.address)
    pool = delivery.Pool(delivery.Hop("127.0.0.1", sink.port), cfg, "relay.test", None)
    data = b".first\r\n..second\r\nx\r\n.\r\n"
    try:
        [reply] = await pool.send("app@example.com", ["r@dest.test"], data)
    finally:
        await pool.close()
    assert reply.code == 250
    [got] = await sink.wait_for(1)
    assert got.data == data
