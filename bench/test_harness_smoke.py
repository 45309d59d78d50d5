"""Smoke test of the bench harness: tiny counts, a few seconds.

Runs the stock-aiosmtpd peer, smtp-sink and the load generators and checks that
the counts add up.  Postfix, smtp-sink and smtp-source come with the test set-up
(scripts/install-debs.sh); missing, their tests fail.

    pytest bench/test_harness_smoke.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import postfix as pf
from bench import procstat
from bench.run import Scenario, measure
from bench.sink import Sink
from bench.systems import REPO, StockAiosmtpd, make_base
from bench.util import free_port, stop_process, wait_smtp_ready
from tests.tools import missing, require_tool


@pytest.fixture
def smtp_sink_installed() -> None:
    """Postfix's smtp-sink (scripts/install-debs.sh installs it), or the test fails."""
    require_tool("smtp-sink")


@pytest.fixture
def smtp_source_installed() -> None:
    """Postfix's smtp-source (scripts/install-debs.sh installs it), or the test fails."""
    require_tool("smtp-source")


@pytest.fixture
def postfix_installed() -> None:
    """A Postfix the harness can run (scripts/install-debs.sh installs it), or the test fails."""
    if not pf.available():
        missing("Postfix", f" ({pf.POSTFIX}, {pf.MAIN_CF_DIST} and script(1))")


needs_sink = pytest.mark.usefixtures("smtp_sink_installed")
needs_source = pytest.mark.usefixtures("smtp_source_installed")


def harness_args(**kw: object) -> argparse.Namespace:
    a = argparse.Namespace(warmup=5, tool_timeout=30.0, e2e_timeout=20.0, stall=10.0)
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def loadgen(target: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "bench.loadgen", "--target", target,
                        "--timeout", "20", *args],
                       cwd=str(REPO), capture_output=True, timeout=40, check=True)
    return json.loads(p.stdout.decode().strip().splitlines()[-1])


@pytest.fixture
def base() -> Iterator[Path]:
    d = make_base("relayd-bench-smoke-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_loadgen_against_stock_aiosmtpd_counts_add_up() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.stock_aiosmtpd",
                             "--listen", f"127.0.0.1:{port}"], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_smtp_ready("127.0.0.1", port, timeout=10, proc=proc)
        cpu0 = procstat.tree_cpu_seconds([proc.pid])
        r = loadgen(f"127.0.0.1:{port}", "--sessions", "10", "--messages", "200",
                    "--per-conn", "7", "--auth-user", "u", "--auth-pass", "p")
        assert r["accepted"] == 200 and r["failed"] == 0, r
        # ceil(200 / 7) full connections at least; each session's last one may be short
        assert 29 <= r["connections"] <= 29 + 10
        lat = r["latency_ms"]
        assert lat["p50"] is not None and lat["p99"] >= lat["p50"]
        assert procstat.tree_cpu_seconds([proc.pid]) >= cpu0
        assert procstat.rss_bytes(proc.pid) > 0
        idle = loadgen(f"127.0.0.1:{port}", "--idle", "30", "--hold", "0.3")
        assert idle["opened"] == 30 and idle["alive_after_hold"] == 30, idle
    finally:
        stop_process(proc, timeout=10)
    assert proc.stdout is not None
    stats = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])
    assert stats["messages"] == 200


@needs_sink
def test_loadgen_into_sink_is_counted() -> None:
    with Sink() as sink:
        r = loadgen(sink.addr, "--sessions", "5", "--messages", "120", "--per-conn", "10",
                    "--size", "5000")
        assert r["accepted"] == 120, r
        assert sink.wait_for(120, timeout=10)
        assert sink.mesg == 120
        assert sink.first_ts is not None and sink.last_ts is not None
        assert sink.last_ts >= sink.first_ts


@needs_sink
@needs_source
@pytest.mark.parametrize("system", ["stock-aiosmtpd", "smtp-sink"])
def test_measure_with_smtp_source(base: Path, system: str) -> None:
    sc = Scenario("S2", "smoke", "smtp-source", messages=150, sessions=5, size=1024, reuse=True)
    r = measure(sc, system, base, harness_args())
    assert r.error is None, r
    assert r.accepted == 150 and r.failed == 0
    assert r.accepted_per_s and r.accepted_per_s > 0
    assert r.peak_rss > 0 and r.cpu_per_1k is not None
    if system == "smtp-sink":
        assert r.delivered == 150 and r.e2e_per_s
    else:
        assert r.delivered is None  # the stock server relays nothing


@needs_sink
def test_measure_idle(base: Path) -> None:
    sc = Scenario("S5", "smoke", "idle", idle=40, hold=0.5)
    r = measure(sc, "stock-aiosmtpd", base, harness_args())
    assert r.error is None, r
    assert r.idle_open == 40 and r.idle_alive == 40
    assert r.peak_rss >= r.base_rss > 0


def test_tree_cpu_counts_reaped_children() -> None:
    """CPU of a child that exits is still counted: it moves into the root's cutime."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    root = subprocess.Popen([sys.executable, "-c",
                             "import subprocess, sys, time\n"
                             f"subprocess.run([sys.executable, '-c', {burn!r}])\n"
                             "print('reaped', flush=True)\n"
                             "time.sleep(30)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout is not None and root.stdout.readline() == "reaped\n"
        assert procstat.tree_pids([root.pid]) == [root.pid]  # the burner is gone
        # it burnt 0.4 s; the root itself used far less than that
        assert procstat.cpu_seconds(root.pid, with_children=False) < 0.3
        assert procstat.tree_cpu_seconds([root.pid]) >= 0.35
    finally:
        root.kill()
        root.wait()


def test_stock_system_stops(base: Path) -> None:
    with Sink() as sink:
        s = StockAiosmtpd(base, sink)
        s.start()
        pid = s.roots()[0]
        s.stop()
        assert procstat.tree_pids([pid]) == []


@needs_sink
@needs_source
@pytest.mark.usefixtures("postfix_installed")
def test_postfix_relays_everything_to_the_sink(base: Path) -> None:
    sc = Scenario("S1", "smoke", "smtp-source", messages=100, sessions=5, size=1024)
    r = measure(sc, "postfix", base, harness_args(warmup=0))
    assert r.error is None, (r, r.problems)
    assert r.accepted == 100 and r.delivered == 100, r
    assert r.peak_procs > 3  # master, qmgr, smtpd, cleanup, ...
    # 100 small messages cost Postfix a few clock ticks spread over many processes;
    # /proc reports whole ticks per process, so this can honestly read 0.0 here.
    # That the counter sees CPU at all is checked by test_tree_cpu_counts_reaped_children.
    assert r.cpu_per_1k is not None and r.cpu_per_1k >= 0


@needs_sink
@needs_source
def test_relayd_relays_everything_to_the_sink(base: Path) -> None:
    sc = Scenario("S3", "smoke", "loadgen", messages=60, sessions=5, size=1024, per_conn=3,
                  auth=True)
    r = measure(sc, "relayd", base, harness_args(warmup=0))
    assert r.error is None, (r, r.problems)
    assert r.accepted == 60 and r.delivered == 60, r


@needs_sink
def test_cold_auth_logs_in_with_a_fresh_account_per_connection(base: Path) -> None:
    """S3-cold: as many fresh relayd accounts as connections, each used once (so every
    login misses the credential cache), all accepted; the ratio line compares it to S3."""
    from bench.run import Result, auth_cache_ratio

    sc = Scenario("S3-cold", "smoke", "loadgen", messages=4, sessions=2, size=1024,
                  per_conn=1, auth=True, cold=True)
    r = measure(sc, "relayd", base, harness_args(warmup=5))
    assert r.error is None, (r, r.problems)
    assert r.accepted == 4 and r.delivered == 4, r
    accounts = (base / "S3-cold-relayd" / "accounts.tsv").read_text().splitlines()
    assert len({line.split("\t")[0] for line in accounts}) == 4
    assert r.tool["connections"] == 4
    warm = Result("S3", "relayd", "x", accepted_per_s=2000.0)
    line = auth_cache_ratio([warm, Result("S3-cold", "relayd", "x", accepted_per_s=10.0)])
    assert line.endswith("= **200x**"), line


def test_dkim_cost_is_the_cpu_difference_over_the_bare_rsa_operation() -> None:
    """The DKIM cost row: (CPU/msg with DKIM - without) / bare RSA, per scenario."""
    from bench.run import Result, bare_rsa_us, dkim_cost

    rsa_us = bare_rsa_us(n=20)
    assert 10 < rsa_us < 100_000
    plain = Result("S1", "relayd", "x", accepted=1000, cpu_s=0.3, bare_rsa_us=250.0)
    signed = Result("S1", "relayd-dkim", "x", accepted=1000, cpu_s=0.6, bare_rsa_us=250.0)
    table = dkim_cost([plain, signed])
    assert table.splitlines()[-1] == "| S1 | 300 | 600 | 250 | 1.20 | - | - |"
    assert dkim_cost([plain]) == ""
    # With the signing child's own CPU: its share per message, and that over the bare op.
    signed.signer_cpu_s = 0.275
    assert dkim_cost([plain, signed]).splitlines()[-1].endswith("| 1.20 | - | 275 (1.10) |")


def test_the_signing_child_is_found_by_its_command_line() -> None:
    """procstat finds a process of the tree by arguments in a row (relayd's signing child
    says ``--role sign``), and not by the same words apart or in another order."""
    import os
    import subprocess
    import sys

    from bench import procstat

    code = "import time; time.sleep(30)"
    signing = subprocess.Popen([sys.executable, "-c", code, "--role", "sign"])
    other = subprocess.Popen([sys.executable, "-c", code, "sign", "--role", "deliver"])
    try:
        found = procstat.tree_pids_running([os.getpid()], ("--role", "sign"))
        # (a relayd another test left running may add its own signing child)
        assert signing.pid in found and other.pid not in found
    finally:
        for p in (signing, other):
            p.kill()
            p.wait()


def test_rounds_give_paired_ratios_and_dkim_costs() -> None:
    """With repeated rounds each round's relayd/Postfix ratio and DKIM cost are noted,
    with their medians: two runs of one round are a minute apart, medians are not."""
    from bench.run import Result, dkim_cost, note_round_ratios, pick_median

    def run(system: str, e2e: float, cpu_s: float) -> Result:
        return Result("S1", system, "x", accepted=1000, accepted_per_s=e2e, e2e_per_s=e2e,
                      cpu_s=cpu_s, bare_rsa_us=250.0)

    by = {"relayd": [run("relayd", x, 0.3) for x in (3000.0, 3300.0, 3600.0)],
          "relayd-dkim": [run("relayd-dkim", 2000.0, c) for c in (0.6, 0.55, 0.65)],
          "postfix": [run("postfix", x, 1.0) for x in (1000.0, 1500.0, 1000.0)]}
    medians = {n: pick_median(runs) for n, runs in by.items()}
    note_round_ratios(by, medians)
    assert ("end to end relayd/postfix round by round: 2.20, 3.00, 3.60 (median 3.00)"
            in medians["relayd"].problems)
    assert medians["relayd-dkim"].dkim_costs == pytest.approx([1.0, 1.2, 1.4])
    row = dkim_cost(list(medians.values())).splitlines()[-1]
    assert row.endswith("| 1.00, 1.20, 1.40 (1.20) | - |"), row


def test_loadgen_arguments_carry_a_password_that_starts_with_a_dash(tmp_path: Path) -> None:
    """A generated password may start with "-": loadgen must still read it as the value."""
    from bench.loadgen import parse_args
    from bench.run import loadgen_args
    from bench.systems import System

    system = System(tmp_path, Sink.__new__(Sink))
    system.auth_user, system.auth_password = "-user", "-SA_T7HAaI0hX82o"
    sc = Scenario("S3", "smoke", "loadgen", messages=1, sessions=1, size=10, per_conn=1, auth=True)
    a = parse_args(loadgen_args(sc, system, 1, 5.0))
    assert (a.auth_user, a.auth_pass) == ("-user", "-SA_T7HAaI0hX82o")
