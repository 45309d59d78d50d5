"""Micro-benchmarks: the cost of recording a metric on the hot path.

Run: pytest bench/micro/test_bench_metrics.py --benchmark-enable
(pyproject's addopts disable benchmarks in the normal test run).
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from pytest_benchmark.fixture import BenchmarkFixture

from relayd.observe.metrics import Metrics


@pytest.fixture
def m() -> Metrics:
    """Metrics on a private registry."""
    return Metrics(CollectorRegistry())


def test_counter_inc_prebound_child(benchmark: BenchmarkFixture, m: Metrics) -> None:
    """Rejection counter via the pre-bound child, as relayd.smtp.server does."""
    child = m.rejections["syntax"]
    benchmark(child.inc)


def test_counter_inc_via_labels(benchmark: BenchmarkFixture, m: Metrics) -> None:
    """The same increment with .labels() per event, the pattern the hot path avoids."""
    family = m.smtp_rejections_total

    def inc() -> None:
        family.labels(reason="syntax").inc()

    benchmark(inc)


def test_counter_inc_unlabelled(benchmark: BenchmarkFixture, m: Metrics) -> None:
    """An unlabelled counter (messages accepted)."""
    benchmark(m.messages_accepted_total.inc)


def test_histogram_observe(benchmark: BenchmarkFixture, m: Metrics) -> None:
    """One accept-latency observation (bucket search + sum)."""
    observe = m.accept_duration_seconds.observe
    benchmark(observe, 0.0042)
