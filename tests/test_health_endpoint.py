"""GET /health on the metrics listener (issue 15, operating a cluster): what a load
balancer checks. 200 ``ok`` on a running relay; 503 with the reason once a stop has
begun (a real process, a real SIGTERM, an open transaction keeping the listener up
through the grace period) and while the node is fenced; plain text, never cached."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.conftest import RelayHandle, Sink
from tests.procs import RelayProcess, free_port


async def _health(base: str, method: str = "GET") -> tuple[int, str, str, str]:
    """(status, content type, Cache-Control, body) of ``/health`` at ``base``."""
    async with aiohttp.ClientSession() as s, s.request(method, f"{base}/health") as resp:
        return (resp.status, resp.content_type, resp.headers.get("Cache-Control", ""),
                await resp.text())


def _base(relay: RelayHandle) -> str:
    return relay.metrics_url.removesuffix("/metrics")


async def test_running_relay_is_healthy(relay: RelayHandle) -> None:
    """A running relay answers 200 ``ok``, text/plain, not cacheable; HEAD too."""
    assert await _health(_base(relay)) == (200, "text/plain", "no-store", "ok\n")
    status, _, _, body = await _health(_base(relay), "HEAD")
    assert (status, body) == (200, "")


async def test_stop_signal_makes_it_unhealthy(relay: RelayHandle) -> None:
    """From the stop signal on (before anything is closed), /health answers 503."""
    relay.relay.on_stop_signal()
    assert await _health(_base(relay)) == (503, "text/plain", "no-store", "stopping\n")


async def test_sigterm_turns_health_503_during_the_grace_period(tmp_path: Path,
                                                                 sink: Sink) -> None:
    """A real relayd process with an open transaction: after SIGTERM the listener stays
    up through the grace period and /health says 503 ``stopping``; then it exits 0."""
    port = free_port()
    rp = RelayProcess(tmp_path, sink.address)
    rp.config.write_text(rp.config.read_text().replace(
        'listen = ""', f'listen = "127.0.0.1:{port}"'))
    base = f"http://127.0.0.1:{port}"
    await rp.start()
    try:
        client = await rp.sender()
        assert (await _health(base))[0] == 200
        await client.mail("app@example.com")  # a transaction: the session is not idle
        assert rp.proc is not None
        rp.proc.terminate()
        answer: tuple[int, str, str, str] | None = None
        for _ in range(100):
            answer = await _health(base)
            if answer[0] != 200:
                break
            await asyncio.sleep(0.05)
        assert answer == (503, "text/plain", "no-store", "stopping\n")
        client.close()
        assert await asyncio.wait_for(rp.proc.wait(), 30) == 0
    finally:
        if rp.proc is not None and rp.proc.returncode is None:
            await rp.kill()
