"""Issue 12, item 2, against a real relayd process: clients stuck after STARTTLS (the
handshake never started) give their slots back at the idle timeout, and SIGTERM with
such clients, timed out or still waiting, ends the process promptly with exit code 0."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import trustme

from tests.procs import RelayProcess
from tests.rawsmtp import Raw
from tests.test_holes_sessions import stuck_in_starttls

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CLIENTS = 40


def _tls_toml(tmp: Path, idle: float) -> str:
    """An [smtp] section with a throw-away certificate and a short idle timeout."""
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return (f'[smtp]\ntls_cert_file = "{cert_file}"\ntls_key_file = "{key_file}"\n'
            f"idle_timeout_seconds = {idle}\nmax_connections_per_ip = {CLIENTS}\n")



async def _relay(tmp: Path, procs: list[RelayProcess], idle: float) -> RelayProcess:
    rp = RelayProcess(tmp, "127.0.0.1:9", _tls_toml(tmp, idle))  # nothing is delivered
    procs.append(rp)
    await rp.start()
    return rp


async def _exits_promptly(rp: RelayProcess, within: float) -> None:
    """SIGTERM; the process must exit with 0 within ``within`` seconds (the grace is 10)."""
    assert rp.proc is not None
    started = time.monotonic()
    try:
        code = await rp.terminate(timeout=within)
    except TimeoutError:
        pytest.fail(f"relayd still alive {within} s after SIGTERM: "
                    f"{rp.log.read_text(errors='replace')[-1500:]}")
    assert code == 0, rp.log.read_text(errors="replace")[-1500:]
    assert time.monotonic() - started < within
    assert "Traceback" not in rp.log.read_text(errors="replace")


async def test_timed_out_starttls_clients_free_their_slots(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """Clients stuck after STARTTLS fill the per-address cap; after the idle timeout the
    process counts no session and accepts that address again."""
    rp = await _relay(tmp_path, procs, idle=1.0)
    clients = await stuck_in_starttls("127.0.0.1", rp.port, CLIENTS)
    for raw in clients:
        assert await raw.closed_by_server(10)
    deadline = time.monotonic() + 5
    while (await rp.ctl("status"))["sessions"] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (await rp.ctl("status"))["sessions"] == 0
    again = await Raw.open("127.0.0.1", rp.port)
    assert again.greeting == "220 relay.test ESMTP relayd"
    await again.quit()


async def test_sigterm_after_starttls_clients_timed_out_exits_promptly(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """SIGTERM after clients stuck in STARTTLS were dropped at the idle timeout ends the
    process with 0, no traceback, well before the shutdown grace (10 s) runs out."""
    rp = await _relay(tmp_path, procs, idle=1.0)
    clients = await stuck_in_starttls("127.0.0.1", rp.port, CLIENTS)
    for raw in clients:
        assert await raw.closed_by_server(10)
    await _exits_promptly(rp, 5)


async def test_sigterm_with_clients_waiting_in_starttls_exits_promptly(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """SIGTERM while clients still wait in a STARTTLS handshake drops them at once and
    exits 0 well before the shutdown grace (10 s) runs out."""
    rp = await _relay(tmp_path, procs, idle=60.0)
    clients = await stuck_in_starttls("127.0.0.1", rp.port, CLIENTS)
    await _exits_promptly(rp, 5)
    for raw in clients:
        assert await raw.closed_by_server(2)
