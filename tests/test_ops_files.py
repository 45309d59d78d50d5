"""Ops files: the Grafana dashboard, the alert rules and the systemd units.

Every metric name in a dashboard query or an alert expression must be one
relayd.observe.metrics exposes. The tool checks (systemd-analyze, systemd-sysusers,
systemd-tmpfiles, promtool; PROMTOOL=path overrides the search) fail when the
tool is missing: scripts/install-debs.sh installs them (tests/tools.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from relayd.observe.metrics import METRIC_NAMES
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
ALERTS = ROOT / "config" / "prometheus-alerts.yml"
UNIT = ROOT / "systemd" / "relayd.service"
SYSUSERS = ROOT / "systemd" / "relayd.sysusers.conf"
TMPFILES = ROOT / "systemd" / "relayd.tmpfiles.conf"

METRIC_RE = re.compile(r"\brelayd_[a-z_]+")
SAMPLE_SUFFIXES = ("_bucket", "_sum", "_count", "_total")  # no _created: metrics.py


# --- helpers -------------------------------------------------------------------


def _family(name: str) -> str | None:
    """The METRIC_NAMES family a sample name belongs to, or None."""
    if name in METRIC_NAMES:
        return name
    for suffix in SAMPLE_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            for candidate in (base, base + "_total"):
                if candidate in METRIC_NAMES:
                    return candidate
    return None


def _metric_names(expr: str) -> set[str]:
    """Every relayd_* name mentioned in a PromQL expression."""
    return set(METRIC_RE.findall(expr))


def _load_yaml(text: str) -> Any:
    """Parse YAML with PyYAML, or with the block-style subset parser when it is absent."""
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return _parse_yaml_subset(text)
    return yaml.safe_load(text)


def _parse_yaml_subset(text: str) -> Any:
    """Parse the block-style YAML subset the alert file uses.

    Supported: block mappings and sequences (indentation), plain and
    double-quoted scalars, ``|`` literal blocks without blank or comment lines,
    whole-line comments. Enough for config/prometheus-alerts.yml, no more:
    PyYAML replaces it when installed.
    """
    lines = [
        (len(raw) - len(raw.lstrip(" ")), raw.strip())
        for raw in text.splitlines()
        if raw.strip() and not raw.strip().startswith("#")
    ]

    def scalar(value: str) -> Any:
        if value.startswith('"'):
            return json.loads(value)
        return value

    def block(i: int) -> tuple[Any, int]:
        indent, content = lines[i]
        if content.startswith("- "):
            return sequence(i, indent)
        return mapping(i, indent)

    def sequence(i: int, indent: int) -> tuple[list[Any], int]:
        items = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            lines[i] = (indent + 2, lines[i][1][2:])
            item, i = mapping(i, indent + 2)
            items.append(item)
        return items, i

    def mapping(i: int, indent: int) -> tuple[dict[str, Any], int]:
        result: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
            key, sep, rest = lines[i][1].partition(":")
            assert sep, f"not a mapping line: {lines[i][1]!r}"
            rest = rest.strip()
            i += 1
            if rest == "|":
                body = []
                while i < len(lines) and lines[i][0] > indent:
                    body.append(lines[i])
                    i += 1
                margin = body[0][0]
                result[key] = "".join(" " * (n - margin) + s + "\n" for n, s in body)
            elif rest == "":
                result[key], i = block(i)
            else:
                result[key] = scalar(rest)
        return result, i

    value, end = block(0)
    assert end == len(lines), f"unparsed YAML from line {end}: {lines[end]}"
    return value


def _dashboard() -> dict[str, Any]:
    """The dashboard model."""
    model: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return model


def _dashboard_panels() -> list[dict[str, Any]]:
    """Every non-row panel of the dashboard, nested rows included."""
    panels = []
    for panel in _dashboard()["panels"]:
        panels.extend(panel.get("panels", []))
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def _dashboard_exprs() -> list[str]:
    """Every PromQL expression in panels and template variables."""
    exprs = [t["expr"] for p in _dashboard_panels() for t in p.get("targets", [])]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _rules() -> list[dict[str, Any]]:
    """Every rule of every group of the alert file."""
    doc = _load_yaml(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _rule(name: str) -> dict[str, Any]:
    """The alerting rule named ``name``."""
    (rule,) = [r for r in _rules() if r.get("alert") == name]
    return rule


def _unit_directives(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values of a unit file, in order."""
    section = ""
    result: dict[tuple[str, str], list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        result.setdefault((section, key.strip()), []).append(value.strip())
    return result


def _verifiable_unit(tmp_path: Path, text: str) -> Path:
    """A copy of the unit whose Exec*= programs exist (relayd is not installed here)."""
    true = shutil.which("true") or "/bin/true"

    def fix(match: re.Match[str]) -> str:
        program = match.group(2)
        return match.group(1) + (program if os.access(program, os.X_OK) else true)

    fixed = re.sub(r"(?m)^(Exec[A-Za-z]*=[-@:+!]*)(\S+)", fix, text)
    path = tmp_path / "relayd.service"
    path.write_text(fixed)
    return path


def _verify(unit: Path) -> list[str]:
    """systemd-analyze verify output lines that concern ``unit``."""
    analyze = require_tool("systemd-analyze")
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    output = proc.stdout + proc.stderr
    return [line for line in output.splitlines() if unit.name in line]


# --- metric names ----------------------------------------------------------------


def test_family_helper_accepts_sample_suffixes() -> None:
    """_family maps bucket/sum/count samples to their family, and rejects others (relayd
    exports no _created series)."""
    assert _family("relayd_accept_duration_seconds_bucket") == "relayd_accept_duration_seconds"
    assert _family("relayd_auth_created") is None
    assert _family("relayd_auth_total") == "relayd_auth_total"
    assert _family("relayd_no_such_metric") is None


def test_dashboard_queries_use_only_exposed_metrics() -> None:
    """Every relayd_* name in a dashboard query is a metric relayd.observe.metrics exposes."""
    names = set().union(*(_metric_names(e) for e in _dashboard_exprs()))
    assert names
    assert {n for n in names if _family(n) is None} == set()


def test_alert_expressions_use_only_exposed_metrics() -> None:
    """Every relayd_* name in an alert expression is a metric relayd.observe.metrics exposes."""
    names = set().union(*(_metric_names(r["expr"]) for r in _rules()))
    assert names
    assert {n for n in names if _family(n) is None} == set()


# --- dashboard -------------------------------------------------------------------


def test_dashboard_is_a_grafana_model() -> None:
    """The dashboard has a title, uid, schema version, time range and panels."""
    model = _dashboard()
    assert model["title"] and model["uid"]
    assert isinstance(model["schemaVersion"], int)
    assert model["time"]["from"].startswith("now-")
    assert _dashboard_panels()


def test_dashboard_panel_ids_are_unique() -> None:
    """No two panels (rows included) share an id."""
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_panels_fit_the_grid() -> None:
    """Every panel lies within Grafana's 24-column grid."""
    for panel in _dashboard()["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]


def test_dashboard_queries_use_the_datasource_variable() -> None:
    """Every panel queries the templated Prometheus data source, not a fixed one."""
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in _dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_shows_every_metric() -> None:
    """Each metric family relayd exposes appears in at least one dashboard query."""
    shown = {_family(n) for e in _dashboard_exprs() for n in _metric_names(e)}
    assert set(METRIC_NAMES) - shown == set()


@pytest.mark.parametrize(
    "histogram", ["relayd_accept_duration_seconds", "relayd_delivery_duration_seconds"]
)
def test_dashboard_latency_has_p50_and_p99(histogram: str) -> None:
    """Accept and delivery latency panels plot p50 and p99 from histogram buckets."""
    quantiles = {
        match
        for e in _dashboard_exprs()
        if f"{histogram}_bucket" in e
        for match in re.findall(r"histogram_quantile\((0\.\d+)", e)
    }
    assert quantiles >= {"0.5", "0.99"}


def test_dashboard_breaks_down_by_the_labels() -> None:
    """Rejections, auth, queue and delivery panels split by their label."""
    exprs = " ".join(_dashboard_exprs())
    for family, label in [
        ("relayd_smtp_rejections_total", "reason"),
        ("relayd_auth_total", "result"),
        ("relayd_queue_messages", "state"),
        ("relayd_delivery_attempts_total", "outcome"),
    ]:
        assert re.search(rf"by \({label}\) \((rate\()?{family}", exprs), family


# --- alert rules -----------------------------------------------------------------


def test_alert_rules_are_well_formed() -> None:
    """Each rule has a unique name, an expression, a for, a severity and a summary."""
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


@pytest.mark.parametrize(
    ("alert", "needle"),
    [
        ("RelaydDown", 'up{job="relayd"} == 0'),
        ("RelaydDeferredQueueHigh", 'relayd_queue_messages{state="deferred"}'),
        ("RelaydDeferredQueueGrowing", "deriv(relayd_queue_messages"),
        ("RelaydDeliveriesFailing", 'relayd_delivery_attempts_total{outcome="failed"}'),
        ("RelaydRejectionsSpiking", "relayd_smtp_rejections_total"),
        ("RelaydSpoolDiskLow", "relayd_spool_free_bytes"),
        ("RelaydSpoolDiskFillingUp", "predict_linear(relayd_spool_free_bytes"),
    ],
)
def test_required_alert_exists(alert: str, needle: str) -> None:
    """Each alert the runbook relies on exists and watches the right series."""
    assert needle in _rule(alert)["expr"]


def test_yaml_subset_parser_matches_pyyaml() -> None:
    """The fallback parser reads the alert file exactly as PyYAML does."""
    import yaml  # pyproject's test extra
    text = ALERTS.read_text()
    assert _parse_yaml_subset(text) == yaml.safe_load(text)


def test_promtool_accepts_the_rules() -> None:
    """promtool check rules finds every rule valid PromQL."""
    promtool = require_tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout


def _hist(prefix: str, slow: bool) -> list[dict[str, str]]:
    """Series of an accept-latency histogram: 10 obs/s, all slow (0.5-1 s) or all fast."""
    fast_bucket = "0x30" if slow else "0+600x30"
    return [
        {"series": f'{prefix}_bucket{{instance="a",le="0.5"}}', "values": fast_bucket},
        {"series": f'{prefix}_bucket{{instance="a",le="1"}}', "values": "0+600x30"},
        {"series": f'{prefix}_bucket{{instance="a",le="+Inf"}}', "values": "0+600x30"},
        {"series": f'{prefix}_count{{instance="a"}}', "values": "0+600x30"},
    ]


def _deliveries(failed: str, delivered: str) -> list[dict[str, str]]:
    """Delivery attempt counters of instance a."""
    name = "relayd_delivery_attempts_total"
    return [
        {"series": f'{name}{{instance="a",outcome="failed"}}', "values": failed},
        {"series": f'{name}{{instance="a",outcome="delivered"}}', "values": delivered},
    ]


DEFERRED = 'relayd_queue_messages{instance="a",state="deferred"}'
REJECTED = 'relayd_smtp_rejections_total{instance="a",reason="auth_failed"}'
FREE = 'relayd_spool_free_bytes{instance="a"}'
OPEN_FDS = 'process_open_fds{job="relayd",instance="a"}'
MAX_FDS = 'process_max_fds{job="relayd",instance="a"}'
FENCED = 'relayd_cluster_fenced{instance="a"}'
BACKLOG = 'relayd_webhook_backlog{instance="a"}'

# alert -> (series when it must fire, series when it must stay quiet, eval time)
SCENARIOS: dict[str, tuple[list[dict[str, str]], list[dict[str, str]], str]] = {
    "RelaydDown": (
        [{"series": 'up{job="relayd",instance="a"}', "values": "0x10"}],
        [{"series": 'up{job="relayd",instance="a"}', "values": "1x10"}],
        "5m",
    ),
    "RelaydDeferredQueueHigh": (
        [{"series": DEFERRED, "values": "5000x20"}],
        [{"series": DEFERRED, "values": "10x20"}],
        "10m",
    ),
    "RelaydDeferredQueueGrowing": (
        [{"series": DEFERRED, "values": "200+10x60"}],
        [{"series": DEFERRED, "values": "500x60"}],
        "40m",
    ),
    "RelaydDeliveriesFailing": (
        _deliveries("0+15x60", "0+45x60"),  # 25 % failed
        _deliveries("0+1x60", "0+99x60"),  # 1 % failed
        "40m",
    ),
    "RelaydRejectionsSpiking": (
        [{"series": REJECTED, "values": "0+60x120 7260+600x30"}],  # 1/s, then 10/s
        [{"series": REJECTED, "values": "0+60x150"}],
        "140m",
    ),
    "RelaydAcceptLatencyHigh": (
        _hist("relayd_accept_duration_seconds", slow=True),
        _hist("relayd_accept_duration_seconds", slow=False),
        "20m",
    ),
    "RelaydSpoolDiskLow": (
        [{"series": FREE, "values": "1000000000x20"}],
        [{"series": FREE, "values": "100000000000x20"}],
        "10m",
    ),
    "RelaydSpoolDiskFillingUp": (
        [{"series": FREE, "values": "10000000000-10000000x400"}],  # empty in ~17 h
        [{"series": FREE, "values": "10000000000x400"}],
        "380m",
    ),
    "RelaydFileDescriptorsHigh": (
        [{"series": OPEN_FDS, "values": "60000x20"}, {"series": MAX_FDS, "values": "65536x20"}],
        [{"series": OPEN_FDS, "values": "3000x20"}, {"series": MAX_FDS, "values": "65536x20"}],
        "15m",
    ),
    "RelaydClusterNodeFenced": (
        [{"series": FENCED, "values": "0 0 1x10"}],
        [{"series": FENCED, "values": "0 0 1 0x10"}],
        "6m",
    ),
    "RelaydWebhookBacklog": (
        [{"series": BACKLOG, "values": "2000+10x60"}],  # a dead webhook: growing
        [{"series": BACKLOG, "values": "5000x60"}],  # large but not growing (draining)
        "50m",
    ),
}


def test_every_alert_has_a_scenario() -> None:
    """Each alert rule is exercised by a firing and a quiet promtool scenario."""
    assert set(SCENARIOS) == {r["alert"] for r in _rules()}


@pytest.mark.parametrize("alert", sorted(SCENARIOS))
def test_alert_expression_fires_only_when_it_should(alert: str, tmp_path: Path) -> None:
    """promtool evaluates the alert's expression: true in the bad case, empty in the good."""
    promtool = require_tool("promtool")
    firing, quiet, at = SCENARIOS[alert]
    expr = f"count by (instance) ({_rule(alert)['expr']})"

    def case(series: list[dict[str, str]], samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [{"expr": expr, "eval_time": at, "exp_samples": samples}],
        }

    spec = {
        "rule_files": [],
        "tests": [
            case(firing, [{"labels": '{instance="a"}', "value": 1}]),
            case(quiet, []),
        ],
    }
    test_file = tmp_path / "alerts_test.json"  # JSON is YAML: promtool reads it
    test_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [promtool, "test", "rules", str(test_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- systemd unit ----------------------------------------------------------------

REQUIRED_SERVICE = {
    "Type": "notify",
    "ExecStart": "/usr/bin/relayd --config /etc/relayd/relayd.toml"
    " --data-dir /var/lib/relayd --control-socket /run/relayd/control.sock",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "User": "relayd",
    "Group": "relayd",
    "StateDirectory": "relayd",
    "RuntimeDirectory": "relayd",
    "RuntimeDirectoryMode": "0750",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "Restart": "on-failure",
    "LimitNOFILE": "65536",
    "KillMode": "mixed",
}


@pytest.mark.parametrize(("key", "value"), sorted(REQUIRED_SERVICE.items()))
def test_unit_sets_required_directive(key: str, value: str) -> None:
    """The [Service] section sets each required directive to its required value."""
    assert _unit_directives(UNIT.read_text()).get(("Service", key), [])[-1:] == [value]


def test_unit_filters_system_calls_to_system_service() -> None:
    """The system call allow list is @system-service."""
    values = _unit_directives(UNIT.read_text())[("Service", "SystemCallFilter")]
    assert "@system-service" in values


def test_unit_stop_timeout_exceeds_graceful_shutdown() -> None:
    """TimeoutStopSec is at least 90 s, longer than relayd's graceful shutdown bound."""
    (value,) = _unit_directives(UNIT.read_text())[("Service", "TimeoutStopSec")]
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match
    seconds = int(match.group(1)) * (60 if match.group(2) == "min" else 1)
    assert seconds >= 90


def test_unit_is_installed_for_multi_user() -> None:
    """The unit is enabled into multi-user.target."""
    assert _unit_directives(UNIT.read_text())[("Install", "WantedBy")] == ["multi-user.target"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing about the unit (relayd binary stubbed)."""
    assert _verify(_verifiable_unit(tmp_path, UNIT.read_text())) == []


def test_systemd_analyze_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The verify check is meaningful: a misspelt directive is reported."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomme=yes")
    problems = _verify(_verifiable_unit(tmp_path, broken))
    assert any("ProtectHomme" in line for line in problems)


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    """systemd-analyze security rates the unit's exposure at 2.0 or lower ("OK")."""
    analyze = require_tool("systemd-analyze")
    unit = _verifiable_unit(tmp_path, UNIT.read_text())
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip("systemd-analyze too old for security --offline")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0


# --- sysusers and tmpfiles -------------------------------------------------------


def test_sysusers_declares_the_relayd_user() -> None:
    """sysusers.d creates user relayd with /var/lib/relayd as home."""
    lines = [
        line for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == ['u relayd - "relayd SMTP relay" /var/lib/relayd']


def test_tmpfiles_creates_the_config_directory() -> None:
    """tmpfiles.d creates /etc/relayd as root:relayd 0750."""
    entries = [
        line.split() for line in TMPFILES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["d", "/etc/relayd", "0750", "root", "relayd", "-"] in entries


def _sysusers_root(tmp_path: Path) -> Path:
    """A scratch root whose /etc/passwd and /etc/group hold the relayd user."""
    sysusers = require_tool("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        [sysusers, f"--root={root}", "-"], input=SYSUSERS.read_text(),
        capture_output=True, text=True, timeout=60, check=True,
    )
    return root


def test_systemd_sysusers_creates_the_user(tmp_path: Path) -> None:
    """systemd-sysusers, run on a scratch root, creates relayd with a nologin shell."""
    root = _sysusers_root(tmp_path)
    entry = next(
        line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
        if line.startswith("relayd:")
    )
    assert entry[5] == "/var/lib/relayd"
    assert entry[6].endswith("nologin")
    groups = (root / "etc" / "group").read_text().splitlines()
    assert any(line.startswith("relayd:") for line in groups)


def test_systemd_tmpfiles_creates_the_directory(tmp_path: Path) -> None:
    """systemd-tmpfiles, on a scratch root, makes /etc/relayd 0750 owned by group relayd."""
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --create needs root to chown")
    root = _sysusers_root(tmp_path)
    tmpfiles = require_tool("systemd-tmpfiles")
    proc = subprocess.run(
        [tmpfiles, f"--root={root}", "--create", "-"], input=TMPFILES.read_text(),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    gid = next(
        int(line.split(":")[2]) for line in (root / "etc" / "group").read_text().splitlines()
        if line.startswith("relayd:")
    )
    st = (root / "etc" / "relayd").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 0, gid)
