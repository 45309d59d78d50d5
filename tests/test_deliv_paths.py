"""One path per job on the delivery side (issue 14, item 2): delivery always runs in
the agent processes (``agent_processes = 0`` is a configuration error), only the
signing child signs, and a file that still sets the removed ``[dkim]
signing_process`` keeps loading with one ``setting_ignored`` warning at start."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from relayd import config
from relayd.delivery.agents import AgentPool
from relayd.delivery.client import Deliverer, Hop
from tests.conftest import RelayFactory, Sink
from tests.procs import LIVE, free_port
from tests.test_config_lookup import REPO, _relayd, _started_and_logged

MSG = b"From: a@example.com\r\nTo: b@example.net\r\n\r\nbody\r\n"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_zero_agent_processes_is_an_error_naming_the_key(value: str) -> None:
    """``agent_processes`` below 1 is refused, and the error names the key."""
    with pytest.raises(config.ConfigError, match=r"delivery\.agent_processes"):
        config.loads(f"[delivery]\nagent_processes = {value}\n")
    assert config.loads("[delivery]\nagent_processes = 2\n").delivery.agent_processes == 2


def test_zero_agent_processes_stops_relayd_with_exit_2(tmp_path: Path) -> None:
    """``relayd --check-config`` on such a file: exit 2, the key named on stderr."""
    path = tmp_path / "bad.toml"
    path.write_text("[delivery]\nagent_processes = 0\n")
    r = _relayd("--config", str(path), "--check-config")
    assert r.returncode == 2
    assert "delivery.agent_processes" in r.stderr


def test_signing_process_is_gone_but_an_old_file_still_loads() -> None:
    """The shipped file no longer has it; a file that does loads, the setting named as
    ignored; ``enabled`` and the other [dkim] keys still apply."""
    shipped = (REPO / "config" / "relayd.toml").read_text()
    assert "signing_process" not in shipped
    assert config.loads(shipped).ignored_settings() == []
    old = config.loads("[dkim]\nenabled = false\nsigning_process = true\n")
    assert old.ignored_settings() == ["dkim.signing_process"]
    assert old.dkim.enabled is False
    assert config.loads("[dkim]\nsigning_process = false\n").ignored_settings() == [
        "dkim.signing_process"]
    # A reload or override keeps it ignored, not turned into a setting again.
    again = config.with_overrides(old, listen="127.0.0.1:2525")
    assert again.ignored_settings() == ["dkim.signing_process"]


async def test_relayd_logs_setting_ignored_once_at_start(tmp_path: Path) -> None:
    """A started relayd whose file sets ``signing_process`` warns once, naming it."""
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "state"}"\n'
                   "[dkim]\nsigning_process = true\n")
    port = free_port()
    log = tmp_path / "relayd.log"
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd.app", "--config", str(cfg),
            "--listen", f"127.0.0.1:{port}", "--metrics-listen", "", cwd=tmp_path,
            stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL, env=env)
    LIVE.add(proc)
    try:
        lines = await _started_and_logged(proc, log, port)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)
        LIVE.discard(proc)
    ignored = [x for x in lines if x.get("event") == "setting_ignored"]
    assert len(ignored) == 1
    assert (ignored[0]["setting"], ignored[0]["level"]) == ("dkim.signing_process", "warning")


async def test_the_relay_sends_through_the_agents_it_wired(relay_factory: RelayFactory,
                                                           sink: Sink) -> None:
    """relayd.app builds the AgentPool and gives it to the Deliverer; with DKIM off no
    signing child runs and the agents are all there is."""
    relay = await relay_factory({"dkim": {"enabled": False},
                                 "delivery": {"agent_processes": 2}})
    agents, deliverer = relay.relay.agents, relay.relay.deliverer
    assert isinstance(agents, AgentPool) and isinstance(deliverer, Deliverer)
    assert deliverer.transport is agents
    assert len(agents.delivery_pids) == 2 and agents.signer_pid is None
    assert len(agents.pids) == 2 and os.getpid() not in agents.pids
    replies = await deliverer.send(deliverer.router.smarthost, "a@example.com",
                                   ["b@example.net"], MSG)
    assert [r.code for r in replies] == [250]
    await sink.wait_for(1)
    assert deliverer.connections_opened == 1


async def test_without_a_signing_child_the_agents_do_not_sign(sink: Sink) -> None:
    """An AgentPool without the signing child answers ``sign`` with None (the caller
    signs in its local thread): a delivery agent is never asked to sign."""
    from relayd.dkim import signature as dkim

    pool = AgentPool(config.DeliveryConfig(), "test.invalid", 1)
    await pool.start()
    try:
        signer = dkim.Signer("example.com", "s1", dkim.generate_private_key("ed25519"))
        assert pool.sign([signer], MSG, 1_700_000_000) is None
        assert not pool._agents[0].sent_keys and not pool._agents[0].signing
        replies = await pool.send(Hop(sink.host, sink.port), "a@example.com",
                                  ["b@example.net"], MSG)
        assert [r.code for r in replies] == [250]
    finally:
        await pool.close()


def test_an_agent_pool_needs_an_agent() -> None:
    """No AgentPool without a delivery agent: there is no in-process path to fall to."""
    with pytest.raises(ValueError, match="at least one"):
        AgentPool(config.DeliveryConfig(), "test.invalid", 0)
