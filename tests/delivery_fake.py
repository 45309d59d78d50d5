"""An in-process ``Transport``: a test fake for relayd.delivery.agents.AgentPool.

relayd always runs its transactions in delivery agent processes. A test that
must look inside the client (count calls with monkeypatch, read a pool's idle
connections) runs the same ``Pools`` here instead, behind the same interface:
``relay_factory(..., in_process=True)``. It never signs (the relay then signs in
its local thread) and never takes a fast-path ``submit``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from relayd.config import DeliveryConfig
from relayd.delivery.client import BodyFile, Hop, Pools, RcptReply


class InProcessTransport:
    """``Pools`` of this process behind relayd.delivery.client.Transport."""

    def __init__(self, cfg: DeliveryConfig, helo: str) -> None:
        self.pools = Pools(cfg, helo)

    async def start(self) -> None:
        """Nothing to start."""

    async def send(self, hop: Hop, sender: str, rcpts: Sequence[str],
                   data: bytes | BodyFile) -> list[RcptReply]:
        """One transaction, in this process."""
        return await self.pools.send(hop, sender, rcpts, data)

    def submit(self, hop: Hop, sender: str, rcpts: Sequence[str], data: bytes,
               done: Callable[[list[RcptReply]], None]) -> bool:
        """Never: the scheduler then uses ``send``."""
        return False

    def reconfigure(self, cfg: DeliveryConfig) -> None:
        """New settings for the pools' next connections."""
        self.pools.cfg = cfg

    @property
    def connections_opened(self) -> int:
        """Connections the pools opened."""
        return self.pools.connections_opened

    async def close(self) -> None:
        """QUIT the pooled connections."""
        await self.pools.close()
