"""Three relayd nodes on one PostgreSQL database, for the cluster tests.

Each node runs in this test process (like ``relay_factory``'s relays) on its own loopback
address (127.0.0.1, .2, .3), with its own spool and control socket, delivering to the
test's sink. The intervals are short so that fencing and "gone" happen within seconds.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from tests.conftest import RelayFactory, RelayHandle

#: Short intervals: fenced after 1 s without the database, gone after 2 s.
TIMING = {"heartbeat_seconds": 0.2, "fence_seconds": 1.0, "gone_seconds": 2.0}


def key_file(tmp: Path) -> Path:
    """The 32-byte key that seals DKIM keys, shared by every node of the cluster."""
    path = tmp / "cluster.key"
    if not path.exists():
        path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def node_config(dsn: str, name: str, tmp: Path, address: str,
                **cluster: Any) -> dict[str, Any]:
    """The configuration overrides of one node."""
    return {"smtp": {"listen": f"{address}:0"},
            "cluster": {"dsn": dsn, "node_name": name, "key_file": str(key_file(tmp)),
                        **TIMING, **cluster}}


async def start_node(relay_factory: RelayFactory, dsn: str, name: str, tmp: Path,
                     address: str, **cluster: Any) -> RelayHandle:
    """One node, started (it has joined the cluster when this returns)."""
    data = tmp / name
    data.mkdir(exist_ok=True)
    return await relay_factory(node_config(dsn, name, tmp, address, **cluster), data=data)


async def three_nodes(relay_factory: RelayFactory, dsn: str,
                      tmp: Path) -> list[RelayHandle]:
    """Nodes a, b and c on 127.0.0.1, 127.0.0.2 and 127.0.0.3."""
    return [await start_node(relay_factory, dsn, name, tmp, f"127.0.0.{i}")
            for i, name in enumerate("abc", start=1)]
