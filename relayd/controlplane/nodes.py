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
        version = await cluster.version()
        return schemas.NodeList(version=version, nodes=[schemas.NodeInfo(
            name=r.name, address=r.address, applied_version=r.applied_version,
            behind=max(0, version - r.applied_version),
            heartbeat_age_seconds=round(r.heartbeat_age, 3),
            state="gone" if not r.live else "fenced" if r.fenced else "live",
            queue_depth=r.queue_depth, this=r.name == cluster.name)
            for r in await cluster.nodes()])

    async def node_forget(self, name: str) -> schemas.NodeForgotten:
        """Forget a gone node: changes stop waiting for it, deletes stop asking for it."""
        cluster = self.shared.cluster
        if cluster is None:
            raise not_clustered()
        outcome = await cluster.forget(name)
        if outcome == "unknown":
            raise LifecycleError(f"no such node: {name}", "not_found", 404)
        if outcome == "live":
            raise LifecycleError(
                f"node {name} is live (its heartbeat is recent): stop it first; only a node"
                " that is gone can be forgotten", "node_live", 409)
        self.shared.log("node_forgotten", node=name)
        return schemas.NodeForgotten(name=name)
