"""Smoke tests of the cluster benchmarks: real relayd processes on a real PostgreSQL.

- ``python -m bench.invalidation`` runs (2 nodes, 3 rounds), checks every answer's
  acknowledgements, and writes a record that says what it measured;
- the ``relayd-cluster`` system starts (its own PostgreSQL), relays one message, and
  stops everything it started.
- ``bench.invalidation_phases`` splits a call at the right announcements, and the
  record's cluster table and round ratios compute what they say.

PostgreSQL (scripts/install-debs.sh) and smtp-sink are needed; missing, the tests fail.

    pytest bench/test_cluster_smoke.py
"""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import procstat
from bench.relayd_peer import DOMAIN, RelaydCluster
from bench.sink import Sink
from bench.systems import REPO, make_base
from tests.tools import require_tool


@pytest.fixture
def base() -> Iterator[Path]:
    d = make_base("relayd-bench-clsmoke-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_invalidation_runs_checks_acknowledgements_and_records(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    p = subprocess.run([sys.executable, "-m", "bench.invalidation", "--nodes", "2",
                        "--rounds", "3", "--results", str(results)],
                       cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["nodes"] == ["a", "b"] and summary["rounds"] == 3
    assert summary["all_acknowledged"] is True
    for call in ("disable_ms", "enable_ms"):
        ms = summary[call]
        assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["max"], ms
    # node a waited for acknowledgements on every timed call: 3 disables + 3 enables
    assert summary["ack_calls"] == 6 and summary["ack_wait_mean_ms"] > 0
    text = results.read_text()
    assert "acknowledged invalidation" in text
    assert "`python -m bench.invalidation --nodes 2 --rounds 3 --results" in text
    assert f"| user disable | 3 | {summary['disable_ms']['p50']} |" in text


def test_cluster_system_relays_a_message_and_stops_its_server(base: Path) -> None:
    require_tool("smtp-sink")
    with Sink() as sink:
        system = RelaydCluster(base, sink)
        system.start()
        try:
            pg = system.pg
            assert len(system.roots()) == 2  # relayd and PostgreSQL's postmaster
            postmaster = system.roots()[1]
            with smtplib.SMTP("127.0.0.1", system.port, timeout=20) as smtp:
                refused = smtp.sendmail(system.mail_from, ["rcpt@example.org"],
                                        f"From: {system.mail_from}\r\nSubject: smoke\r\n\r\n"
                                        "one message\r\n")
            assert refused == {}
            assert sink.wait_for(1, timeout=20) and sink.mesg == 1
        finally:
            system.stop()
    assert system.mail_from.endswith("@" + DOMAIN)
    assert not pg.running and pg.root is None
    # pg_ctl stop returns once the postmaster removed its pid file, just before it exits
    deadline = time.monotonic() + 5
    while procstat.tree_pids([postmaster]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procstat.tree_pids([postmaster]) == []


def test_phases_split_a_call_at_the_announcements() -> None:
    """invalidation_phases: write up to the change's announcement, apply up to node a's and
    the slowest other node's acknowledgement, tail after the last; None if one is missing."""
    from bench.invalidation_phases import Watcher, phases

    watch = Watcher("postgresql://unused@127.0.0.1:1/x")  # never started
    watch.control[7] = 10.010
    watch.acks.update({("a", 7): 10.025, ("b", 7): 10.030, ("c", 7): 10.040})
    got = phases(watch, 7, ["a", "b", "c"], 10.000, 10.043)
    assert got == pytest.approx({"write": 0.010, "apply a": 0.015, "apply others": 0.030,
                                 "tail": 0.003, "total": 0.043})
    del watch.acks[("c", 7)]
    assert phases(watch, 7, ["a", "b", "c"], 10.000, 10.043) is None


def test_cluster_cost_table_and_round_ratios() -> None:
    """The record's cluster table (relayd-cluster against relayd, same run) and, with
    repeated rounds, the ratios round by round."""
    from bench.run import Result, cluster_cost, note_round_ratios, pick_median

    def run(system: str, accepted_per_s: float, cpu_s: float) -> Result:
        return Result("S1", system, "x", accepted=1000, accepted_per_s=accepted_per_s,
                      e2e_per_s=1900.0, cpu_s=cpu_s)

    lite, clu = run("relayd", 2000.0, 0.5), run("relayd-cluster", 1900.0, 0.55)
    row = cluster_cost([lite, clu]).splitlines()[-1]
    assert row == "| S1 | 2000 / 1900 | -5.0 % | 1900 / 1900 | +0.0 % | 500 / 550 |"
    assert cluster_cost([lite]) == ""
    by = {"relayd": [lite, run("relayd", 1000.0, 0.5)],
          "relayd-cluster": [clu, run("relayd-cluster", 1100.0, 0.5)]}
    medians = {n: pick_median(runs) for n, runs in by.items()}
    note_round_ratios(by, medians)
    assert ("accepted relayd-cluster/relayd round by round: 0.950, 1.100 (median 0.950)"
            in medians["relayd-cluster"].problems)
