"""The composition root: build everything from the configuration, run, stop in order.

Owns: command-line parsing (the stable flag contract: ``--config``,
``--listen``, ``--data-dir``, ``--control-socket``, ``--metrics-listen``,
``--smarthost``, ``--cluster-dsn``, ``--node-name``, ``--check-config`` (which
also reads the cluster secrets when a DSN is set), ``--print-default-config``; and the
``install-service`` subcommand, relayd.install), finding the configuration
file (``--config``, ``$RELAYD_CONFIG``, ``/etc/relayd/relayd.toml``, built-in
defaults: relayd.config.locate; ``$RELAYD_SYSTEM_CONFIG`` replaces the system
path, for tests), building every component from the frozen
Config, the uvloop event loop, signals (SIGTERM/SIGINT: graceful stop, a
second one forces a fast exit, still code 0: every 250 is already on disk;
SIGHUP: all-or-nothing reload of the settings in ``RELOADABLE``: parse, build
what can fail, then each component's ``reconfigure``; a bad file logs
``reload_failed``, tells systemd and keeps the running one), systemd notifications
(READY=1 only once every listener accepts; STATUS= with listeners and queue
depth, sent when it changes; WATCHDOG=1 from the loop when ``WatchdogSec=``
asks; a failed reload in the status), the queue gauges (refreshed by
the housekeeping loop and before each scrape), and the ordered shutdown:
STOPPING=1 -> stop listening -> let open SMTP transactions finish (bounded)
-> stop starting deliveries and let running ones finish (bounded) -> flush
last-connection times -> close the spool.

Exit codes: 0 clean stop, 2 configuration error, 3 spool cannot be opened,
4 cannot listen.
See also: relayd.config, DESIGN.md §1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import inspect
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from control import schemas
from relayd import config as config_mod
from relayd.cluster.node import ClusterNode, Timing, open_database
from relayd.cluster.quota import QuotaLeaser
from relayd.config import Config, ConfigError, parse_hostport
from relayd.controlplane.follow import Follower
from relayd.controlplane.lifecycle import Lifecycle
from relayd.controlplane.server import ControlServer, WebhookClient
from relayd.delivery.agents import AgentPool
from relayd.delivery.client import Deliverer, MxLookup, Router, TlsPolicy, Transport
from relayd.directory.accounts import Directory
from relayd.directory.credentials import CredentialCache, Hasher
from relayd.dkim import signature as dkim
from relayd.dkim.signing import DkimSigning
from relayd.observe import logs as rlog
from relayd.observe import sdnotify
from relayd.observe.events import Observer
from relayd.observe.hops import HopWatch
from relayd.observe.logbudget import LogBudget
from relayd.observe.metrics import Metrics, new_registry
from relayd.queue import backoff
from relayd.queue.bounces import Bounces
from relayd.queue.quota import QuotaLedger
from relayd.queue.ratelimit import limits_from
from relayd.queue.scheduler import Scheduler
from relayd.queue.shaped import Shaping
from relayd.smtp import policy
from relayd.smtp.server import RelaySMTP, SmtpContext
from relayd.store.datadir import prepare_data_dir
from relayd.store.datadir import spool_size as _spool_size  # status() calls it so
from relayd.store.deliverylog import DeliveryLog
from relayd.store.directory import SqliteDirectory
from relayd.store.pg import PgError
from relayd.store.pgdirectory import PgDirectory, SchemaTooNew
from relayd.store.spool import DbError, Spool, SpoolError, unusable
from relayd.store.webhooks import WebhookQueue
from relayd.webhooks.poster import Poster

VERSION = "0.1.0"


class NotThisSpool(SpoolError):
    """The data directory belongs to another kind of node (single, or another cluster)."""
#: How often the delivery log's bounds are applied (a prune with nothing to do is cheap).
LOG_PRUNE_SECONDS = 600.0
EXIT_CONFIG = 2
EXIT_SPOOL = 3
EXIT_LISTEN = 4
EXIT_CLUSTER = 5  # cluster mode: the cluster database cannot be reached or used at start


def _mx_resolver(cfg: Config, on_dns_failure: Callable[[str], None]) -> MxLookup:
    """The MX resolver of ``[delivery]``, its DNS failures counted; dnspython is loaded
    only in MX mode (~4 MB)."""
    from relayd.delivery.mx import MxResolver

    resolver = MxResolver.from_config(cfg.delivery)
    resolver.on_dns_failure = on_dns_failure
    return resolver


def _mta_sts(cfg: Config, mx: MxLookup, on_result: Callable[[str, str], None],
             log: Callable[..., None]
             ) -> tuple[TlsPolicy, Callable[[], Coroutine[Any, Any, None]] | None]:
    """MTA-STS over the MX resolver, and the TLSRPT report task's body (None: reports off)."""
    from relayd.delivery.mx import MxResolver
    from relayd.delivery.sts import MtaSts
    from relayd.delivery.tlsrpt import TlsReport

    assert isinstance(mx, MxResolver)
    d = cfg.delivery
    report = None
    if d.tlsrpt:
        host = cfg.server.hostname
        report = TlsReport(d.tlsrpt_dir or os.path.join(cfg.server.data_dir, "tlsrpt"), host,
                           d.tlsrpt_contact or f"postmaster@{host}")
        report.load()
        report.log = log
    sts = MtaSts(mx, port=d.mta_sts_port, ca_file=d.tls_ca_file,
                 timeout=d.mta_sts_timeout_seconds, report=report)
    sts.on_result = on_result
    sts.log = log
    return sts, (report.run if report is not None else None)


def _check_ca_file(path: str) -> None:
    """``[delivery] tls_ca_file`` loads as a trust store, else ConfigError (exit 2)."""
    try:
        ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"delivery.tls_ca_file: {path}: cannot load: {exc}") from None


def _tls_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.smtp.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.smtp.tls_cert_file, cfg.smtp.tls_key_file)
    return ctx


class Relay:
    """One running relayd.

    Size: the composition root: one short method per start step, per stop step,
    per signal and per systemd notification, in the order they run; the work of
    each lives in its component (reconfigure, start, stop).
    """

    def __init__(self, cfg: Config, transport: Transport | None = None) -> None:
        """``transport``: where transactions run; None (relayd) starts the delivery
        agents and the signing child; tests may pass an in-process fake."""
        self.cfg = cfg
        self._transport = transport
        self.log = rlog.get_logger("relayd")
        self.started = time.monotonic()
        self.registry = new_registry()
        self.metrics = Metrics(self.registry, version=VERSION)
        sv = cfg.server
        self.observer = Observer(self.metrics, self.log, LogBudget(
            burst=sv.log_rejections_burst, per_minute=sv.log_rejections_per_minute,
            max_per_second=sv.log_rejections_max_per_second,
            summary_seconds=sv.log_rejections_summary_seconds))
        self.directory = Directory()
        self.servers: list[asyncio.base_events.Server] = []
        self.listeners: list[schemas.Listener] = []
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._free_disk = 1 << 62
        self._free_disk_at = 0.0
        self._tls: ssl.SSLContext | None = None
        self._reloads: set[asyncio.Task[None]] = set()
        self._gauges_at = 0.0
        self._gauges_lock = asyncio.Lock()
        self._notify = os.environ.get("NOTIFY_SOCKET")
        self._reload_error: str | None = None  # the last reload's failure, until one works
        self.cluster: ClusterNode | None = None  # cluster mode: this node's membership
        self.shaping: Shaping | None = None  # MX mode: per-destination shaping
        self.hops: HopWatch | None = None  # MX mode: failed hops, metrics by destination
        self.dane = ""  # [delivery] dane on: "on" or "skipped: why" (relayctl status)
        self.quota_leaser: QuotaLeaser | None = None  # cluster mode: sending-limit leases

    def free_disk(self) -> int:
        """Free bytes on the spool's disk (cached for a second)."""
        now = time.monotonic()
        if now - self._free_disk_at > 1.0:
            try:
                self._free_disk = shutil.disk_usage(self.cfg.server.data_dir).free
            except OSError:
                self._free_disk = 0
            self._free_disk_at = now
        return self._free_disk

    async def start(self) -> None:
        """Open the spool, load state, start delivery, bind the listeners.

        On any failure, whatever was started is stopped again (delivery agent
        children, threads, the spool's connections) before the exception goes
        on, so the process can exit; a failure to read or write the spool
        during the start is a :class:`SpoolError` saying what to do.
        """
        async with contextlib.AsyncExitStack() as undo:
            await self._start(undo)
            undo.pop_all()  # started: stop() takes over

    async def _start(self, undo: contextlib.AsyncExitStack) -> None:
        """Start every component in dependency order; ``undo`` stops what started."""
        cfg = self.cfg
        for name in cfg.ignored_settings():
            self.log.warning("setting_ignored", setting=name,
                             reason=config_mod.REMOVED_SETTINGS[name])
        prepare_data_dir(cfg.server.data_dir)
        await self._open_storage(undo)
        self.hasher = Hasher(cfg.credentials)
        undo.push_async_callback(_quietly, self.hasher.close)
        self.cache = CredentialCache(self.hasher, on_hit=self.observer.cache_hit,
                                     on_miss=self.observer.cache_miss)
        await self._start_delivery(undo)
        await self._start_queue(undo)
        # DKIM is signed in the signing child (no GIL shared with this loop); the
        # local signing thread covers the time it does not run.
        remote = self.agents if isinstance(self.agents, AgentPool) else None
        self.signer = DkimSigning(remote=remote) if cfg.dkim.enabled else None
        if self.signer is not None:
            undo.push_async_callback(_quietly, self.signer.close)
        self._tls = _tls_context(cfg)
        self.ctx = _smtp_context(cfg, self, _throttle(cfg))
        if self.cluster is not None:
            cluster = self.cluster
            self.ctx.fenced = lambda: cluster.fenced
        await self._start_control(undo)
        await self._start_listeners(undo)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._housekeeping()))
        self._tasks.append(loop.create_task(self._log_pruning()))
        self._start_webhooks(loop)
        self.log.info("relayd_started", version=VERSION,
                      listeners=[f"{x.kind}={x.address}" for x in self.listeners])

    def _start_webhooks(self, loop: asyncio.AbstractEventLoop) -> None:
        """The poster of delivery events (stopped with the other tasks, before the spool)."""
        self.webhook_client = WebhookClient(self.cfg.webhooks.timeout_seconds,
                                            f"relayd/{VERSION} (webhook)")
        self.poster = Poster(WebhookQueue(self.spool), self.spool.hooks, self.directory,
                             self.webhook_client, self.cfg.webhooks, self.metrics,
                             log=self.log.warning)
        self._tasks.append(loop.create_task(self.poster.run()))

    async def _open_storage(self, undo: contextlib.AsyncExitStack) -> None:
        """The delivery log, then the spool (whose migration may move old log rows)."""
        cfg = self.cfg
        self.dlog = await _open_delivery_log(cfg.delivery_log_path, self._delivery_log_failed)
        undo.push_async_callback(_quietly, self.dlog.close)
        self.spool = Spool(cfg.database_path, batch_max=cfg.spool.commit_batch_max,
                           on_batch=self.observer.batch, move_log=self.dlog.move_from_spool)
        self.spool.hooks.cap = cfg.webhooks.max_events
        await self.spool.open()
        self.spool.on_results = self.dlog.append
        self.spool.on_purged = self.observer.purged
        undo.push_async_callback(_quietly, self.spool.abandon)

    async def _start_delivery(self, undo: contextlib.AsyncExitStack) -> None:
        """The delivery agents (and, with DKIM on, the signing child) behind the Deliverer."""
        cfg = self.cfg
        helo = cfg.delivery.helo_name or cfg.server.hostname
        if cfg.delivery.tls_ca_file:  # the agents load it per TLS level: fail at start
            await asyncio.to_thread(_check_ca_file, cfg.delivery.tls_ca_file)
        mx = None
        if cfg.delivery.mode == "mx":
            self.hops = HopWatch(self.metrics, self.log)
            mx = _mx_resolver(cfg, self.hops.dns_failed)
            if cfg.delivery.dane == "on":
                await self._enable_dane(mx)
        self.agents = self._transport or AgentPool(
            cfg.delivery, helo, cfg.delivery.agent_processes, signer=cfg.dkim.enabled)
        self.deliverer = Deliverer(cfg.delivery, self.agents, mx=mx)
        if mx is not None and cfg.delivery.mta_sts:
            self.deliverer.sts, report = _mta_sts(cfg, mx, self.observer.mta_sts,
                                                  self.log.warning)
            if report is not None:  # the TLSRPT files (stopped with the other tasks)
                task = asyncio.get_running_loop().create_task(report())
                self._tasks.append(task)
                undo.callback(task.cancel)
        undo.push_async_callback(_quietly, self.deliverer.close)
        await self.deliverer.start()

    async def _enable_dane(self, mx: MxLookup) -> None:
        """``[delivery] dane = "on"``: TLSA lookups if the resolver validates, else a warning
        (DANE skipped; ``relayctl status`` says why)."""
        from relayd.delivery.mx import MxResolver

        assert isinstance(mx, MxResolver)
        reason = await mx.enable_dane()
        self.dane = "on" if not reason else f"skipped: {reason}"
        if reason:
            self.log.warning("dane_skipped", reason=reason)
        else:
            self.log.info("dane_enabled")

    async def _start_queue(self, undo: contextlib.AsyncExitStack) -> None:
        """The scheduler and the lifecycle operations; the directory and the queue loaded."""
        cfg = self.cfg
        d = cfg.delivery
        self.bounces = Bounces(self.spool, cfg.server.hostname,
                               enqueue=lambda m: self.scheduler.enqueue_new(m))
        self.scheduler = Scheduler(
            self.spool, self.directory, self.deliverer, log=self.dlog,
            policy=backoff.policy_from(d), default_limits=limits_from(cfg.limits),
            workers=d.connections_per_host, events=self.observer,
            on_failed=self.bounces if d.bounces else None,
            reconcile_seconds=cfg.spool.reconcile_seconds,
        )
        if d.mode == "mx":
            self.shaping = Shaping(d.shaping, time.time, d.connections_per_host)
            self.shaping.on_event = self.observer.shaped
            self.shaping.log = self.log.warning
            self.scheduler.dispatcher.shaping = self.shaping
            self.shaping.watch = self.hops
        store = await self._open_cluster(undo)
        self.lifecycle = Lifecycle(cfg, self.spool, self.directory, self.hasher, self.cache,
                                   self.scheduler, delivery_log=self.dlog, log=self.log.info,
                                   warn=self.log.warning, store=store)
        undo.push_async_callback(_quietly, lambda: self.scheduler.stop(0.0))
        try:
            if self.cluster is not None and store is not None:
                await self._join_cluster(self.cluster, store)
                self._lease_quota(store, undo)
            else:
                await self._claim_spool(None)
                await self.lifecycle.load()
            await self.scheduler.start()
        except (PgError, SchemaTooNew, dkim.SealError, NotThisSpool):
            raise
        except (DbError, SpoolError) as exc:  # the spool, read and written at last
            raise unusable(cfg.database_path, exc) from None
        except Exception as exc:  # rows it cannot make sense of
            raise SpoolError(f"cannot load spool {cfg.database_path}"
                             f" ({type(exc).__name__}: {exc}); restore it from a backup, or"
                             " move it away to start with an empty spool") from exc

    async def _open_cluster(self, undo: contextlib.AsyncExitStack) -> PgDirectory | None:
        """Cluster mode: the connection to the cluster database and this node's membership."""
        cc = self.cfg.cluster
        if not cc.enabled:
            return None
        secrets = config_mod.cluster_secrets(cc, os.environ)
        db = await open_database(cc.dsn, secrets.password, cc.connect_timeout_seconds,
                                 cc.connect_timeout_seconds)
        undo.push_async_callback(_quietly, db.close)
        key = secrets.key
        store = PgDirectory(db, config_mod.node_name(cc, socket.gethostname()),
                            seal=lambda pem: dkim.seal_key(key, pem),
                            unseal=lambda sealed: dkim.open_key(key, sealed))
        self.cluster = ClusterNode(
            db, store, cc.advertise or self.cfg.smtp.listen,
            Timing(cc.heartbeat_seconds, cc.fence_seconds, cc.gone_seconds),
            queue_depth=self.scheduler.queued_total, log=self.log.info,
            on_ack=self.metrics.cluster_ack_duration_seconds.observe)
        undo.push_async_callback(_quietly, self.cluster.stop)
        return store

    async def _join_cluster(self, node: ClusterNode, store: PgDirectory) -> None:
        """Join: LISTEN, load the directory from the cluster, purge the mail of accounts
        deleted while this node was away, catch up, then follow."""
        version = await node.join()
        await self._claim_spool(store.cluster_id)
        await self.lifecycle.load()
        self.lifecycle.shared.cluster = node
        follower = Follower(self.lifecycle.shared, store, self.lifecycle.domains.signers_of)
        await follower.purge_deleted()
        await node.start(version, follower.apply, follower.resync)
        self.log.info("cluster_joined", node=node.name, version=node.applied)

    def _lease_quota(self, store: PgDirectory, undo: contextlib.AsyncExitStack) -> None:
        """Cluster mode: sending limits count units leased from the cluster (SEMANTICS §7)."""
        ledger = QuotaLedger()
        self.scheduler.queue.quota = ledger
        self.quota_leaser = QuotaLeaser(store, ledger, clock=lambda: self.scheduler.clock(),
                                        wake=self.scheduler.wake, log=self.log.info)
        self.quota_leaser.start()
        undo.push_async_callback(_quietly, self.quota_leaser.stop)

    async def _claim_spool(self, cluster_id: str | None) -> None:
        """The spool belongs to this kind of node: a single node's (``cluster_id`` None)
        or a node of this cluster's; its account ids would mean other accounts else."""
        path, local = self.cfg.database_path, SqliteDirectory(self.spool)
        owner = await local.cluster_id()
        if cluster_id is None:
            if owner is not None:
                raise NotThisSpool(
                    f"{path} belongs to a node of cluster {owner}: start relayd with that"
                    " node's [cluster] settings, or give it another data directory")
            return
        if owner is None:
            if await local.holds_any():
                raise NotThisSpool(
                    f"{path} is a single node's spool (it holds its domains and accounts):"
                    " a cluster node needs a data directory of its own (docs/CLUSTER.md)")
            await local.set_cluster_id(cluster_id)
        elif owner != cluster_id:
            raise NotThisSpool(f"{path} belongs to a node of another cluster ({owner}):"
                               " give this node a data directory of its own")

    async def _start_control(self, undo: contextlib.AsyncExitStack) -> None:
        """The control socket and, when configured, the metrics listener."""
        cfg = self.cfg
        self.control = ControlServer(self.lifecycle, self.status, self.registry, self.log,
                                     before_scrape=self.refresh_gauges,
                                     throttle=self.ctx.throttle, health=self.health)
        mhost: str | None = None
        mport: int | None = None
        if cfg.metrics.listen:
            mhost, mport = parse_hostport(cfg.metrics.listen)
        undo.push_async_callback(_quietly, self.control.stop)
        await self.control.start(cfg.control_socket, cfg.control.socket_mode, mhost, mport)

    async def _start_listeners(self, undo: contextlib.AsyncExitStack) -> None:
        """The SMTP listeners (submission, implicit TLS); the listener list for status."""
        cfg, tls = self.cfg, self._tls

        def close_servers() -> None:
            for server in self.servers:
                server.close()

        undo.push_async_callback(_quietly, close_servers)
        loop = asyncio.get_running_loop()
        host, port = parse_hostport(cfg.smtp.listen)
        await self._listen(loop, "smtp", host, port, tls, implicit=False)
        if cfg.smtp.tls_listen:
            thost, tport = parse_hostport(cfg.smtp.tls_listen)
            await self._listen(loop, "smtps", thost, tport, tls, implicit=True)
        if self.control.metrics_address:
            self.listeners.append(schemas.Listener(kind="metrics",
                                                   address=self.control.metrics_address))
        self.listeners.append(schemas.Listener(kind="control", address=cfg.control_socket))

    async def _listen(self, loop: asyncio.AbstractEventLoop, kind: str, host: str, port: int,
                      tls: ssl.SSLContext | None, *, implicit: bool) -> None:
        ctx = self.ctx

        def factory() -> RelaySMTP:
            # self._tls, not the argument: a reload swaps it for new connections.
            return RelaySMTP(ctx, self._tls, implicit_tls=implicit)

        listen_tls: ssl.SSLContext | None = None
        if implicit and tls is not None:
            # The server's context is fixed when it is created; a fresh one
            # whose ClientHello callback hands each new connection the current
            # context (OpenSSL calls it with or without SNI). Open connections
            # keep the certificate they were made with.
            listen_tls = _tls_context(self.cfg)

            def current(obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                        _ctx: ssl.SSLContext) -> None:
                if self._tls is not None:
                    obj.context = self._tls

            assert listen_tls is not None
            listen_tls.sni_callback = current
        server = await loop.create_server(
            factory, host=host, port=port, ssl=listen_tls, backlog=1024,
            reuse_address=True)
        self.servers.append(server)
        for sock in server.sockets:
            addr = sock.getsockname()
            shown = f"[{addr[0]}]:{addr[1]}" if sock.family == socket.AF_INET6 else \
                f"{addr[0]}:{addr[1]}"
            self.listeners.append(schemas.Listener(kind=kind, address=shown))

    async def status(self) -> schemas.Status:
        """The answer of ``relayctl status``."""
        counts = {"queued": 0, "waiting_limit": 0, "held": 0, "deferred": 0}
        for _m, st, _u in self.scheduler.send_queue_view():
            counts[st] = counts.get(st, 0) + 1
        # The database is the truth: never-attempted messages it holds that the
        # scheduler's memory does not (none, unless they diverged) are queued too.
        # Memory is counted before the read: a message whose result is committed while
        # the spool is read may still be in the count, and is then in memory's too.
        in_memory = self.scheduler.first_attempts()
        unknown = await self.spool.queued_count() - in_memory
        counts["queued"] += max(0, unknown)
        counts["deferred"] = await self.spool.deferred_count()
        size = (_spool_size(self.cfg.database_path, self.spool.bodies.dir)
                + _spool_size(self.cfg.delivery_log_path, ""))
        return schemas.Status(
            version=VERSION, uptime_seconds=time.monotonic() - self.started,
            listeners=self.listeners, queue=counts,
            in_flight=self.metrics.in_flight(),
            spool_bytes=size, free_disk_bytes=self.free_disk(),
            domains=len(self.directory.domains_by_name),
            accounts=self.directory.count_slots(), sessions=len(self.ctx.sessions),
            backoffs=self._backoffs(), dane=self.dane)

    def _backoffs(self) -> list[schemas.DestinationBackoff]:
        """The destinations shaping has backed off now (MX mode)."""
        if self.shaping is None:
            return []
        now = time.time()
        return [schemas.DestinationBackoff(
            destination=st.name, seconds_left=round(max(0.0, st.backoff_until - now), 1),
            level=st.backoff_level, throttled=st.throttled, reply=st.reason)
            for st in self.shaping.backoffs()]

    async def refresh_gauges(self, max_age: float = 1.0) -> None:
        """Set the queue and spool gauges from the current counts.

        Called by the housekeeping loop and before each ``/metrics`` scrape, so
        a scrape never shows counts older than ``max_age`` seconds. Cost: one
        pass over the in-memory send queue and one indexed COUNT over the
        deferred recipients; concurrent callers share one refresh.
        """
        async with self._gauges_lock:
            if time.monotonic() - self._gauges_at < max_age:
                return
            st = await self.status()
            for state, n in st.queue.items():
                gauge = self.metrics.queue.get(state)
                if gauge is not None:
                    gauge.set(n)
            self.metrics.spool_free_bytes.set(st.free_disk_bytes)
            self.metrics.spool_size_bytes.set(st.spool_bytes)
            if self.shaping is not None:
                self.metrics.set_backoffs([self.shaping.label(b.destination)
                                           for b in st.backoffs])
            if self.cluster is not None:
                m, node = self.metrics, self.cluster
                m.cluster_fenced.set(1 if node.fenced else 0)
                m.cluster_heartbeat_age_seconds.set(node.heartbeat_age)
                m.cluster_versions_behind.set(max(0, node.latest - node.applied))
            self._gauges_at = time.monotonic()

    async def _housekeeping(self) -> None:
        """Periodic work: last-connection flush, gauges."""
        while True:
            await asyncio.sleep(self.cfg.spool.last_connection_flush_seconds)
            try:
                await self.lifecycle.flush_last_connections()
                await self.refresh_gauges(max_age=0.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.error("housekeeping_failed", error=f"{type(exc).__name__}: {exc}")

    async def _log_pruning(self) -> None:
        """The delivery log's bounds (age, size): soon after the start, then every
        LOG_PRUNE_SECONDS; a prune of many rows runs in batches while the relay works."""
        await asyncio.sleep(self.cfg.spool.last_connection_flush_seconds)
        while True:
            try:
                started, batches = time.monotonic(), self.dlog.prune_batches
                if n := await self.lifecycle.prune_delivery_log():
                    self.log.info("delivery_log_pruned", rows=n,
                                  batches=self.dlog.prune_batches - batches,
                                  seconds=round(time.monotonic() - started, 3))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.error("housekeeping_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(LOG_PRUNE_SECONDS)

    def _delivery_log_failed(self, error: str) -> None:
        """Rows the delivery log could not write (their messages' states are committed)."""
        self.log.error("delivery_log_failed", error=error)

    def health(self) -> tuple[bool, str]:
        """What the load balancer's ``GET /health`` answers: (healthy, reason).

        Unhealthy from the moment a stop begins (the signal, or the listeners closing),
        and, in cluster mode, while this node is fenced (it cannot reach PostgreSQL)."""
        if self._stop.is_set() or self.ctx.shutting_down:
            return False, "stopping"
        if self.cluster is not None and self.cluster.fenced:
            return False, f"fenced: {self.cluster.fenced_reason}"
        return True, ""

    # -- signals -----------------------------------------------------------------
    def on_stop_signal(self) -> None:
        """First signal: graceful stop; second: fast stop (accepted mail is on disk)."""
        self._signals += 1
        if self._signals == 1:
            self.log.info("stopping", mode="graceful")
            self._stop.set()
        else:
            self.log.warning("stopping", mode="fast")
            os._exit(0)

    def on_reload_signal(self) -> None:
        """SIGHUP: re-read limits, routes and TLS where possible; keep the old on error."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)  # a strong reference until it is done
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """Re-read the configuration file; apply what can change without a restart.

        All or nothing: the new file is parsed and everything that can fail is
        built from it (TLS context, routes, retry schedule, networks) before
        any component is reconfigured; on any error the running configuration
        stays, ``reload_failed`` is logged and systemd is told (``STATUS=`` and
        ``ERRNO=``). Then each component applies its part (``reconfigure``):
        open SMTP connections stay open and get the limits at their next
        command, a new certificate at new connections (and at a STARTTLS not
        yet issued). Settings in :data:`RELOADABLE` take effect; a change to
        any other one is logged as ``reload_needs_restart`` and ignored until a
        restart.
        """
        sdnotify.reloading(self._notify)
        try:
            path = os.environ.get("RELAYD_CONFIG_PATH", "")
            if not path:
                raise ConfigError("no configuration file to reload")
            new = config_mod.with_overrides(config_mod.load(path), **_OVERRIDES)
            tls = _tls_context(new) if new.smtp.tls_cert_file else self._tls
            if new.delivery.tls_ca_file:
                await asyncio.to_thread(_check_ca_file, new.delivery.tls_ca_file)
            router = Router(new.delivery)
            retry = backoff.policy_from(new.delivery)
            plaintext = policy.PlaintextAuthPolicy(new.smtp.plaintext_auth_networks)
        except (ConfigError, OSError, ValueError) as exc:
            # ssl.SSLError is an OSError: an unreadable or mismatched key pair.
            await self._reload_failed(exc)
            return
        changed, ignored = _config_changes(self.cfg, new)
        # Keep the running values of what a reload cannot change, so that
        # self.cfg always describes what is in effect.
        new = _keep_unreloadable(self.cfg, new)
        self.cfg = new
        self.lifecycle.reconfigure(new)
        self.scheduler.reconfigure(new, retry, self.bounces)
        if self.shaping is not None:
            self.shaping.configure(new.delivery.shaping)
        self.deliverer.reconfigure(new.delivery, router)
        if self.deliverer.sts is not None:  # MTA-STS: the trust store of policy fetches
            self.deliverer.sts.reconfigure(new.delivery.tls_ca_file)
        self.ctx.reconfigure(new, plaintext, tls)
        self._tls = tls
        if ignored:
            self.log.warning("reload_needs_restart", settings=ignored)
        self.log.info("reloaded", changed=changed)
        self._reload_error = None
        sdnotify.ready_after_reload(None, await self.status_line(), self._notify)

    async def _reload_failed(self, exc: Exception) -> None:
        """Keep the running configuration; say why in the log and to systemd."""
        self._reload_error = str(exc) or type(exc).__name__
        self.log.error("reload_failed", error=self._reload_error)
        code = errno.EINVAL  # a bad file; an OSError (not TLS's) says what it was
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno:
            code = exc.errno
        sdnotify.ready_after_reload(self._reload_error, await self.status_line(),
                                    self._notify, errno=code)

    # -- systemd -------------------------------------------------------------------
    async def status_line(self) -> str:
        """The systemd status: listeners, queue depth, and a reload failure not yet fixed."""
        queue: dict[str, int] | None = None
        with contextlib.suppress(Exception):  # a spool error is logged where it happens
            queue = (await self.status()).queue
        line = sdnotify.status_line([f"{x.kind}={x.address}" for x in self.listeners], queue)
        if self._reload_error is not None:
            line = sdnotify.reload_failed_line(self._reload_error, line)
        return line

    def start_notifications(self, first_status: str) -> None:
        """Under systemd: keep STATUS= current, and feed the watchdog if it is on."""
        if not self._notify:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._status_loop(first_status)))
        every = sdnotify.watchdog_interval(os.environ.get("WATCHDOG_USEC"),
                                           os.environ.get("WATCHDOG_PID"), os.getpid())
        if every is not None:
            self._tasks.append(loop.create_task(self._watchdog_loop(every)))

    async def _status_loop(self, sent: str) -> None:
        """Every STATUS_EVERY_SECONDS, send the status line if it changed."""
        while True:
            await asyncio.sleep(STATUS_EVERY_SECONDS)
            line = await self.status_line()
            if line != sent and sdnotify.status(line, self._notify):
                sent = line

    async def _watchdog_loop(self, every: float) -> None:
        """WATCHDOG=1 every ``every`` seconds: only a loop that runs keeps the unit alive."""
        while True:
            sdnotify.watchdog(self._notify)
            await asyncio.sleep(every)

    async def wait(self) -> None:
        """Until a stop signal."""
        await self._stop.wait()

    async def stop(self) -> None:
        """Ordered shutdown. A step that fails is logged (``stop_failed``) and the
        next steps still run: the spool is always closed and the children stopped,
        so the process exits instead of hanging on what is left."""
        sdnotify.stopping(os.environ.get("NOTIFY_SOCKET"))
        grace = self.cfg.server.shutdown_grace_seconds
        await self._stop_step("listeners", self._stop_sessions, grace)
        await self._stop_step("control", self.control.stop)
        await self._stop_step("scheduler", self.scheduler.stop, grace)
        await self._stop_step("deliverer", self.deliverer.close)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if getattr(self, "webhook_client", None) is not None:
            await self._stop_step("webhooks", self.webhook_client.close)
        await self._stop_step("last_connections", self.lifecycle.flush_last_connections)
        await self._stop_step("suppressions", self.lifecycle.suppressions.stop)
        if self.quota_leaser is not None:
            await self._stop_step("quota", self.quota_leaser.stop)
        if self.cluster is not None:  # after the sessions and the last writes to it
            await self._stop_step("cluster", self.cluster.stop)
        await self._stop_step("spool", self.spool.close)
        await self._stop_step("delivery_log", self.dlog.close)
        await self._stop_step("hasher", self.hasher.close)
        if self.signer is not None:
            await self._stop_step("signer", self.signer.close)
        self.observer.report_suppressed(everything=True)
        if self.hops is not None:
            self.hops.report_suppressed(everything=True)
        self.log.info("stopped")

    async def _stop_sessions(self, grace: float) -> None:
        """Stop listening, let open transactions finish within ``grace``, cut the rest."""
        for server in self.servers:
            server.close()
        self.ctx.shutting_down = True
        for s in list(self.ctx.sessions):
            s.close_if_idle()
        deadline = time.monotonic() + grace
        while self.ctx.sessions and time.monotonic() < deadline:
            for s in list(self.ctx.sessions):
                s.close_if_idle()
            await asyncio.sleep(0.05)
        for s in list(self.ctx.sessions):
            if s.transport is not None:
                s.transport.abort()

    async def _stop_step(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one step of the shutdown; log its failure instead of stopping there."""
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self.log.error("stop_failed", step=name, error=f"{type(exc).__name__}: {exc}")


#: How often the systemd status line is recomputed; it is sent only when it changed.
STATUS_EVERY_SECONDS = 5.0

#: Settings a reload applies ("section.key", or "section" for all its keys).
#: TLS files are re-read on every reload, changed or not (renewed certificates).
RELOADABLE: frozenset[str] = frozenset({
    "limits",
    "server.shutdown_grace_seconds",
    "smtp.max_recipients", "smtp.max_message_size_bytes", "smtp.idle_timeout_seconds",
    "smtp.min_data_rate_bytes_per_second", "smtp.max_commands_per_session",
    "smtp.max_connections", "smtp.max_connections_per_ip", "smtp.plaintext_auth_networks",
    "smtp.greet_pause_seconds",
    "smtp.tls_cert_file", "smtp.tls_key_file",
    "delivery.routes", "delivery.smarthost", "delivery.smarthost_tls",
    "delivery.smarthost_username", "delivery.smarthost_password",
    "delivery.retry_first_seconds", "delivery.retry_max_seconds", "delivery.retry_jitter",
    "delivery.max_queue_lifetime_seconds", "delivery.connect_timeout_seconds",
    "delivery.command_timeout_seconds", "delivery.idle_connection_seconds",
    "delivery.messages_per_connection", "delivery.tls_verify", "delivery.bounces",
    "delivery.tls_level", "delivery.tls_policy", "delivery.tls_ca_file",
    "delivery.shaping",
    "spool.last_connection_flush_seconds", "spool.delivery_log_retention_days",
    "spool.delivery_log_max_bytes",
})


def _is_reloadable(section: str, key: str) -> bool:
    return section in RELOADABLE or f"{section}.{key}" in RELOADABLE


def _config_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """("section.key" changed and applied, changed but needing a restart)."""
    import msgspec

    applied: list[str] = []
    ignored: list[str] = []
    for section in old.__struct_fields__:
        a, b = getattr(old, section), getattr(new, section)
        if a == b or not isinstance(a, msgspec.Struct):
            continue
        for key in a.__struct_fields__:
            if getattr(a, key) != getattr(b, key):
                name = f"{section}.{key}"
                (applied if _is_reloadable(section, key) else ignored).append(name)
    return applied, ignored


def _keep_unreloadable(old: Config, new: Config) -> Config:
    """``new`` with every setting a reload cannot change taken from ``old``."""
    import msgspec

    sections: dict[str, Any] = {}
    for section in old.__struct_fields__:
        a, b = getattr(old, section), getattr(new, section)
        if not isinstance(a, msgspec.Struct):
            continue
        keep = {key: getattr(a, key) for key in a.__struct_fields__
                if not _is_reloadable(section, key) and getattr(a, key) != getattr(b, key)}
        if keep:
            sections[section] = msgspec.structs.replace(b, **keep)
    return msgspec.structs.replace(new, **sections) if sections else new


async def _quietly(fn: Callable[[], Any]) -> None:
    """Call ``fn`` (awaiting what it returns) while unwinding a failed start: errors ignored."""
    try:
        result = fn()
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: S110 - the start already failed; its error is the one to report
        pass


async def _open_delivery_log(path: str, on_error: Callable[[str], None]) -> DeliveryLog:
    """The delivery log file, open; a SpoolError saying what to do if it cannot be."""
    dlog = DeliveryLog(path, on_error=on_error)
    try:
        await dlog.open()
    except (DbError, OSError, ValueError) as exc:
        raise SpoolError(f"cannot use the delivery log {path} ({type(exc).__name__}: {exc});"
                         " move it away to start a new log (the spool keeps the mail)") from None
    return dlog


def _throttle(cfg: Config) -> policy.AuthThrottle:
    """The failed-AUTH throttle from [smtp] (restart-only settings)."""
    sm = cfg.smtp
    return policy.AuthThrottle(
        free_failures=sm.auth_failures_before_delay,
        max_failures=sm.auth_failures_before_disconnect,
        base_delay=sm.auth_failure_delay_seconds,
        max_delay=sm.auth_failure_max_delay_seconds,
        lockout=sm.auth_lockout_seconds,
        max_usernames=sm.auth_max_usernames_per_address,
        exempt_networks=sm.auth_throttle_exempt_networks)


def _smtp_context(cfg: Config, relay: Relay, throttle: policy.AuthThrottle) -> SmtpContext:
    """What every SMTP session reads: the relay's components and the [smtp]/[limits] values."""
    sm = cfg.smtp
    return SmtpContext(
        hostname=cfg.server.hostname, directory=relay.directory, credentials=relay.cache,
        spool=relay.spool, scheduler=relay.scheduler, signer=relay.signer,
        events=relay.observer,
        plaintext_auth=policy.PlaintextAuthPolicy(sm.plaintext_auth_networks),
        throttle=throttle,
        max_message_size=sm.max_message_size_bytes,
        max_recipients=sm.max_recipients,
        max_queued_per_account=cfg.limits.max_queued_per_account,
        min_free_disk=cfg.limits.min_free_disk_bytes, free_disk=relay.free_disk,
        idle_timeout=sm.idle_timeout_seconds,
        min_data_rate=sm.min_data_rate_bytes_per_second,
        data_rate_grace=sm.min_data_rate_grace_seconds,
        max_commands=sm.max_commands_per_session,
        max_connections=sm.max_connections,
        max_connections_per_ip=sm.max_connections_per_ip,
        greet_pause=sm.greet_pause_seconds,
        smtputf8=sm.smtputf8,
        allow_address_literals=sm.allow_address_literals,
    )


_OVERRIDES: dict[str, Any] = {}


def build_parser() -> argparse.ArgumentParser:
    """The relayd command line."""
    p = argparse.ArgumentParser(
        prog="relayd", description="SMTP relay daemon",
        epilog="Configuration: --config, else $RELAYD_CONFIG, else"
        f" {config_mod.SYSTEM_CONFIG} if it exists, else built-in defaults (spool in ./var)."
        " Install as a systemd service: relayd install-service --help.")
    p.add_argument("--config", default=None, help="TOML configuration file")
    p.add_argument("--listen", help="SMTP listen address HOST:PORT")
    p.add_argument("--data-dir", help="directory of the spool database")
    p.add_argument("--control-socket", help="path of the control socket")
    p.add_argument("--metrics-listen", help="Prometheus endpoint HOST:PORT ('' to disable)")
    p.add_argument("--smarthost", help="deliver everything to HOST:PORT")
    p.add_argument("--cluster-dsn", metavar="DSN",
                   help="cluster mode on this PostgreSQL (postgresql://USER@HOST:PORT/DB;"
                   " '' = single node)")
    p.add_argument("--node-name", metavar="NAME", help="this node's name in the cluster")
    p.add_argument("--check-config", action="store_true", help="validate and exit")
    p.add_argument("--print-default-config", action="store_true",
                   help="write the documented default configuration to stdout and exit")
    p.add_argument("--version", action="version", version=f"relayd {VERSION}")
    return p


def locate_config(args: argparse.Namespace) -> config_mod.Located:
    """Which configuration file to read (relayd.config.locate, given the environment)."""
    system = os.environ.get("RELAYD_SYSTEM_CONFIG") or config_mod.SYSTEM_CONFIG
    return config_mod.locate(args.config, os.environ.get("RELAYD_CONFIG"), system,
                             os.path.isfile(system))


def load_config(args: argparse.Namespace,
                located: config_mod.Located | None = None) -> Config:
    """The configuration from the file (if any) and the command-line overrides."""
    if located is None:
        located = locate_config(args)
    cfg = config_mod.load(located.path) if located.path else Config()
    _OVERRIDES.clear()
    for key in ("listen", "data_dir", "control_socket", "metrics_listen", "smarthost",
                "cluster_dsn", "node_name"):
        value = getattr(args, key)
        if value is not None:
            _OVERRIDES[key] = value
    return config_mod.with_overrides(cfg, **_OVERRIDES)


async def run(cfg: Config) -> int:
    """Run until stopped; return the exit code."""
    relay = Relay(cfg)
    try:
        await relay.start()
    except SpoolError as exc:
        relay.log.error("spool_error", error=str(exc))
        print(f"relayd: {exc}", file=sys.stderr)
        return EXIT_SPOOL
    except ConfigError as exc:  # cluster mode: its password or key file
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except dkim.SealError as exc:
        print(f"relayd: configuration error: cluster.key_file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (PgError, SchemaTooNew) as exc:
        relay.log.error("cluster_unavailable", error=str(exc))
        print(f"relayd: cannot use the cluster database: {exc}", file=sys.stderr)
        return EXIT_CLUSTER
    except OSError as exc:  # start() has stopped what it started
        relay.log.error("listen_error", error=str(exc))
        print(f"relayd: cannot start: {exc}", file=sys.stderr)
        return EXIT_LISTEN
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, relay.on_stop_signal)
    loop.add_signal_handler(signal.SIGINT, relay.on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, relay.on_reload_signal)
    first_status = await relay.status_line()
    sdnotify.ready_with_status(first_status, os.environ.get("NOTIFY_SOCKET"))
    relay.start_notifications(first_status)
    await relay.wait()
    await relay.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relayd`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-service"]:
        from relayd import install

        return install.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.print_default_config:
        sys.stdout.buffer.write(config_mod.default_file_text())
        sys.stdout.flush()
        return 0
    located = locate_config(args)
    try:
        cfg = load_config(args, located)
        if args.check_config and cfg.cluster.enabled:
            config_mod.cluster_secrets(cfg.cluster, os.environ)
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    shown = located.path or "none (built-in defaults)"
    if args.check_config:
        print(f"configuration ok: {shown} ({located.source})")
        return 0
    if located.path:
        os.environ["RELAYD_CONFIG_PATH"] = str(Path(located.path).resolve())
    os.umask(0o027)  # files relayd creates (spool, WAL) are never world-readable
    rlog.configure(cfg.server.log_level, priority_prefix=cfg.server.log_priority_prefix)
    log = rlog.get_logger("relayd")
    if located.path:
        log.info("config_file", path=located.path, source=located.source)
    else:
        log.warning("config_file", path=None, source=located.source,
                    data_dir=cfg.server.data_dir,
                    hint=f"no --config, no $RELAYD_CONFIG, no {config_mod.SYSTEM_CONFIG}:"
                    " built-in development defaults")
    import logging

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return uvloop.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
