"""Smoke tests of the peers of issue 18: Haraka (one and two workers) and Postfix + OpenDKIM.

Each starts the real peer, relays a handful of messages end to end (smtp-source without
AUTH as in S1, the load generator with AUTH PLAIN as in S3) into a real smtp-sink, and
stops it with no process of its tree left.  Haraka comes from scripts/install-haraka.sh,
OpenDKIM and Postfix from scripts/install-debs.sh (``make test`` runs both); missing,
these tests fail.

    pytest bench/test_peers_smoke.py
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import haraka as hk
from bench import opendkim, procstat
from bench import postfix as pf
from bench.run import Result, Scenario, measure, note_round_ratios, pick_median, versus
from bench.sink import Sink
from bench.systems import REPO, HarakaRelay, HarakaRelay2, PostfixDkim, System, make_base
from bench.test_harness_smoke import harness_args
from tests.tools import missing, require_tool


@pytest.fixture
def tools() -> None:
    """smtp-sink and smtp-source (scripts/install-debs.sh), or the test fails."""
    require_tool("smtp-sink")
    require_tool("smtp-source")


@pytest.fixture
def haraka_installed() -> None:
    if not hk.available():
        missing("Haraka", f" ({hk.HARAKA_JS}: sh scripts/install-haraka.sh, run by make test)")


@pytest.fixture
def postfix_dkim_installed() -> None:
    if not pf.available():
        missing("Postfix", f" ({pf.POSTFIX}, {pf.MAIN_CF_DIST} and script(1))")
    if not opendkim.available():
        missing("OpenDKIM", f" ({opendkim.OPENDKIM})")


@pytest.fixture
def base() -> Iterator[Path]:
    d = make_base("relayd-bench-peers-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def smtp_source(target: str, messages: int) -> None:
    """S1's shape: one connection per message, no AUTH (the peers relay for 127.0.0.0/8)."""
    subprocess.run([require_tool("smtp-source"), "-c", "-s", "3", "-m", str(messages),
                    "-l", "1024", "-f", "sender@bench.example", "-t", "rcpt@dest.example",
                    target], check=True, capture_output=True, timeout=60)


def loadgen_auth(system: System, messages: int) -> dict:
    """S3's shape: AUTH PLAIN on every connection."""
    p = subprocess.run([sys.executable, "-m", "bench.loadgen", "--target", system.target,
                        "--timeout", "20", "--sessions", "2", "--messages", str(messages),
                        "--per-conn", "2", "--size", "1024", "--from", "sender@bench.example",
                        "--to", "rcpt@dest.example", f"--auth-user={system.auth_user}",
                        f"--auth-pass={system.auth_password}"],
                       cwd=str(REPO), capture_output=True, timeout=60, check=True)
    return json.loads(p.stdout.decode().strip().splitlines()[-1])


def relay_a_handful(system: System, sink: Sink) -> list[int]:
    """Start ``system``, relay 8 messages S1-style and 6 with AUTH, stop it; its tree's pids."""
    system.start()
    try:
        pids = procstat.tree_pids(system.roots())
        smtp_source(system.target, 8)
        r = loadgen_auth(system, 6)
        assert r["accepted"] == 6 and r["failed"] == 0, r
        assert sink.wait_for(14, timeout=30), sink.mesg
        assert sink.mesg == 14
        assert system.problems() == []
    finally:
        system.stop()
    return pids


@pytest.mark.usefixtures("tools", "haraka_installed")
@pytest.mark.parametrize("cls", [HarakaRelay, HarakaRelay2])
def test_haraka_relays_and_stops(base: Path, cls: type[HarakaRelay]) -> None:
    with Sink() as sink:
        system = cls(base, sink)
        system.start()
        try:
            # the master and one process per worker; the 64 MiB limit as the other peers
            assert len(procstat.tree_pids(system.roots())) == cls.nodes + 1
            with smtplib.SMTP("127.0.0.1", system.port, timeout=10) as s:
                s.ehlo("smoke.bench.local")
                assert s.esmtp_features["size"] == str(64 * 1024 * 1024)
                assert "PLAIN" in s.esmtp_features["auth"]
        finally:
            system.stop()
        pids = relay_a_handful(cls(base / "again", sink), sink)
    assert len(pids) == cls.nodes + 1
    assert procstat.tree_pids(pids) == []


@pytest.mark.usefixtures("tools", "haraka_installed")
def test_haraka_measured_by_the_harness(base: Path) -> None:
    sc = Scenario("S1", "smoke", "smtp-source", messages=30, sessions=3, size=1024)
    r = measure(sc, "haraka", base, harness_args(warmup=0))
    assert r.error is None, (r, r.problems)
    assert r.accepted == 30 and r.delivered == 30, r
    assert r.peak_procs == 2 and r.peak_rss > 0 and r.cpu_per_1k is not None


@pytest.mark.usefixtures("tools", "postfix_dkim_installed")
def test_postfix_dkim_signs_everything_it_relays(base: Path) -> None:
    with Sink(dump_dir=base / "dump") as sink:
        system = PostfixDkim(base / "pfdkim", sink)
        pids = relay_a_handful(system, sink)
        messages = sink.dumped()
    assert len(messages) == 14
    for m in messages:
        head = m.split(b"\n\n", 1)[0].decode()
        sig = re.search(r"^DKIM-Signature:(.*(?:\n[ \t].*)*)", head, re.M)
        assert sig is not None, head
        tags = dict(t.strip().split("=", 1) for t in re.sub(r"\s", "", sig.group(1)).split(";")
                    if t)
        assert (tags["d"], tags["s"], tags["a"], tags["c"]) == (
            "bench.example", "bench", "rsa-sha256", "relaxed/relaxed")
    # OpenDKIM counted in the tree, and gone with everything else (its /run dir too)
    assert system.dkim.proc is not None and system.dkim.proc.pid in pids
    assert procstat.tree_pids(pids) == []
    assert not system.dkim.dir.exists()


@pytest.mark.usefixtures("tools", "postfix_dkim_installed")
def test_postfix_dkim_measured_by_the_harness(base: Path) -> None:
    sc = Scenario("S1", "smoke", "smtp-source", messages=30, sessions=3, size=1024)
    r = measure(sc, "postfix-dkim", base, harness_args(warmup=0))
    assert r.error is None, (r, r.problems)
    assert r.accepted == 30 and r.delivered == 30, r


def test_versus_takes_the_better_haraka_and_shows_the_targets() -> None:
    def res(system: str, e2e: float, scenario: str = "S1") -> Result:
        return Result(scenario, system, "x", accepted=100, e2e_per_s=e2e)

    rows = versus([res("relayd", 3000.0), res("postfix", 750.0), res("haraka", 800.0),
                   res("haraka-2", 1000.0), res("relayd-dkim", 2000.0),
                   res("postfix-dkim", 400.0), res("smtp-sink", 10000.0),
                   res("relayd", 4000.0, "S3"), res("haraka", 1000.0, "S3")]).splitlines()[2:]
    assert rows == [
        "| S1 | relayd/postfix | 3000 | 750 | 4.00 | >= 4x |",
        "| S1 | relayd/haraka (best of haraka, haraka-2) | 3000 | 1000 (haraka-2) | 3.00 | >= 3x |",
        "| S1 | relayd-dkim/postfix-dkim | 2000 | 400 | 5.00 | >= 4x |",
        "| S1 | relayd/smtp-sink | 3000 | 10000 | 0.30 | record |",
        "| S3 | relayd/haraka (best of haraka, haraka-2) | 4000 | 1000 (haraka) | 4.00 | - |",
    ]


def test_rounds_compare_relayd_with_the_better_haraka_of_each_round() -> None:
    def run(system: str, e2e: float) -> Result:
        return Result("S1", system, "x", accepted=1000, accepted_per_s=e2e, e2e_per_s=e2e)

    by = {"relayd": [run("relayd", x) for x in (3000.0, 3300.0)],
          "haraka": [run("haraka", x) for x in (1000.0, 1500.0)],
          "haraka-2": [run("haraka-2", x) for x in (1200.0, 1100.0)]}
    medians = {n: pick_median(runs) for n, runs in by.items()}
    note_round_ratios(by, medians)
    assert ("end to end relayd/haraka (best of haraka, haraka-2) round by round: 2.20, 2.50 "
            "(median 2.20)") in medians["relayd"].problems
