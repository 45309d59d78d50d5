"""relayctl's output in cluster mode (issue 16 item 9): the interactive delete asks every
node before prompting (the refusal with the count per node), and a domain delete's
answer on PostgreSQL carries its queue counts, with the propagation line on stderr so
that ``--json`` stays alone on stdout. Real PostgreSQL, real nodes, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster_support import TIMING, key_file, start_node
from tests.conftest import RelayFactory, message
from tests.procs import free_port
from tests.rawsmtp import Raw
from tests.test_cli_prompt import Terminal
from tests.test_relayctl import relayctl

pytestmark = pytest.mark.timeout(90)


async def test_cluster_delete_refused_before_prompt_then_domain_delete_counts(
        pg_dsn: str, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """Mail queued on node b (its next hop is down): user delete on a terminal of node a is
    refused at once with "(2 on b)", no prompt; domain delete through b reports b's two
    messages as retrying (deferred), its JSON alone on stdout and the acknowledgement on stderr."""
    dead = f"127.0.0.1:{free_port()}"
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = await relay_factory(
        {"smtp": {"listen": "127.0.0.2:0"},
         "cluster": {"dsn": pg_dsn, "node_name": "b", "key_file": str(key_file(tmp_path)),
                     **TIMING}}, smarthost=dead, data=b_dir)
    await a.ctl.add_domain("example.com")
    user, password = await a.ctl.add_user("example.com")
    raw = await Raw.open(b.host, b.port)
    assert (await raw.login(user, password)).startswith("235 ")
    for i in range(2):
        assert (await raw.transaction("app@example.com", [f"r{i}@dest.test"],
                                      message(f"held {i}"))).startswith("250 ")
    raw.close()

    term = Terminal()
    await term.start(a.ctl.path, "user", "delete", user)
    rc, out = await term.finish()
    assert rc == 1, out
    assert f"{user} still has 2 queued message(s) (2 on b)" in out
    assert "Type the username" not in out

    rc, out, err = await relayctl(b.ctl.path, "--json", "domain", "delete", "example.com",
                                  "--confirm", "example.com")
    assert rc == 0, err
    answer = json.loads(out)
    assert (answer["held"], answer["retrying"], answer["messages_held"]) == (
        {"messages": 0, "recipients": 0}, {"messages": 2, "recipients": 2}, 0)
    assert sorted(answer["propagation"]["acknowledged"]) == ["a", "b"]
    assert "acknowledged by 2 node(s): " in err
