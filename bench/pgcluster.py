"""The PostgreSQL side of the cluster benchmarks: a throwaway server kept durable, and
the settings that make a relayd process one node of a cluster on it.

Owns: starting ``tests.pgserver.PgServer`` with PostgreSQL's durable defaults
(``fsync``, ``synchronous_commit`` and ``full_page_writes`` on: the directory's commits
pay for their fsync here, as in production, unlike the test suite's server), the
cluster key file every node shares, a node's ``[cluster]`` settings and command-line
flags, and the server's process (its postmaster) for the harness's CPU/RSS sampling.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.pgserver import PgServer


def durable_server(durable: bool = True) -> PgServer:
    """A started PostgreSQL server of its own, durable (unless ``durable`` is false: the
    test suite's settings, for comparison only); ``stop()`` removes it."""
    from tests.pgserver import DURABLE_SETTINGS, SETTINGS, PgServer

    server = PgServer(settings=DURABLE_SETTINGS if durable else SETTINGS)
    server.start()
    return server


def key_file(directory: Path) -> Path:
    """The 32-byte key (base64) that seals DKIM keys; one per cluster, shared by its nodes."""
    path = directory / "cluster.key"
    if not path.exists():
        path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        path.chmod(0o600)
    return path


def cluster_settings(directory: Path) -> dict[str, Any]:
    """The ``[cluster]`` keys of a bench node's config (the DSN and name go as flags)."""
    return {"key_file": str(key_file(directory))}


def node_flags(dsn: str, name: str) -> list[str]:
    """relayd's command-line flags that make it node ``name`` of the cluster at ``dsn``."""
    return ["--cluster-dsn", dsn, "--node-name", name]


def postmaster_pid(server: PgServer) -> int | None:
    """The server's postmaster (every backend is its child), or None if it is not running."""
    try:
        first = (server.data / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError, RuntimeError):
        return None
