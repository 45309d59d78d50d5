"""Connection-level failures defer: nothing listening, a next hop that never
answers, one that stalls after DATA, and TLS that cannot be set up."""

from __future__ import annotations

from typing import Any

from tests.conftest import RelayFactory, RelayHandle, Sink
from tests.procs import free_port
from tests.test_queue_support import StallServer, eventually, log_entries, queue_items, submit

FAST = {"delivery": {"connect_timeout_seconds": 0.5, "command_timeout_seconds": 0.5}}


async def _deferred(relay: RelayHandle) -> dict[str, Any]:
    async def one() -> list[dict[str, Any]]:
        return await log_entries(relay)
    [entry] = await eventually(one)
    assert entry["outcome"] == "deferred" and entry["code"] is None, entry
    [item] = await queue_items(relay, state="deferred")
    assert item["attempts"] == 1 and item["next_attempt"] is not None
    return entry


async def _start(relay_factory: RelayFactory, smarthost: str,
                 extra: dict[str, Any] | None = None) -> tuple[RelayHandle, tuple[str, str]]:
    relay = await relay_factory(extra or FAST, smarthost=smarthost)
    await relay.ctl.add_domain("example.com")
    return relay, await relay.ctl.add_user("example.com")


async def test_refused_connection_defers(relay_factory: RelayFactory) -> None:
    """Nothing listening at the next hop: the recipient is deferred, not failed."""
    relay, account = await _start(relay_factory, f"127.0.0.1:{free_port()}")
    await submit(relay, account, ["r@dest.test"])
    entry = await _deferred(relay)
    assert "connect" in entry["text"].lower() or "refused" in entry["text"].lower()


async def test_silent_next_hop_defers_after_timeout(relay_factory: RelayFactory) -> None:
    """A next hop that accepts TCP but never greets is deferred after the connect timeout."""
    stall = await StallServer().start()
    try:
        relay, account = await _start(relay_factory, stall.address)
        await submit(relay, account, ["r@dest.test"])
        entry = await _deferred(relay)
        assert "timeout" in entry["text"].lower() or "timed out" in entry["text"].lower()
        assert stall.connections == 1
    finally:
        await stall.stop()


async def test_no_answer_after_data_defers(relay_factory: RelayFactory) -> None:
    """A next hop that never answers the end of DATA is deferred after the command timeout."""
    stall = await StallServer(at_data=True).start()
    try:
        relay, account = await _start(relay_factory, stall.address)
        await submit(relay, account, ["r@dest.test"])
        await _deferred(relay)
        assert stall.data_started.is_set()
    finally:
        await stall.stop()


async def test_tls_failure_defers(relay_factory: RelayFactory, sink: Sink) -> None:
    """Implicit TLS towards a plaintext server fails the handshake: deferred."""
    relay, account = await _start(relay_factory, sink.address,
                                  {"delivery": {**FAST["delivery"], "smarthost_tls": "tls"}})
    await submit(relay, account, ["r@dest.test"])
    await _deferred(relay)
    assert sink.messages == []


async def test_starttls_not_offered_defers(relay_factory: RelayFactory, sink: Sink) -> None:
    """Required STARTTLS that the next hop does not offer defers instead of sending in clear."""
    relay, account = await _start(relay_factory, sink.address,
                                  {"delivery": {**FAST["delivery"],
                                                "smarthost_tls": "starttls"}})
    await submit(relay, account, ["r@dest.test"])
    await _deferred(relay)
    assert sink.messages == []
