"""/metrics: the process collector on relayd's registry, and no ``_created`` series
(issue 13 item 6). Scraped over a real socket from an in-process relay."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from relayd.observe.metrics import RUNTIME_METRIC_NAMES
from tests.conftest import RelayHandle
from tests.rawsmtp import Raw
from tests.test_ops_support import scrape, value

ROOT = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
RUNTIME_RE = re.compile(r"\b(?:process_[a-z_]+|python_info)\b")


async def _sample_names(url: str, accept: str = "") -> set[str]:
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Accept": accept}) as resp:
        assert resp.status == 200
        text = await resp.text()
    if accept:
        from prometheus_client.openmetrics.parser import (
            text_string_to_metric_families as om_families,
        )
        return {smp.name for fam in om_families(text) for smp in fam.samples}
    return {smp.name for fam in text_string_to_metric_families(text) for smp in fam.samples}


async def test_process_metrics_are_served(relay: RelayHandle) -> None:
    """/metrics has the process collector: open fds, their limit, memory, CPU, start time."""
    samples = await scrape(relay.metrics_url)
    assert value(samples, "process_open_fds") > 0
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_start_time_seconds") > 0
    assert ("process_cpu_seconds_total", frozenset()) in samples
    assert {name for name, _ in samples if RUNTIME_RE.fullmatch(name)} == set(
        RUNTIME_METRIC_NAMES)


async def test_max_fds_is_the_soft_nofile_limit(relay: RelayHandle) -> None:
    """process_max_fds is the process's soft RLIMIT_NOFILE (LimitNOFILE=), read at scrape."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = 4000 if hard == resource.RLIM_INFINITY or hard >= 4000 else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        samples = await scrape(relay.metrics_url)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert value(samples, "process_max_fds") == lowered


async def test_open_fds_follow_smtp_sessions(relay: RelayHandle) -> None:
    """Each open SMTP session shows as one more open descriptor."""
    before = value(await scrape(relay.metrics_url), "process_open_fds")
    clients = [await Raw.open(relay.host, relay.port) for _ in range(5)]
    during = value(await scrape(relay.metrics_url), "process_open_fds")
    for c in clients:
        await c.quit()
    assert during - before >= 5


async def test_no_created_series_in_either_format(relay: RelayHandle) -> None:
    """No sample is a _created one, in the Prometheus text format or OpenMetrics."""
    c = await Raw.open(relay.host, relay.port)  # a labelled child and a histogram in use
    assert (await c.cmd("FROB")).startswith("500 ")
    await c.quit()
    for accept in ("", OPENMETRICS):
        names = await _sample_names(relay.metrics_url, accept)
        assert "relayd_smtp_rejections_total" in names or "relayd_smtp_rejections" in names
        assert {n for n in names if n.endswith("_created")} == set(), accept


def test_ops_files_use_only_exposed_process_metrics() -> None:
    """Every process_*/python_info name in the dashboard and the alert rules is exposed."""
    text = (ROOT / "config" / "grafana-dashboard.json").read_text() + (
        ROOT / "config" / "prometheus-alerts.yml").read_text()
    used = set(RUNTIME_RE.findall(text))
    assert {"process_open_fds", "process_max_fds"} <= used
    assert used <= set(RUNTIME_METRIC_NAMES)
