"""The control operations as one object: the facade the control server and the app call.

Owns: building the parts on one shared state — relayd.controlplane.domains
(sending domains and their DKIM keys), .accounts (SMTP accounts, their labels,
last-connection writes), .passwords (reset-password, a kept old password), .audit (the
audit trail), .queues (queued mail, the delivery log), .nodes (the nodes of a cluster),
.suppressions (the suppression lists) — loading the directory at start, and a reload's
new settings. Every operation is one method of a part; this class only hands each one
out under its old name.

Ordering rule (DESIGN.md §3.6, relayd.controlplane.changes.agree): an operation that
*takes away* the right to send (disable, delete, reset-password, domain delete)
changes memory first — account status, epoch (which ends every session's
authentication) and the credential cache — and only then writes the database; if the
write fails, the memory change is rolled back and the error returned. An operation
that *gives* the right to send (enable, add) writes the database first. Either way,
the call returns only when all three agree.

Untrusted input: none here (each part's own). Settings read: none here (the parts').
See also: relayd.controlplane.server, relayd.app.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from control import schemas
from relayd.cluster.node import NotAcknowledged
from relayd.config import Config
from relayd.controlplane import audit, hooks, stats
from relayd.controlplane.accounts import AccountLabels, Accounts
from relayd.controlplane.changes import LifecycleError, Shared
from relayd.controlplane.dkimkeys import DkimKeys
from relayd.controlplane.domains import Domains
from relayd.controlplane.nodes import Nodes
from relayd.controlplane.passwords import Passwords
from relayd.controlplane.queues import Queues
from relayd.controlplane.suppressions import SuppressionLists
from relayd.directory.accounts import Directory
from relayd.directory.credentials import CredentialCache, Hasher
from relayd.dkim import signature as dkim
from relayd.queue.scheduler import Scheduler
from relayd.store.deliverylog import DeliveryLog
from relayd.store.directory import DirectoryStore
from relayd.store.pg import PgError
from relayd.store.spool import Spool

__all__ = ["Lifecycle", "LifecycleError"]

P = ParamSpec("P")
R = TypeVar("R")


class Lifecycle:
    """Every operator operation on domains, accounts and queues."""

    def __init__(self, cfg: Config, spool: Spool, directory: Directory, hasher: Hasher,
                 cache: CredentialCache, scheduler: Scheduler, *, delivery_log: DeliveryLog,
                 clock: Callable[[], float] = time.time,
                 selector_token: Callable[[], str] = dkim.selector_token,
                 log: Callable[..., None] | None = None,
                 warn: Callable[..., None] | None = None,
                 store: DirectoryStore | None = None) -> None:
        self.shared = Shared(cfg, spool, directory, hasher, cache, scheduler,
                             delivery_log=delivery_log, clock=clock,
                             selector_token=selector_token, log=log, warn=warn, store=store)
        self.domains = d = Domains(self.shared)
        self.accounts = a = Accounts(self.shared)
        self.queues = q = Queues(self.shared)
        self.nodes = n = Nodes(self.shared)
        self.passwords = pw = Passwords(self.shared, a.info)
        self.suppressions = sp = SuppressionLists(self.shared)
        self.suppression_list = sp.suppression_list
        self.suppression_add = self._acknowledged(sp.suppression_add)
        self.suppression_remove = self._acknowledged(sp.suppression_remove)
        self.domain_add, self.domain_info = d.domain_add, d.domain_info
        self.domain_list, self.domain_delete = d.domain_list, d.domain_delete
        self.domain_set = d.domain_set
        self.user_add, self.user_show, self.user_list = a.user_add, a.user_show, a.user_list
        self.user_dormant, self.user_disable = a.user_dormant, a.user_disable
        self.user_enable, self.user_reset_password = a.user_enable, pw.user_reset_password
        self.user_expire_old_password = pw.user_expire_old_password
        self.user_delete, self.user_limits = a.user_delete, a.user_limits
        self.user_delete_check = a.user_delete_check
        self.user_networks, self.info = a.user_networks, a.info
        self.user_label = AccountLabels(self.shared, a.info).user_label
        self.audit_list = functools.partial(audit.audit_list, self.shared)
        self.flush_last_connections = functools.partial(stats.flush_last_connections,
                                                        self.shared)
        self.queue_list, self.queue_show = q.queue_list, q.queue_show
        self.queue_purge, self.queue_retry = q.queue_purge, q.queue_retry
        self.queue_hold, self.queue_release = q.queue_hold, q.queue_release
        self.queue_delete = q.queue_delete
        self.delivery_log, self.prune_delivery_log = q.delivery_log, q.prune_delivery_log
        self.node_list, self.node_forget = n.node_list, n.node_forget
        self.dkim_keys = k = DkimKeys(self.shared, d)
        self.domain_rotate_key = self._acknowledged(k.rotate)
        self.domain_activate_key = self._acknowledged(k.activate)
        self.domain_cancel_key = self._acknowledged(k.cancel)
        # Cluster mode: a change returns once every live node has applied it.
        self.domain_add = self._acknowledged(self.domain_add)
        self.domain_delete = self._acknowledged(self.domain_delete)
        self.domain_set = self._acknowledged(self.domain_set)
        self.user_add = self._acknowledged(self.user_add)
        self.user_disable = self._acknowledged(self.user_disable)
        self.user_enable = self._acknowledged(self.user_enable)
        self.user_reset_password = self._acknowledged(self.user_reset_password)
        self.user_expire_old_password = self._acknowledged(self.user_expire_old_password)
        self.user_delete = self._acknowledged(self.user_delete)
        self.user_limits = self._acknowledged(self.user_limits)
        self.user_networks = self._acknowledged(self.user_networks)
        self.user_label = self._acknowledged(self.user_label)

    def _acknowledged(self, op: Callable[P, Awaitable[R]]
                      ) -> Callable[P, Coroutine[Any, Any, R]]:
        """``op``, returning (in cluster mode) only when every live node applied what it
        wrote; the answer then says which nodes did and which were not waited for."""
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            cluster = self.shared.cluster
            try:
                result = await op(*args, **kwargs)
                if cluster is None:
                    return result
                # this node's messages whose commit was queued before the change answer
                # first (on a single node the change's own spool write orders them)
                await self.shared.spool.barrier()
                acks = await cluster.acknowledge()
            except PgError as exc:
                raise LifecycleError(f"the cluster database cannot be used: {exc}",
                                     "cluster_unavailable", 503) from None
            except NotAcknowledged as exc:
                raise LifecycleError(
                    f"the change is stored, but node(s) {', '.join(exc.waiting)} have not"
                    " applied it yet; they apply it when they can (or fence themselves)",
                    "not_acknowledged", 503) from None
            if hasattr(result, "propagation"):
                result.propagation = schemas.Propagation(
                    version=acks.version, acknowledged=acks.acknowledged, gone=acks.gone)
            return result
        return run

    async def load(self) -> None:
        """Fill the directory from the database (at start): domains, then accounts."""
        await self.domains.load()
        await hooks.load(self.shared)
        await self.accounts.load()
        await self.suppressions.load()

    def reconfigure(self, cfg: Config) -> None:
        """A reload: operations from now on read the new settings (limits, retention...)."""
        self.shared.cfg = cfg

    # The settings and the injected clock and selector source, shared by every part
    # (a test replaces the clock here and every operation reads the new one).
    @property
    def cfg(self) -> Config:
        return self.shared.cfg

    @property
    def clock(self) -> Callable[[], float]:
        return self.shared.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.shared.clock = clock

    @property
    def selector_token(self) -> Callable[[], str]:
        return self.shared.selector_token

    @selector_token.setter
    def selector_token(self, token: Callable[[], str]) -> None:
        self.shared.selector_token = token
