"""What every control operation shares: its error, its state, and the one order of a change.

Owns: ``LifecycleError`` (an operation refused, with its HTTP status and code),
``Shared`` (the database, directory, credential cache, scheduler, clock and lock the
operations of relayd.controlplane.domains, .accounts and .queues work on, one object so
that a reload or a test replacing the clock reaches all of them), and ``agree``, the
one way an operation writes the database and memory (ARCHITECTURE §6, DESIGN.md §3.6):
what takes away the right to send is changed in memory by the caller first and undone
if the write fails; what gives it is applied to memory only after the write succeeded.

Untrusted input: none (callers pass decoded operator requests).
See also: relayd.controlplane.lifecycle (the facade), relayd.store.directory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from relayd.config import Config
from relayd.directory.accounts import DELETED, Account, Directory
from relayd.directory.credentials import CredentialCache, Hasher
from relayd.dkim import signature as dkim
from relayd.queue.scheduler import Scheduler
from relayd.store.deliverylog import DeliveryLog
from relayd.store.directory import DirectoryStore, SqliteDirectory
from relayd.store.spool import Spool

T = TypeVar("T")


class LifecycleError(Exception):
    """An operation refused: ``status`` is the HTTP status, ``code`` a stable token."""

    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def not_found(kind: str, name: str) -> LifecycleError:
    return LifecycleError(f"no such {kind}: {name}", "not_found", 404)


def _nothing() -> None:
    return None


def _ignore(_: object) -> None:
    return None


async def agree(write: Awaitable[T], *, undo: Callable[[], None] = _nothing,
                apply: Callable[[T], None] = _ignore) -> T:
    """Await the database ``write``; if it raises, ``undo`` the memory change the caller
    made before it (taking away a right) and re-raise; else ``apply`` its result to
    memory (giving a right) and return it."""
    try:
        result = await write
    except Exception:
        undo()
        raise
    apply(result)
    return result


class Shared:
    """The state every operation reads and changes; ``lock`` orders the changes."""

    def __init__(self, cfg: Config, spool: Spool, directory: Directory, hasher: Hasher,
                 cache: CredentialCache, scheduler: Scheduler, *, delivery_log: DeliveryLog,
                 clock: Callable[[], float] = time.time,
                 selector_token: Callable[[], str] = dkim.selector_token,
                 log: Callable[..., None] | None = None,
                 warn: Callable[..., None] | None = None,
                 store: DirectoryStore | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.dlog = delivery_log
        #: The directory tables (on the spool's database unless given).
        self.store: DirectoryStore = store or SqliteDirectory(spool)
        self.directory = directory
        self.hasher = hasher
        self.cache = cache
        self.scheduler = scheduler
        self.clock = clock
        self.selector_token = selector_token
        self.log: Callable[..., None] = log or (lambda event, **kw: None)
        self.warn: Callable[..., None] = warn or self.log
        #: The last-connection time last written, per account id.
        self.flushed: dict[int, float | None] = {}
        #: Cluster mode: each account's total as last read from or added to the cluster
        #: database (what this node delivered beyond it is still to be added).
        self.sent_base: dict[int, int] = {}
        self.lock = asyncio.Lock()
        #: relayd.cluster.node.ClusterNode in cluster mode; None: a single node.
        self.cluster: Any = None

    def account(self, username: str, *, allow_deleted: bool = False) -> Account:
        """The account named ``username``; LifecycleError 404 if none (or deleted)."""
        acct = self.directory.account(username)
        if acct is None or (acct.status == DELETED and not allow_deleted):
            raise not_found("user", username)
        return acct
