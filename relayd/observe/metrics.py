"""Every Prometheus metric relayd exposes, defined once.

Owns: the metric families, their names, help text, label sets and histogram
buckets; the pre-bound label children the hot path uses; rendering the
registry for the ``/metrics`` endpoint. Nothing else in the code base creates a
metric: modules receive the :class:`Metrics` object and touch its attributes.

Untrusted input: none (label values come from fixed tuples, never from a
client). Settings read: none; the registry and the version string are passed in.

Cost. A pre-bound child (``metrics.rejections["size"].inc()``,
``metrics.auth_success.inc()``) is one lock and one add, the same as an
unlabelled counter. ``family.labels(reason=...).inc()`` validates and hashes
the label values under a second lock on every call, several times slower, so
the hot path never calls it. A histogram observation is one lock and a
bucket search. (``bench/micro/test_bench_metrics.py``; figures in bench/NOTES.md.)

Cardinality. No series is labelled by account, domain, recipient or client
address: those sets are unbounded (accounts are created and deleted through the
control API, usernames are never reused), and every new value would add a series
to every scrape forever. Per-account numbers (total sent, last connection,
queued mail) come from the control API and the delivery log instead. Every label
here takes its values from a fixed tuple in this module or in
:data:`relayd.smtp.replies.REJECTION_REASONS`, and every value is created at start-up
at zero, so a dashboard or ``rate()`` sees a series before its first event. The one
exception, ``destination`` (MX mode), is bounded by the configuration: a
``[[delivery.shaping.destination]]`` name or ``other`` (relayd.queue.shaped
``Shaping.label``), never a recipient domain outside the table; ``other`` is created
at start-up.

Process and runtime. The same registry holds prometheus_client's process
collector (``process_open_fds`` against ``process_max_fds``, which is the soft
``RLIMIT_NOFILE``: the unit's ``LimitNOFILE=``; ``process_resident_memory_bytes``,
``process_cpu_seconds_total``, ``process_start_time_seconds``; read from
``/proc/self`` at each scrape, nothing on the hot path; Linux
only, empty elsewhere) and its platform collector (``python_info``, a constant).
They cover the main process, not the delivery agent or DKIM signer children.
:data:`RUNTIME_METRIC_NAMES` lists them.

No ``_created`` series: prometheus_client would export one per counter,
histogram and labelled child (the time it was created, here always the start
of the process, which ``process_start_time_seconds`` already says), doubling
the series of every counter. :class:`Metrics` turns them off with the public
``disable_created_metrics()``; that switch is process-wide.

See also: relayd.smtp.replies (rejection reasons), relayd.controlplane.server (serves
``/metrics``), config/grafana-dashboard.json, config/prometheus-alerts.yml.
"""

from __future__ import annotations

from importlib import metadata
from typing import TypeAlias

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from relayd.delivery.hopfailures import HOP_FAILURE_KINDS
from relayd.delivery.routing import DNS_FAILURE_KINDS
from relayd.delivery.tlslevels import TLS_OUTCOMES
from relayd.smtp.replies import REJECTION_REASONS

NAMESPACE = "relayd"

#: Values of the ``state`` label of ``relayd_queue_messages`` (SEMANTICS.md §4.1, §5).
QUEUE_STATES: tuple[str, ...] = ("queued", "waiting_limit", "held", "deferred")
#: Values of the ``outcome`` label of ``relayd_delivery_attempts_total`` (SEMANTICS.md §5;
#: ``purged``: a recipient the operator removed before it was final, not an attempt;
#: ``suppressed``: on its domain's suppression list, failed without a connection).
DELIVERY_OUTCOMES: tuple[str, ...] = ("delivered", "deferred", "failed", "purged",
                                      "suppressed")
#: Values of the ``outcome`` label of ``relayd_delivery_tls_total`` (relayd.delivery.tlslevels).
DELIVERY_TLS_OUTCOMES: tuple[str, ...] = TLS_OUTCOMES

#: Outcomes counted per destination (``relayd_destination_attempts_total``).
DESTINATION_OUTCOMES: tuple[str, ...] = ("delivered", "deferred", "failed")

#: End of DATA to 250: a group commit with ``synchronous=FULL`` is a few ms on an
#: SSD; the buckets resolve 0.5 ms to 1 s.
ACCEPT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
)
#: One attempt to the next hop, connect (or pooled reuse) to final reply; the
#: slowest are bounded by the delivery timeouts (minutes).
DELIVERY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
#: A control call waiting until every live node applied its change: a few ms on a LAN,
#: up to ``2 x gone_seconds`` when a node stops answering.
ACK_BUCKETS: tuple[float, ...] = (
    0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
#: Messages per spool group commit: powers of two up to 256.
BATCH_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(9))

#: Every metric family name as exposed (counters with their ``_total``).
METRIC_NAMES: tuple[str, ...] = (
    "relayd_smtp_connections_total",
    "relayd_smtp_sessions_active",
    "relayd_smtp_rejections_total",
    "relayd_auth_total",
    "relayd_credential_cache_hits_total",
    "relayd_credential_cache_misses_total",
    "relayd_messages_accepted_total",
    "relayd_messages_in_flight",
    "relayd_queue_messages",
    "relayd_queue_reconciled_total",
    "relayd_delivery_attempts_total",
    "relayd_delivery_duration_seconds",
    "relayd_delivery_tls_total",
    "relayd_destination_attempts_total",
    "relayd_destination_tls_total",
    "relayd_mx_hop_failures_total",
    "relayd_dns_failures_total",
    "relayd_accept_duration_seconds",
    "relayd_spool_commit_batch_size",
    "relayd_spool_free_bytes",
    "relayd_spool_size_bytes",
    "relayd_cluster_fenced",
    "relayd_cluster_heartbeat_age_seconds",
    "relayd_cluster_versions_behind",
    "relayd_cluster_ack_duration_seconds",
    "relayd_webhook_posts_total",
    "relayd_webhook_events_dropped_total",
    "relayd_webhook_backlog",
    "relayd_build_info",
)

#: The process and platform collectors' families (not relayd's own: no namespace).
RUNTIME_METRIC_NAMES: tuple[str, ...] = (
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "python_info",
)


#: The registry type, for modules that hold one without importing prometheus_client.
Registry: TypeAlias = CollectorRegistry


def new_registry() -> Registry:
    """An empty registry for one :class:`Metrics` (one per relay; tests build several)."""
    return CollectorRegistry()


def _package_version() -> str:
    """The installed relayd version, or "unknown" when run from a source tree."""
    try:
        return metadata.version("relayd")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """All relayd metrics, registered on ``registry``; one instance per process.

    Attributes named after a family are the family itself; the dicts and the
    ``auth_success``/``auth_failure`` attributes are pre-bound children for the
    hot path. Gauges that mirror the spool (``queue``, ``spool_*_bytes``) are set
    by their owner from its own counts; the others are inc/dec by the code that
    sees the event.
    """

    def __init__(self, registry: Registry, *, version: str | None = None) -> None:
        """Create and register every family, and every known label child at zero.

        Also registers the process and platform collectors on ``registry`` and
        turns off ``_created`` series (for the whole process: see the module doc).

        Size: one flat list of family definitions, each a few lines of name, help
        and labels; split, it would be the same list in more places.
        """
        disable_created_metrics()
        ns = NAMESPACE
        r = registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        # --- SMTP sessions (relayd.smtp.server) -------------------------------------
        self.smtp_connections_total = Counter(
            "smtp_connections", "SMTP connections accepted.", namespace=ns, registry=r
        )
        self.smtp_sessions_active = Gauge(
            "smtp_sessions_active", "SMTP sessions open now.", namespace=ns, registry=r
        )
        self.smtp_rejections_total = Counter(
            "smtp_rejections",
            "SMTP commands or messages refused, by reason (relayd.smtp.replies).",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.rejections: dict[str, Counter] = {
            reason: self.smtp_rejections_total.labels(reason=reason)
            for reason in REJECTION_REASONS
        }

        # --- authentication and the credential cache (relayd.directory.credentials) ----
        self.auth_total = Counter(
            "auth", "SMTP AUTH attempts decided by a credential check, by result.",
            ["result"], namespace=ns, registry=r,
        )
        self.auth_success = self.auth_total.labels(result="success")
        self.auth_failure = self.auth_total.labels(result="failure")
        self.credential_cache_hits_total = Counter(
            "credential_cache_hits",
            "AUTH attempts answered from the in-memory credential cache.",
            namespace=ns,
            registry=r,
        )
        self.credential_cache_misses_total = Counter(
            "credential_cache_misses",
            "Password checks of known accounts that needed argon2: first login, first"
            " after an invalidation, and every wrong password (relayd.observe.events).",
            namespace=ns,
            registry=r,
        )

        # --- acceptance and queues (relayd.store.spool, relayd.queue.scheduler) ----------
        self.messages_accepted_total = Counter(
            "messages_accepted",
            "Messages committed to the spool and answered with 250.",
            namespace=ns,
            registry=r,
        )
        self.messages_in_flight = Gauge(
            "messages_in_flight",
            "Messages being transmitted to a next hop now.",
            namespace=ns,
            registry=r,
        )
        self.queue_messages = Gauge(
            "queue_messages",
            "Messages in the spool, by queue state.",
            ["state"],
            namespace=ns,
            registry=r,
        )
        self.queue: dict[str, Gauge] = {
            state: self.queue_messages.labels(state=state) for state in QUEUE_STATES
        }
        self.queue_reconciled_total = Counter(
            "queue_reconciled",
            "Messages the spool held that the scheduler had lost track of, put back in"
            " its queue by the reconciliation with the database (should stay 0).",
            namespace=ns,
            registry=r,
        )
        self.spool_free_bytes = Gauge(
            "spool_free_bytes",
            "Free bytes on the file system holding the spool.",
            namespace=ns,
            registry=r,
        )
        self.spool_size_bytes = Gauge(
            "spool_size_bytes",
            "Bytes used by the spool (database, WAL, large-message files) and the delivery log.",
            namespace=ns,
            registry=r,
        )
        self.accept_duration_seconds = Histogram(
            "accept_duration_seconds",
            "End of DATA to the 250 reply (includes the group commit).",
            namespace=ns,
            registry=r,
            buckets=ACCEPT_BUCKETS,
        )
        self.spool_commit_batch_size = Histogram(
            "spool_commit_batch_size",
            "Messages made durable by one spool group commit.",
            namespace=ns,
            registry=r,
            buckets=BATCH_BUCKETS,
        )

        # --- delivery (relayd.delivery.client) ---------------------------------------
        self.delivery_attempts_total = Counter(
            "delivery_attempts",
            "Delivery attempts per recipient, by outcome (purged: removed by the operator,"
            " not attempted; suppressed: on the domain's suppression list, not sent).",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.delivery: dict[str, Counter] = {
            outcome: self.delivery_attempts_total.labels(outcome=outcome)
            for outcome in DELIVERY_OUTCOMES
        }
        self.delivery_tls_total = Counter(
            "delivery_tls",
            "Delivery attempts per recipient to MX hosts, by what TLS achieved (plaintext,"
            " fallback: plaintext after a failed handshake at level may, encrypted, verified,"
            " refused: level encrypt/verify not met, deferred; dane: the certificate matched"
            " the MX host's secure TLSA records; dane_failed: DANE not met, deferred).",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.delivery_tls: dict[str, Counter] = {
            tls: self.delivery_tls_total.labels(outcome=tls) for tls in DELIVERY_TLS_OUTCOMES
        }
        self.delivery_duration_seconds = Histogram(
            "delivery_duration_seconds",
            "Duration of one delivery attempt to the next hop.",
            namespace=ns,
            registry=r,
            buckets=DELIVERY_BUCKETS,
        )

        self.mta_sts_results_total = Counter(
            "mta_sts_results", "MTA-STS outcomes (relayd.delivery.sts) by policy mode"
            " (enforce, testing; '-': a policy fetch) and result: success, or the RFC 8460"
            " result type of the failure (in testing mode: delivered anyway).",
            ["mode", "result"], namespace=ns, registry=r)

        # --- per-destination shaping (relayd.queue.shaped; MX mode) ------------------
        self._backoff_labels: set[str] = set()
        self.destination_backoff = Gauge(
            "destination_backoff", "Destinations backed off now after a throttling reply"
            " (a table entry's name; other: destinations of the default row).",
            ["destination"], namespace=ns, registry=r)
        self.destination_shaped_total = Counter(
            "destination_shaped", "Attempts per-destination shaping held (waited: for a"
            " limit; deferred: beyond it; backed_off: during a back-off) and throttling"
            " replies that backed a destination off (throttled).",
            ["destination", "kind"], namespace=ns, registry=r)

        self._destination_metrics(ns, r)

        # --- cluster mode (relayd.cluster.node; 0 on a single node) ------------------
        self.cluster_fenced = Gauge(
            "cluster_fenced", "1 while this node is fenced: cut off from the cluster database"
            " too long, it takes no new mail or logins.", namespace=ns, registry=r)
        self.cluster_heartbeat_age_seconds = Gauge(
            "cluster_heartbeat_age_seconds",
            "Seconds since this node's last successful round trip to the cluster database.",
            namespace=ns, registry=r)
        self.cluster_versions_behind = Gauge(
            "cluster_versions_behind",
            "Control-plane versions this node has seen but not applied yet.",
            namespace=ns, registry=r)
        self.cluster_ack_duration_seconds = Histogram(
            "cluster_ack_duration_seconds",
            "A control change committed to every live node having applied it.",
            namespace=ns, registry=r, buckets=ACK_BUCKETS)

        # --- webhooks (relayd.webhooks.poster) -------------------------------------
        self.webhook_posts_total = Counter(
            "webhook_posts_total", "Posts of delivery events to webhooks, by result (ok: a"
            " 2xx answer; failed: another status, a timeout or no connection).", ["result"],
            namespace=ns, registry=r)
        self.webhook_post_ok = self.webhook_posts_total.labels(result="ok")
        self.webhook_post_failed = self.webhook_posts_total.labels(result="failed")
        self.webhook_events_dropped_total = Counter(
            "webhook_events_dropped_total", "Delivery events deleted without being posted:"
            " past [webhooks] max_events (the oldest), or their domain's webhook removed.",
            namespace=ns, registry=r)
        self.webhook_backlog = Gauge(
            "webhook_backlog", "Delivery events stored in this node's spool, waiting to be"
            " posted.", namespace=ns, registry=r)

        # --- build ------------------------------------------------------------
        self.build_info = Gauge(
            "build_info", "relayd build; the value is always 1.", ["version"],
            namespace=ns, registry=r,
        )
        self.build_info.labels(version=version or _package_version()).set(1)

    def _destination_metrics(self, ns: str, r: Registry) -> None:
        """Attempts, TLS outcomes and failed hops by destination, DNS failures by kind
        (MX mode). A destination label is a shaping table entry's name or ``other``
        (relayd.queue.shaped ``Shaping.label``): bounded by the configuration."""
        self._destination_children: dict[tuple[str, str, str], Counter] = {}
        self.destination_attempts_total = Counter(
            "destination_attempts", "Delivery attempts per recipient routed by MX, by"
            " destination (a shaping table entry's name; other: the rest) and outcome.",
            ["destination", "outcome"], namespace=ns, registry=r)
        self.destination_tls_total = Counter(
            "destination_tls", "Delivery attempts per recipient routed by MX, by destination"
            " and what TLS achieved (the outcomes of relayd_delivery_tls_total).",
            ["destination", "outcome"], namespace=ns, registry=r)
        self.mx_hop_failures_total = Counter(
            "mx_hop_failures", "MX hops (one address of one MX host) that failed during an"
            " attempt, before or without the mail going to a later one, by destination and"
            " reason (relayd.delivery.hopfailures).",
            ["destination", "reason"], namespace=ns, registry=r)
        self.dns_failures_total = Counter(
            "dns_failures", "MX-mode DNS failures by reason: lookups that failed (servfail,"
            " timeout, error) and domains left without a route (nxdomain, no_address,"
            " null_mx, invalid).", ["reason"], namespace=ns, registry=r)
        self.dns_failures: dict[str, Counter] = {
            kind: self.dns_failures_total.labels(reason=kind) for kind in DNS_FAILURE_KINDS}
        for outcome in DESTINATION_OUTCOMES:
            self.destination_attempts_total.labels(destination="other", outcome=outcome)
        for reason in HOP_FAILURE_KINDS:
            self.mx_hop_failures_total.labels(destination="other", reason=reason)
        for tls in TLS_OUTCOMES:
            self.destination_tls_total.labels(destination="other", outcome=tls)

    def by_destination(self, family: str, destination: str, value: str) -> Counter:
        """The child of a per-destination family (``mx_hop_failures`` by reason,
        ``destination_attempts`` / ``destination_tls`` by outcome), bound once."""
        key = (family, destination, value)
        child = self._destination_children.get(key)
        if child is None:
            if family == "mx_hop_failures":
                child = self.mx_hop_failures_total.labels(destination=destination, reason=value)
            elif family == "destination_attempts":
                child = self.destination_attempts_total.labels(destination=destination,
                                                               outcome=value)
            else:
                child = self.destination_tls_total.labels(destination=destination, outcome=value)
            self._destination_children[key] = child
        return child

    def set_backoffs(self, labels: list[str]) -> None:
        """The ``destination_backoff`` gauge from the destinations backed off now (a label
        seen before and not backed off now reads 0)."""
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        for label in self._backoff_labels | counts.keys():
            self.destination_backoff.labels(destination=label).set(counts.get(label, 0))
        self._backoff_labels |= counts.keys()

    def in_flight(self) -> int:
        """Messages being delivered now: the ``relayd_messages_in_flight`` gauge's value.

        Read through the gauge's public ``collect()`` (one sample, no lock held
        for long), not its private value, and not through the registry, whose
        collect would also read ``/proc`` for the process collector.
        """
        for family in self.messages_in_flight.collect():
            for sample in family.samples:
                return int(sample.value)
        return 0


def render(registry: Registry, accept: str = "") -> tuple[bytes, str]:
    """Encode ``registry`` for a scrape: (payload, Content-Type).

    ``accept`` is the scraper's Accept header; OpenMetrics is returned when it
    asks for it, the Prometheus text format otherwise. Cost: proportional to
    the number of series (a few hundred), runs on the loop, well under 1 ms.
    """
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
