"""The nodes of a cluster, as the operator sees and manages them.

Owns: ``relayctl node list`` and ``node forget`` (``GET /v1/nodes``,
``POST /v1/nodes/{name}/forget``). On a single node (no ``[cluster] dsn``) both are
refused with 409 ``not_clustered``; in cluster mode they are answered by the cluster
node (``Shared.cluster``, relayd.cluster.node.ClusterNode), which reads the node table
and raises LifecycleError itself (404 ``not_found``, 409 ``node_live``).

Untrusted input: a node name from the request path (passed on, never interpreted here).
See also: relayd.controlplane.lifecycle (the facade), control.schemas (NodeList).
"""

from __future__ import annotations

from control import schemas
from relayd.controlplane.changes import LifecycleError, Shared


def not_clustered() -> LifecycleError:
    """The refusal of a cluster operation on a single node."""
    return LifecycleError("this relayd is a single node (no [cluster] dsn)",
                          "not_clustered", 409)


class Nodes:
    """Node list and forget, on the shared state."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    async def node_list(self) -> schemas.NodeList:
        """Every node the cluster knows, with the control-plane version."""
        cluster = self.shared.cluster
        if cluster is None:
            raise not_clustered()
        result: schemas.NodeList = await cluster.node_list()
        return result

    async def node_forget(self, name: str) -> schemas.NodeForgotten:
        """Forget a gone node: changes stop waiting for it, deletes stop asking for it."""
        cluster = self.shared.cluster
        if cluster is None:
            raise not_clustered()
        result: schemas.NodeForgotten = await cluster.node_forget(name)
        return result
