"""relayd.observe.metrics: names, pre-created rows, hot-path children, rendering."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from relayd.observe import metrics
from relayd.observe.metrics import METRIC_NAMES, RUNTIME_METRIC_NAMES, Metrics, render
from relayd.smtp.replies import REJECTION_REASONS


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a rendered registry, keyed by (name, labels)."""
    payload, _ = render(registry)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(payload.decode())
        for s in family.samples
    }


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry holding one Metrics."""
    r = CollectorRegistry()
    Metrics(r, version="1.2.3")
    return r


def test_every_exposed_family_is_in_metric_names(registry: CollectorRegistry) -> None:
    """Each relayd_* sample rendered belongs to a family listed in METRIC_NAMES, and
    every other one to RUNTIME_METRIC_NAMES (the process and platform collectors)."""
    names = {name for name, _ in _samples(registry)}
    families = set()
    for name in names:
        if name in RUNTIME_METRIC_NAMES:
            continue
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
        families.add(base if base in METRIC_NAMES else base + "_total")
    assert families == set(METRIC_NAMES)


def test_metric_names_are_the_documented_ones() -> None:
    """METRIC_NAMES holds exactly the names operators and the alert rules rely on."""
    assert set(METRIC_NAMES) == {
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
        "relayd_delivery_tls_total",  # what TLS achieved towards MX hosts (issue 17)
        "relayd_destination_attempts_total",  # MX mode, by destination (issue 17)
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
    }
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))


def test_counters_are_exposed_with_total_suffix(registry: CollectorRegistry) -> None:
    """Unlabelled counters render as <name>_total samples, starting at zero."""
    samples = _samples(registry)
    for name in (
        "relayd_smtp_connections_total",
        "relayd_credential_cache_hits_total",
        "relayd_credential_cache_misses_total",
        "relayd_messages_accepted_total",
        "relayd_queue_reconciled_total",
    ):
        assert samples[(name, frozenset())] == 0.0


def test_every_rejection_reason_is_precreated_at_zero(registry: CollectorRegistry) -> None:
    """relayd_smtp_rejections_total has one row per REJECTION_REASONS label, all 0."""
    samples = _samples(registry)
    rows = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "relayd_smtp_rejections_total"
    }
    assert rows == dict.fromkeys(REJECTION_REASONS, 0.0)


def test_auth_results_are_precreated_at_zero(registry: CollectorRegistry) -> None:
    """relayd_auth_total has success and failure rows at 0 before any AUTH."""
    samples = _samples(registry)
    for result in ("success", "failure"):
        assert samples[("relayd_auth_total", frozenset({("result", result)}))] == 0.0


def test_queue_states_are_precreated_at_zero(registry: CollectorRegistry) -> None:
    """relayd_queue_messages has a row per queue state, at 0."""
    samples = _samples(registry)
    for state in ("queued", "waiting_limit", "held", "deferred"):
        assert samples[("relayd_queue_messages", frozenset({("state", state)}))] == 0.0


def test_delivery_outcomes_are_precreated_at_zero(registry: CollectorRegistry) -> None:
    """relayd_delivery_attempts_total has a row per outcome, at 0."""
    samples = _samples(registry)
    for outcome in ("delivered", "deferred", "failed"):
        key = ("relayd_delivery_attempts_total", frozenset({("outcome", outcome)}))
        assert samples[key] == 0.0


def test_build_info_carries_the_version(registry: CollectorRegistry) -> None:
    """relayd_build_info{version=...} is 1."""
    assert _samples(registry)[("relayd_build_info", frozenset({("version", "1.2.3")}))] == 1.0


def test_prebound_rejection_child_increments_its_row() -> None:
    """metrics.rejections[reason].inc() moves only that reason's row."""
    r = CollectorRegistry()
    m = Metrics(r)
    m.rejections["size"].inc()
    m.rejections["size"].inc()
    samples = _samples(r)
    assert samples[("relayd_smtp_rejections_total", frozenset({("reason", "size")}))] == 2.0
    assert samples[("relayd_smtp_rejections_total", frozenset({("reason", "syntax")}))] == 0.0


def test_prebound_children_are_the_labelled_rows() -> None:
    """Pre-bound children are the same objects .labels() returns, not copies."""
    m = Metrics(CollectorRegistry())
    assert m.auth_success is m.auth_total.labels(result="success")
    assert m.auth_failure is m.auth_total.labels(result="failure")
    assert m.queue["held"] is m.queue_messages.labels(state="held")
    assert m.delivery["failed"] is m.delivery_attempts_total.labels(outcome="failed")


def test_accept_histogram_buckets_span_half_a_millisecond_to_a_second() -> None:
    """accept_duration_seconds resolves 0.5 ms at the low end and 1 s at the top."""
    assert metrics.ACCEPT_BUCKETS[0] == 0.0005
    assert metrics.ACCEPT_BUCKETS[-1] == 1.0
    assert list(metrics.ACCEPT_BUCKETS) == sorted(metrics.ACCEPT_BUCKETS)


def test_batch_size_buckets_are_powers_of_two(registry: CollectorRegistry) -> None:
    """relayd_spool_commit_batch_size has buckets 1, 2, 4, ... 256 and +Inf."""
    les = sorted(
        float(dict(labels)["le"])
        for (name, labels), _ in _samples(registry).items()
        if name == "relayd_spool_commit_batch_size_bucket"
    )
    assert les == [1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf")]


def test_histogram_observation_is_rendered() -> None:
    """An accept latency observation lands in its bucket, sum and count."""
    r = CollectorRegistry()
    m = Metrics(r)
    m.accept_duration_seconds.observe(0.003)
    samples = _samples(r)
    bucket = "relayd_accept_duration_seconds_bucket"
    assert samples[(bucket, frozenset({("le", "0.002")}))] == 0.0
    assert samples[(bucket, frozenset({("le", "0.005")}))] == 1.0
    assert samples[("relayd_accept_duration_seconds_count", frozenset())] == 1.0


def test_no_label_can_hold_an_account() -> None:
    """No family has a label that could carry an unbounded value (account, user, domain)."""
    r = CollectorRegistry()
    Metrics(r)
    labels = {
        label
        for family in r.collect()
        if family.name != "python_info"  # the interpreter's version: constant
        for sample in family.samples
        for label in sample.labels
    }
    # destination (MX mode): a [[delivery.shaping.destination]] name or "other", bounded by
    # the configuration, never a recipient domain (tests/test_mx_failover_visible.py)
    assert labels <= {"reason", "result", "state", "outcome", "le", "version", "destination"}


def test_render_defaults_to_prometheus_text_format(registry: CollectorRegistry) -> None:
    """render() without an Accept header returns text format 0.0.4."""
    payload, content_type = render(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# TYPE relayd_smtp_rejections_total counter" in payload


def test_render_negotiates_openmetrics(registry: CollectorRegistry) -> None:
    """render() returns OpenMetrics, ending in # EOF, when the scraper asks for it."""
    payload, content_type = render(registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert payload.endswith(b"# EOF\n")


def test_two_instances_need_two_registries() -> None:
    """Registering Metrics twice on one registry fails loudly instead of splitting counts."""
    r = CollectorRegistry()
    Metrics(r)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(r)
