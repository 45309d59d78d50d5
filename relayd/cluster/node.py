"""This node's membership of a cluster: following the change log, heartbeats, fencing,
and waiting until every live node has applied a change.

Owns: the order in which a node joins (LISTEN first, then read the version, then the
caller loads the directory, then catch up from that version: nothing committed in
between is missed); following the change log in version order whenever a
``relayd_control`` notification arrives and at every heartbeat (a lost notification
delays a change by one heartbeat at most); applying each change through the function
the control plane gives (it reads the changed row again) and then recording the
applied version; the heartbeat (written with the database clock); fencing — when the
last successful round trip to PostgreSQL is older than ``fence_seconds``, or while a
node that was cut off has not caught up, :attr:`fenced` is true and the SMTP server
refuses new logins and new mail; and :meth:`acknowledge`, which returns when every
node that is live (heartbeat younger than ``gone_seconds``) has applied a version.

The fencing interval is shorter than ``gone_seconds``: a node the others stop waiting
for has already fenced itself, so it accepts nothing on the strength of a directory
it could not keep current.

Untrusted input: none. Settings read: [cluster].
See also: relayd.store.pgdirectory (the tables), relayd.controlplane.follow (applying a
change to memory), docs/CLUSTER.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relayd.store.pg import Database, Listener, PgError
from relayd.store.pgdirectory import ACK_CHANNEL, CONTROL_CHANNEL, Change, NodeRow, PgDirectory

Apply = Callable[[Change], Awaitable[None]]
Resync = Callable[[], Awaitable[None]]

#: How long the change log is kept (every live node has applied what is dropped; a
#: node that was away longer reloads the whole directory instead of replaying).
KEEP_CHANGES_SECONDS = 3600.0


@dataclass(frozen=True)
class Acks:
    """Who applied ``version``: the nodes that acknowledged, and those declared gone."""

    version: int
    acknowledged: list[str]
    gone: list[str]


class NotAcknowledged(Exception):
    """Live nodes did not apply a change in time (``waiting``: their names)."""

    def __init__(self, version: int, waiting: list[str]) -> None:
        super().__init__(f"version {version} not applied by {', '.join(waiting)}")
        self.version = version
        self.waiting = waiting


@dataclass(frozen=True)
class Timing:
    """The [cluster] intervals, in seconds."""

    heartbeat: float
    fence: float
    gone: float


class ClusterNode:
    """One node's view of the cluster."""

    def __init__(self, db: Database, store: PgDirectory, address: str, timing: Timing, *,
                 queue_depth: Callable[[], int] = lambda: 0,
                 log: Callable[..., None] | None = None,
                 on_ack: Callable[[float], None] | None = None) -> None:
        self.db = db
        self.store = store
        self.name = store.node
        self.address = address
        self.timing = timing
        self._queue_depth = queue_depth
        self._log: Callable[..., None] = log or (lambda event, **kw: None)
        self._on_ack = on_ack or (lambda seconds: None)
        self.applied = 0
        self.latest = 0  # the highest version seen (notifications and the log)
        self._apply: Apply | None = None
        self._resync: Resync | None = None
        self._pruned_at = time.monotonic()
        self._listener: Listener | None = None
        self._wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._acks: dict[str, int] = {}  # node -> highest applied version announced
        self._follow_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_contact = time.monotonic()
        self._open = False  # caught up since the last contact was lost
        self.fenced_reason = "starting"
        self._stopping = False

    # -- joining ----------------------------------------------------------------------
    async def join(self) -> int:
        """Create the schema if needed, LISTEN, register; the version to load from.

        The caller then loads the directory (rows at that version or newer) and calls
        :meth:`start`, which catches up from it."""
        await self.store.ensure_schema()
        await self._connect_listener()
        version = await self.store.version()
        await self.store.register(self.address, version)
        self._last_contact = time.monotonic()
        return version

    async def start(self, loaded: int, apply: Apply, resync: Resync) -> None:
        """Catch up from ``loaded`` with ``apply``, open, and start following.

        ``resync`` reloads the whole directory (when the log no longer holds every
        change after this node's applied version)."""
        self._apply = apply
        self._resync = resync
        self.applied = loaded
        self.latest = max(self.latest, loaded)  # notifications may have come already
        await self._catch_up()
        self._opened()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._heartbeats())]

    async def stop(self) -> None:
        """Stop following; tell the others at once that this node is gone."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(PgError, OSError):
            await self.store.leave()
        if self._listener is not None:
            await self._listener.close()
        await self.db.close()

    async def _connect_listener(self) -> None:
        if self._listener is not None:
            await self._listener.close()
        self._listener = await self.db.listen(
            [CONTROL_CHANNEL, ACK_CHANNEL], self._notified, self._listener_lost)

    def _notified(self, channel: str, payload: str) -> None:
        if channel == CONTROL_CHANNEL:
            with contextlib.suppress(ValueError):
                self.latest = max(self.latest, int(payload))
            self._wake.set()
        else:  # "NODE VERSION": that node has applied VERSION
            node, _, version = payload.rpartition(" ")
            with contextlib.suppress(ValueError):
                self._acks[node] = max(self._acks.get(node, 0), int(version))
            self._acked.set()

    def _listener_lost(self) -> None:
        if not self._stopping:
            self._log("cluster_listener_lost")
            self._wake.set()

    # -- fencing ----------------------------------------------------------------------
    @property
    def fenced(self) -> bool:
        """True while this node must take no new mail or logins."""
        if self._open and time.monotonic() - self._last_contact > self.timing.fence:
            self._fence("no contact with PostgreSQL for"
                        f" {time.monotonic() - self._last_contact:.1f} s")
        return not self._open

    def _fence(self, reason: str) -> None:
        if self._open:
            self._open = False
            self.fenced_reason = reason
            self._log("cluster_fenced", reason=reason)

    def _opened(self) -> None:
        if not self._open:
            self._open = True
            self.fenced_reason = ""
            self._log("cluster_open", applied=self.applied)

    @property
    def heartbeat_age(self) -> float:
        """Seconds since the last successful round trip to PostgreSQL."""
        return time.monotonic() - self._last_contact

    # -- following --------------------------------------------------------------------
    async def _follow(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self._listener is None or self._listener.lost:
                    await self._connect_listener()
                await self._catch_up()
            except Exception as exc:  # the database, or a change this node cannot apply
                self._log("cluster_follow_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(min(1.0, self.timing.heartbeat))

    async def _catch_up(self) -> None:
        """Apply every change after ``applied``, in order; record the applied version."""
        assert self._apply is not None and self._resync is not None
        async with self._follow_lock:
            start = self.applied
            while True:
                changes = await self.store.changes_after(self.applied)
                if not self._follows(changes):
                    latest = await self.store.version()
                    if latest <= self.applied:
                        break  # up to date
                    if self._follows(await self.store.changes_after(self.applied)):
                        continue  # committed between the two reads
                    # the log no longer holds every change since: pruned meanwhile
                    self._log("cluster_resync", applied=self.applied, version=latest)
                    await self._resync()
                    self.applied = latest
                    continue
                for change in changes:
                    await self._apply(change)
                    self.applied = change.version
                self.latest = max(self.latest, self.applied)
                if self.applied >= self.latest:
                    break  # all that was announced (a later one wakes this again)
            if self.applied != start:
                await self.store.applied(self.applied)

    def _follows(self, changes: list[Change]) -> bool:
        """True if ``changes`` start right after the applied version."""
        return bool(changes) and changes[0].version == self.applied + 1

    async def _heartbeats(self) -> None:
        """Every heartbeat: be seen alive, catch up, and (re)open or fence."""
        t = self.timing
        while True:
            began = time.monotonic()
            try:
                known = await self.store.heartbeat(self.applied, self._queue_depth(),
                                                   not self._open, within=t.heartbeat)
                if not known:  # forgotten while cut off: join again
                    await self.store.register(self.address, self.applied)
                if self._listener is None or self._listener.lost:
                    await self._connect_listener()
                await self._catch_up()
                self._last_contact = began
                self._opened()
                if time.monotonic() - self._pruned_at > KEEP_CHANGES_SECONDS / 10:
                    self._pruned_at = time.monotonic()
                    await self.store.prune_changes(KEEP_CHANGES_SECONDS)
            except Exception as exc:  # until it works again, no contact: it fences in time
                if self._open and time.monotonic() - self._last_contact > t.fence:
                    self._fence(f"no contact with PostgreSQL: {type(exc).__name__}: {exc}")
            _ = self.fenced  # fence on time even when the heartbeat hangs
            await asyncio.sleep(max(0.0, t.heartbeat - (time.monotonic() - began)))

    # -- acknowledgements -------------------------------------------------------------
    async def acknowledge(self, version: int | None = None) -> Acks:
        """Wait until every live node has applied ``version`` (default: the last one this
        node wrote). NotAcknowledged if a live node has not after ``2 x gone_seconds``.

        The node list is read once, then each node's acknowledgement arrives as a
        notification; the list is read again every quarter second (a node may have
        been declared gone meanwhile)."""
        want = self.store.written if version is None else version
        began = time.monotonic()
        deadline = began + 2 * self.timing.gone
        while True:
            self._acked.clear()
            rows = await self.store.nodes(self.timing.gone)
            live = [r.name for r in rows if r.live]
            gone = [r.name for r in rows if not r.live]
            seen = {r.name: max(r.applied_version, self._acks.get(r.name, 0)) for r in rows}
            reread = time.monotonic() + 0.25
            while True:
                waiting = [n for n in live if max(seen[n], self._acks.get(n, 0)) < want]
                if not waiting:
                    self._on_ack(time.monotonic() - began)
                    return Acks(want, live, gone)
                now = time.monotonic()
                if now > deadline:
                    raise NotAcknowledged(want, waiting)
                if now > reread:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._acked.wait(), reread - now)
                self._acked.clear()

    async def queued_everywhere(self, account_id: int) -> tuple[dict[str, int], list[str]]:
        """Every live node's count of the account's stored messages, and the nodes gone."""
        version = await self.store.probe(account_id)
        acks = await self.acknowledge(version)
        answers = await self.store.probe_answers(version)
        return {n: answers.get(n, 0) for n in acks.acknowledged}, acks.gone

    async def version(self) -> int:
        """The cluster's control-plane version now."""
        return await self.store.version()

    async def nodes(self) -> list[NodeRow]:
        return await self.store.nodes(self.timing.gone)

    async def forget(self, name: str) -> str:
        return await self.store.forget(name, self.timing.gone)


async def open_database(dsn: str, password: str | None, connect_timeout: float,
                        command_timeout: float) -> Database:
    """A connected pool (Unavailable if PostgreSQL does not answer in time)."""
    db = Database(dsn, password, connect_timeout=connect_timeout,
                  command_timeout=command_timeout)
    await db.open()
    return db


__all__ = ["Acks", "ClusterNode", "NotAcknowledged", "Timing", "open_database"]
