"""Run the benchmark scenarios against relayd and its peers in one go.

    python -m bench.run [--scenarios S1,S2,S3,S4,S5] [--messages N] [--quick]
                        [--systems relayd,relayd-dkim,postfix,postfix-dkim,haraka,...]

Every (scenario, system) pair gets a fresh system and a fresh smtp-sink as next
hop, a short warm-up, then the measured load.  Results: a table on stdout, the
raw JSON under bench/out/, and (unless --no-record) an entry appended to
bench/RESULTS.md.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import haraka, opendkim, procstat
from bench import postfix as pf
from bench.sink import Sink
from bench.systems import (
    REPO,
    HarakaRelay,
    HarakaRelay2,
    PostfixDkim,
    PostfixRelay,
    SinkCeiling,
    StockAiosmtpd,
    System,
    make_base,
)

BENCH = Path(__file__).resolve().parent
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
RCPT = "rcpt@dest.example"


@dataclass
class Scenario:
    key: str
    title: str
    tool: str                # smtp-source | loadgen | idle
    messages: int = 0
    sessions: int = 50
    size: int = 1024
    per_conn: int = 1        # loadgen; smtp-source: 1 unless reuse
    reuse: bool = False      # smtp-source -d
    auth: bool = False
    cold: bool = False       # a fresh account per connection: argon2 on every login
    idle: int = 0
    hold: float = 0.0

    def describe(self) -> str:
        if self.tool == "smtp-source":
            return (f"smtp-source -s {self.sessions} -m {self.messages} -l {self.size}"
                    + (" -d" if self.reuse else ""))
        if self.tool == "loadgen":
            return (f"loadgen --sessions {self.sessions} --messages {self.messages} "
                    f"--per-conn {self.per_conn} --size {self.size}"
                    + (" AUTH PLAIN" if self.auth else "")
                    + (", a fresh account per connection" if self.cold else ""))
        return f"loadgen --idle {self.idle} --hold {self.hold:g}"


def scenarios(a: argparse.Namespace) -> list[Scenario]:
    m = a.messages
    q = a.quick
    s4_1k = max(m // 4, 50)
    s4_100k = max(m // 20, 20)
    s4_10m = 3 if q else a.big_messages
    out = {
        "S1": [Scenario("S1", "one connection per message", "smtp-source", m, a.sessions, 1024)],
        "S2": [Scenario("S2", "connections reused", "smtp-source", m, a.sessions, 1024,
                        reuse=True)],
        "S3": [Scenario("S3", "AUTH PLAIN on every connection", "loadgen", m, a.sessions, 1024,
                        per_conn=a.s3_per_conn, auth=True),
               Scenario("S3-cold", "AUTH PLAIN, a fresh account on every connection (argon2 on "
                        "every login; relayd only)", "loadgen", 10 if q else a.cold_logins,
                        a.sessions, 1024, per_conn=1, auth=True, cold=True)],
        "S4": [
            Scenario("S4-1k", "1 KB messages, reused connections", "loadgen", s4_1k, 10, 1024,
                     per_conn=50),
            Scenario("S4-100k", "100 KB messages, reused connections", "loadgen", s4_100k, 10,
                     100 * 1024, per_conn=50),
            Scenario("S4-10m", "10 MB messages, reused connections", "loadgen", s4_10m,
                     min(5, s4_10m), 10 * 1024 * 1024, per_conn=10),
        ],
        "S5": [Scenario("S5", "idle connections (memory)", "idle", idle=a.idle, hold=a.hold)],
    }
    chosen: list[Scenario] = []
    for k in a.scenarios.split(","):
        k = k.strip().upper()
        if k in out:
            chosen.extend(out[k])
        else:
            matches = [s for group in out.values() for s in group if s.key.upper() == k]
            if not matches:
                raise SystemExit(f"unknown scenario {k!r}")
            chosen.extend(matches)
    return chosen


SYSTEMS: dict[str, type[System]] = {
    "postfix": PostfixRelay,
    "postfix-dkim": PostfixDkim,
    "haraka": HarakaRelay,
    "haraka-2": HarakaRelay2,
    "stock-aiosmtpd": StockAiosmtpd,
    "smtp-sink": SinkCeiling,
}
try:
    from bench.relayd_peer import RelaydCluster, RelaydDkim, RelaydRelay, relayd_available

    if relayd_available():
        SYSTEMS = {"relayd": RelaydRelay, "relayd-dkim": RelaydDkim,
                   "relayd-cluster": RelaydCluster, **SYSTEMS}
except ImportError:  # pragma: no cover - relayd_peer is part of bench/
    relayd_available = None  # type: ignore[assignment]

#: Systems measured only when named in --systems (they need more than the standard set:
#: relayd-cluster starts a PostgreSQL server of its own).
OPT_IN = ("relayd-cluster",)


def installed(name: str) -> bool:
    """Whether the software behind a system is on this machine (make bench installs it)."""
    if name in ("postfix", "postfix-dkim") and not pf.available():
        return False
    if name == "postfix-dkim" and not opendkim.available():
        return False
    return not (name.startswith("haraka") and not haraka.available())


@dataclass
class Result:
    scenario: str
    system: str
    load: str
    messages: int = 0
    accepted: int = 0
    failed: int = 0
    delivered: int | None = None
    load_s: float | None = None
    e2e_s: float | None = None
    accepted_per_s: float | None = None
    e2e_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss: int = 0
    peak_pss: int = 0
    base_rss: int = 0
    peak_procs: int = 0
    cpu_s: float | None = None
    cpu_per_1k: float | None = None
    idle_open: int | None = None
    idle_alive: int | None = None
    kib_per_conn: float | None = None
    kib_per_conn_pss: float | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    tool: dict[str, Any] = field(default_factory=dict)
    bare_rsa_us: float | None = None  # the bare RSA-2048 operation, timed around this run
    signer_cpu_s: float | None = None  # relayd-dkim: CPU of its signing child during the run
    dkim_costs: list[float] = field(default_factory=list)  # relayd-dkim: per round (sorted)


# -- load tools -------------------------------------------------------------------

def run_smtp_source(sc: Scenario, system: System, messages: int, timeout: float) -> dict[str, Any]:
    cmd = [SMTP_SOURCE, "-c", "-s", str(sc.sessions), "-m", str(messages), "-l", str(sc.size),
           "-f", system.mail_from, "-t", RCPT, "-M", "loadgen.bench.local"]
    if sc.reuse:
        cmd.append("-d")
    cmd.append(system.target)
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -1, e.stdout or b"", (e.stderr or b"") + b"\n(timeout)"
    elapsed = time.monotonic() - t0
    counts = [int(x) for x in re.findall(rb"(\d+)", out.split(b"\r")[-2] if b"\r" in out else b"")]
    done = counts[-1] if counts else 0
    # -c counts completed DATA commands; exit 0 means every message got a 2xx
    accepted = messages if rc == 0 else done
    return {"accepted": accepted, "failed": messages - accepted, "elapsed_s": elapsed, "rc": rc,
            "stderr": err.decode("utf-8", "replace").strip()[-500:], "cmd": shlex.join(cmd)}


def loadgen_args(sc: Scenario, system: System, messages: int, timeout: float) -> list[str]:
    """The load generator's arguments for one scenario against one system."""
    cmd = ["--target", system.target,
           "--from", system.mail_from, "--to", RCPT, "--timeout", str(timeout)]
    if sc.tool == "idle":
        cmd += ["--idle", str(sc.idle), "--hold", str(sc.hold)]
    else:
        cmd += ["--sessions", str(min(sc.sessions, max(messages, 1))), "--messages", str(messages),
                "--per-conn", str(sc.per_conn), "--size", str(sc.size)]
    if sc.cold and system.auth_file is not None:
        cmd += ["--auth-file", str(system.auth_file)]
    elif sc.auth and system.auth_user is not None:
        # "=" joins each value to its flag: a generated password may start with "-"
        cmd += [f"--auth-user={system.auth_user}", f"--auth-pass={system.auth_password or ''}"]
    return cmd


def run_loadgen(sc: Scenario, system: System, messages: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.loadgen", *loadgen_args(sc, system, messages, timeout)]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL,
                           timeout=timeout + 60, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"accepted": 0, "failed": messages, "elapsed_s": time.monotonic() - t0,
                "error": "loadgen timed out", "cmd": shlex.join(cmd)}
    try:
        res: dict[str, Any] = json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"accepted": 0, "failed": messages, "elapsed_s": time.monotonic() - t0,
                "error": f"loadgen rc={p.returncode}: {p.stderr.decode()[-500:]}",
                "cmd": shlex.join(cmd)}
    res["cmd"] = shlex.join(cmd)
    return res


def run_tool(sc: Scenario, system: System, messages: int, timeout: float) -> dict[str, Any]:
    if sc.tool == "smtp-source":
        return run_smtp_source(sc, system, messages, timeout)
    return run_loadgen(sc, system, messages, timeout)


# -- one measurement ----------------------------------------------------------------

def wait_delivered(system: System, sink: Sink, target: int, a: argparse.Namespace) -> None:
    sink.wait_for(target, timeout=a.e2e_timeout, stall=a.stall)


def measure(sc: Scenario, sysname: str, base: Path, a: argparse.Namespace) -> Result:
    res = Result(sc.key, sysname, sc.describe(), messages=sc.messages)
    workdir = base / f"{sc.key}-{sysname}"
    workdir.mkdir(parents=True)
    for d in (workdir, *workdir.parents):
        if d == base.parent or d == Path("/"):
            break
        d.chmod(0o755)  # the postfix user must traverse every level
    with Sink() as sink:
        system = SYSTEMS[sysname](workdir, sink)
        try:
            system.start()
        except Exception as e:
            res.error = f"start failed: {e}"
            with contextlib.suppress(Exception):
                system.stop()
            return res
        try:
            _measure_running(sc, system, sink, res, a)
        except Exception as e:
            res.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            res.problems = system.problems() + system.notes
            system.stop()
    return res


def _measure_running(sc: Scenario, system: System, sink: Sink, res: Result,
                     a: argparse.Namespace) -> None:
    if sc.tool == "idle":
        with procstat.TreeSampler(system.roots, interval=0.5) as smp:
            res.base_rss = smp.first_rss
            out = run_loadgen(sc, system, 0, timeout=a.tool_timeout)
        res.tool = out
        base_pss = smp.first_pss
        res.idle_open = out.get("opened")
        res.idle_alive = out.get("alive_after_hold")
        res.peak_rss, res.peak_pss, res.peak_procs = smp.peak_rss, smp.peak_pss, smp.peak_procs
        if res.idle_open:
            res.kib_per_conn = round((smp.peak_rss - res.base_rss) / 1024 / res.idle_open, 1)
            res.kib_per_conn_pss = round((smp.peak_pss - base_pss) / 1024 / res.idle_open, 1)
        if out.get("error"):
            res.error = out["error"]
        return

    if sc.cold:  # made before the clock starts; no warm-up, which would use them up
        path = system.base / "accounts.tsv"
        path.write_text("".join(f"{u}\t{p}\n" for u, p in system.fresh_accounts(sc.messages)))
        system.auth_file = path
    # warm-up: same shape, a few messages, and wait until they are relayed
    warm = 0 if sc.cold else min(a.warmup, max(sc.messages // 10, 1))
    if warm:
        w = run_tool(sc, system, warm, timeout=a.tool_timeout)
        if system.relays:
            wait_delivered(system, sink, w["accepted"], a)
    s0 = sink.mesg
    cpu0 = procstat.tree_cpu_seconds(system.roots())
    signers = procstat.tree_pids_running(system.roots(), SIGNING_CHILD)
    sign0 = sum(procstat.cpu_seconds(p, with_children=False) for p in signers)
    with procstat.TreeSampler(system.roots, interval=0.25) as smp:
        res.base_rss = smp.first_rss
        t0 = time.monotonic()
        out = run_tool(sc, system, sc.messages, timeout=a.tool_timeout)
        t1 = time.monotonic()
        res.tool = out
        res.accepted = int(out.get("accepted", 0))
        res.failed = int(out.get("failed", sc.messages - res.accepted))
        # the tool's own clock for accept throughput (excludes process start-up)
        res.load_s = float(out.get("elapsed_s") or (t1 - t0))
        if res.accepted:
            res.accepted_per_s = round(res.accepted / res.load_s, 1)
        lat = out.get("latency_ms") or {}
        res.p50_ms, res.p99_ms = lat.get("p50"), lat.get("p99")
        if system.relays:
            wait_delivered(system, sink, s0 + res.accepted, a)
            delivered, last_ts = sink.snapshot()
            res.delivered = delivered - s0
            if res.delivered and last_ts is not None:
                # both clocks are CLOCK_MONOTONIC; loadgen reports when its load began
                t_start = float(out.get("t0_mono") or t0)
                res.e2e_s = round(max(last_ts - t_start, res.load_s), 3)
                res.e2e_per_s = round(res.delivered / res.e2e_s, 1)
            backlog = system.backlog()
            if res.delivered < res.accepted:
                system.notes.append(
                    f"only {res.delivered} of {res.accepted} accepted messages reached the sink"
                    + (f" ({backlog} still queued)" if backlog is not None else ""))
        cpu1 = procstat.tree_cpu_seconds(system.roots())
        if signers and signers == procstat.tree_pids_running(system.roots(), SIGNING_CHILD):
            res.signer_cpu_s = round(
                sum(procstat.cpu_seconds(p, with_children=False) for p in signers) - sign0, 2)
    res.peak_rss, res.peak_pss, res.peak_procs = smp.peak_rss, smp.peak_pss, smp.peak_procs
    res.cpu_s = round(cpu1 - cpu0, 2)
    if res.accepted:
        res.cpu_per_1k = round(res.cpu_s / res.accepted * 1000, 3)
    if out.get("rc") not in (None, 0):
        system.notes.append(f"smtp-source rc={out['rc']}: {out.get('stderr', '')[:300]}")
    if out.get("error"):
        res.error = out["error"]
    if out.get("first_error"):
        system.notes.append(
            f"loadgen errors {out.get('errors')}: first: {out['first_error'][:300]}")


def pick_median(runs: list[Result]) -> Result:
    """The run with the median accepted msg/s (or peak RSS for S5); notes the spread."""
    if len(runs) == 1:
        return runs[0]
    ok = [r for r in runs if not r.error] or runs
    idle = ok[0].idle_open is not None
    ok.sort(key=lambda r: (r.peak_rss if idle else (r.accepted_per_s or 0.0)))
    med = ok[(len(ok) - 1) // 2]
    if idle:
        vals = [f"{r.peak_rss / 1048576:.1f}" for r in ok]
        med.problems.append(f"median of {len(runs)} runs; peak RSS MiB: {', '.join(vals)}")
    else:
        vals = [f"{r.accepted_per_s}" for r in ok]
        e2e = [f"{r.e2e_per_s}" for r in ok if r.e2e_per_s]
        med.problems.append(f"median of {len(runs)} runs; accepted msg/s: {', '.join(vals)}"
                            + (f"; end to end: {', '.join(e2e)}" if e2e else ""))
    return med


def note_round_ratios(by_system: dict[str, list[Result]], medians: dict[str, Result]) -> None:
    """With repeated rounds: relayd's end-to-end rate over Postfix's (and relayd-cluster's
    rates over relayd's), round by round.

    Each ratio compares two runs a minute apart; their median is steadier than
    the ratio of two medians picked from different minutes.
    """
    ours, signed = by_system.get("relayd"), by_system.get("relayd-dkim")
    if ours and signed and len(ours) == len(signed) and "relayd-dkim" in medians:
        medians["relayd-dkim"].dkim_costs = sorted(
            c for c in (_dkim_cost(a, b) for a, b in zip(ours, signed, strict=True))
            if c is not None)
    _note_cluster_rounds(ours, by_system.get("relayd-cluster"), medians)
    for subject, peers, _targets in VERSUS:
        _note_versus_rounds(subject, peers, by_system, medians)


def _note_versus_rounds(subject: str, peers: tuple[str, ...],
                        by_system: dict[str, list[Result]], medians: dict[str, Result]) -> None:
    """End to end, ``subject`` over the best of ``peers`` in the same round, round by round."""
    ours = by_system.get(subject)
    theirs = [by_system.get(p) or [] for p in peers]
    if not ours or len(ours) < 2 or any(len(t) != len(ours) for t in theirs):
        return
    ratios = []
    for i, a in enumerate(ours):
        b = _best([t[i] for t in theirs])
        if a.e2e_per_s and not a.error and b is not None and b.e2e_per_s:
            ratios.append(a.e2e_per_s / b.e2e_per_s)
    if ratios:
        ratios.sort()
        medians[subject].problems.append(
            f"end to end {_versus_label(subject, peers)} round by round: "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f" (median {ratios[(len(ratios) - 1) // 2]:.2f})")


def _note_cluster_rounds(ours: list[Result] | None, cluster: list[Result] | None,
                         medians: dict[str, Result]) -> None:
    """With repeated rounds: relayd-cluster's rates over relayd's, round by round."""
    if not ours or not cluster or len(ours) < 2 or len(ours) != len(cluster):
        return
    for label, attr in (("accepted", "accepted_per_s"), ("end to end", "e2e_per_s")):
        got = sorted(getattr(c, attr) / getattr(o, attr)
                     for o, c in zip(ours, cluster, strict=True)
                     if getattr(o, attr) and getattr(c, attr) and not o.error and not c.error)
        if got:
            medians["relayd-cluster"].problems.append(
                f"{label} relayd-cluster/relayd round by round: "
                + ", ".join(f"{x:.3f}" for x in got)
                + f" (median {got[(len(got) - 1) // 2]:.3f})")


# -- reporting ------------------------------------------------------------------------

def _mib(b: int) -> str:
    return f"{b / 1048576:.1f}" if b else "-"


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(results: list[Result]) -> str:
    head = ("| scenario | system | accepted msg/s | end-to-end msg/s | p50 ms | p99 ms "
            "| peak RSS MiB | peak PSS MiB | procs | CPU s/1k msg | accepted/delivered/failed |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        if r.error and not r.accepted and r.idle_open is None:
            lines.append(f"| {r.scenario} | {r.system} | ERROR: {r.error[:120]} |" + " |" * 9)
            continue
        if r.idle_open is not None:
            counts = (f"{r.idle_open} open, {r.idle_alive} alive; KiB/conn: "
                      f"{_f(r.kib_per_conn)} RSS, {_f(r.kib_per_conn_pss)} PSS")
        else:
            counts = f"{r.accepted}/{'-' if r.delivered is None else r.delivered}/{r.failed}"
        lines.append(
            f"| {r.scenario} | {r.system} | {_f(r.accepted_per_s)} | {_f(r.e2e_per_s)} "
            f"| {_f(r.p50_ms, 2)} | {_f(r.p99_ms, 2)} | {_mib(r.peak_rss)} | {_mib(r.peak_pss)} "
            f"| {r.peak_procs} | {_f(r.cpu_per_1k, 2)} | {counts} |")
    return "\n".join(lines)


RATIO_METRICS = [
    ("accepted msg/s", "accepted_per_s"),
    ("e2e msg/s", "e2e_per_s"),
    ("p99 ms", "p99_ms"),
    ("peak RSS", "peak_rss"),
    ("peak PSS", "peak_pss"),
    ("CPU s/1k", "cpu_per_1k"),
]
PEERS = ["postfix", "postfix-dkim", "haraka", "haraka-2", "stock-aiosmtpd", "smtp-sink"]

#: The headline comparisons (issue 18): subject, the peers it is measured against (the
#: best of them per scenario, or per round), and the target by scenario (None: recorded).
VERSUS: list[tuple[str, tuple[str, ...], dict[str, float | None]]] = [
    ("relayd", ("postfix",), {"S1": 4.0, "S2": 6.0}),
    ("relayd", ("haraka", "haraka-2"), {"S1": 3.0, "S2": 3.0}),
    ("relayd-dkim", ("postfix-dkim",), {"S1": 4.0, "S2": 4.0}),
    ("relayd", ("smtp-sink",), {"S1": None}),
]


def _best(runs: list[Result | None]) -> Result | None:
    """The run with the highest end-to-end rate among ``runs`` (errored ones left out)."""
    ok = [r for r in runs if r is not None and not r.error and r.e2e_per_s]
    return max(ok, key=lambda r: r.e2e_per_s or 0.0) if ok else None


def _versus_label(subject: str, peers: tuple[str, ...]) -> str:
    if len(peers) == 1:
        return f"{subject}/{peers[0]}"
    return f"{subject}/{peers[0]} (best of {', '.join(peers)})"


def versus(results: list[Result]) -> str:
    """End-to-end msg/s of relayd over each peer it is compared with, per scenario, the
    target beside it; for Haraka the better of its two configurations in that scenario."""
    by = {(r.scenario, r.system): r for r in results}
    lines = ["| scenario | ratio (end to end) | relayd msg/s | peer msg/s | ratio | target |",
             "|---|---|---|---|---|---|"]
    for s in dict.fromkeys(r.scenario for r in results):
        for subject, peers, targets in VERSUS:
            me, other = by.get((s, subject)), _best([by.get((s, p)) for p in peers])
            if me is None or me.error or not me.e2e_per_s or other is None:
                continue
            assert other.e2e_per_s
            target = targets.get(s, "-")
            goal = "record" if target is None else (f">= {target:g}x" if target != "-" else "-")
            peer = other.system if len(peers) > 1 else ""
            lines.append(f"| {s} | {_versus_label(subject, peers)} | {me.e2e_per_s:.0f} "
                         f"| {other.e2e_per_s:.0f}{f' ({peer})' if peer else ''} "
                         f"| {me.e2e_per_s / other.e2e_per_s:.2f} | {goal} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def ratios(results: list[Result], subject: str) -> str:
    """subject/peer for every scenario where both were measured."""
    by = {(r.scenario, r.system): r for r in results}
    lines = ["| scenario | ratio | " + " | ".join(label for label, _ in RATIO_METRICS) + " |",
             "|" + "---|" * (len(RATIO_METRICS) + 2)]
    rows = 0
    for s in dict.fromkeys(r.scenario for r in results):
        me = by.get((s, subject))
        if me is None or me.error:
            continue
        for p in PEERS:
            other = by.get((s, p))
            if other is None or other.error:
                continue
            cells = []
            for _label, attr in RATIO_METRICS:
                x, y = getattr(me, attr), getattr(other, attr)
                cells.append(f"{x / y:.2f}" if x and y else "-")
            lines.append(f"| {s} | {subject}/{p} | " + " | ".join(cells) + " |")
            rows += 1
    return "\n".join(lines) if rows else ""


def bare_rsa_us(n: int = 300) -> float:
    """The median CPU time of one bare RSA-2048 PKCS#1 v1.5 signature of a SHA-256 digest, in
    us (what the DKIM target is measured against), timed now: this machine's speed drifts.

    CPU time, like the runs' figures, so a process that takes the core away while it is
    timed (the previous run's tools still exiting) does not inflate it."""
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    key = _rsa_key()
    digest = hashlib.sha256(b"x" * 1024).digest()
    pad, pre = padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
    times = []
    for _ in range(n):
        t = time.process_time()
        key.sign(digest, pad, pre)
        times.append(time.process_time() - t)
    times.sort()
    return times[n // 2] * 1e6


@functools.lru_cache(maxsize=1)
def _rsa_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


#: The command-line arguments that mark relayd's signing child (relayd.delivery.agent_child).
SIGNING_CHILD = ("--role", "sign")

#: Message size up to which the DKIM cost table reports a scenario.
DKIM_COST_MAX_SIZE = 4096


def _dkim_cost(plain: Result, signed: Result) -> float | None:
    """(CPU per message with DKIM - without) / the bare RSA operation timed around both."""
    if plain.error or signed.error or not (plain.cpu_s and signed.cpu_s and plain.accepted
                                           and signed.accepted and plain.bare_rsa_us
                                           and signed.bare_rsa_us):
        return None
    without = plain.cpu_s / plain.accepted * 1e6
    with_dkim = signed.cpu_s / signed.accepted * 1e6
    return (with_dkim - without) / ((plain.bare_rsa_us + signed.bare_rsa_us) / 2)


def dkim_cost(results: list[Result]) -> str:
    """Per scenario with relayd and relayd-dkim: the DKIM cost in bare RSA operations.

    With repeated rounds, also each round's cost (the two runs a minute apart) and
    their median, which the machine's drift moves less than the median runs' ratio.
    """
    by = {(r.scenario, r.system): r for r in results}
    lines = ["| scenario | CPU us/msg without | with DKIM | bare RSA us | DKIM cost "
             "| per round (median) | signing child us/msg (x bare) |",
             "|---|---|---|---|---|---|---|"]
    for s in dict.fromkeys(r.scenario for r in results):
        plain, signed = by.get((s, "relayd")), by.get((s, "relayd-dkim"))
        if plain is None or signed is None:
            continue
        cost = _dkim_cost(plain, signed)
        if cost is None:
            continue
        assert plain.cpu_s and signed.cpu_s and plain.bare_rsa_us and signed.bare_rsa_us
        rounds = signed.dkim_costs
        per_round = (", ".join(f"{c:.2f}" for c in rounds)
                     + f" ({rounds[(len(rounds) - 1) // 2]:.2f})") if len(rounds) > 1 else "-"
        bare = (plain.bare_rsa_us + signed.bare_rsa_us) / 2
        child = "-"
        if signed.signer_cpu_s is not None:
            us = signed.signer_cpu_s / signed.accepted * 1e6
            child = f"{us:.0f} ({us / signed.bare_rsa_us:.2f})"
        lines.append(f"| {s} | {plain.cpu_s / plain.accepted * 1e6:.0f} "
                     f"| {signed.cpu_s / signed.accepted * 1e6:.0f} "
                     f"| {bare:.0f} | {cost:.2f} | {per_round} | {child} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def auth_cache_ratio(results: list[Result]) -> str:
    """relayd's logins/s with the credential cache (S3) over argon2 on every login (S3-cold).

    Both scenarios do one AUTH PLAIN and one message per connection, so accepted
    msg/s is logins/s.
    """
    by = {(r.scenario, r.system): r for r in results}
    warm, cold = by.get(("S3", "relayd")), by.get(("S3-cold", "relayd"))
    if not (warm and cold and warm.accepted_per_s and cold.accepted_per_s
            and not warm.error and not cold.error):
        return ""
    return (f"AUTH cache (relayd, S3 / S3-cold; target at least 200x): {warm.accepted_per_s:.1f} "
            f"logins/s with the cache vs {cold.accepted_per_s:.1f} with argon2 on every login = "
            f"**{warm.accepted_per_s / cold.accepted_per_s:.0f}x**")


def cluster_cost(results: list[Result]) -> str:
    """Per scenario with relayd and relayd-cluster: throughput and CPU of cluster mode
    against SQLite (PostgreSQL's processes count in relayd-cluster's CPU)."""
    by = {(r.scenario, r.system): r for r in results}
    lines = ["| scenario | accepted msg/s sqlite / cluster | change | end-to-end msg/s "
             "sqlite / cluster | change | CPU us/msg sqlite / cluster |",
             "|---|---|---|---|---|---|"]
    for s in dict.fromkeys(r.scenario for r in results):
        lite, clu = by.get((s, "relayd")), by.get((s, "relayd-cluster"))
        if lite is None or clu is None or lite.error or clu.error:
            continue

        def pair(x: float | None, y: float | None) -> tuple[str, str]:
            if not x or not y:
                return "-", "-"
            return f"{x:.0f} / {y:.0f}", f"{(y / x - 1) * 100:+.1f} %"

        acc, acc_change = pair(lite.accepted_per_s, clu.accepted_per_s)
        e2e, e2e_change = pair(lite.e2e_per_s, clu.e2e_per_s)
        cpu = "-"
        if lite.cpu_s and clu.cpu_s and lite.accepted and clu.accepted:
            cpu = (f"{lite.cpu_s / lite.accepted * 1e6:.0f} / "
                   f"{clu.cpu_s / clu.accepted * 1e6:.0f}")
        lines.append(f"| {s} | {acc} | {acc_change} | {e2e} | {e2e_change} | {cpu} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "relayd", "control", "bench",
                                "config"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def record(results: list[Result], a: argparse.Namespace, argv: list[str], started: dt.datetime,
           loadavg: str, wall: float) -> str:
    m = procstat.machine_info()
    lines = [
        f"## {started.strftime('%Y-%m-%d %H:%M UTC')} — commit {git_commit()}",
        "",
        f"- machine: nproc {m['nproc']}, {m['cpu']}, {m['ram']} RAM, kernel {m['kernel']}",
        f"- load average before the run: {loadavg}",
        f"- command: `{shlex.join(['python', '-m', 'bench.run', *argv])}` (wall {wall:.0f} s)",
        f"- systems: {', '.join(a.systems_list)}",
        "",
        table(results),
        "",
    ]
    # Only where a message is small: for 100 KB or 10 MB the body hash, not the
    # signature, is the cost, and a ratio to the RSA operation says nothing.
    small = {sc.key for sc in scenarios(a) if sc.size <= DKIM_COST_MAX_SIZE and not sc.cold}
    cost = dkim_cost([r for r in results if r.scenario in small])
    if cost:
        lines += ["DKIM cost, for information: CPU per message with DKIM minus without, over "
                  "the bare RSA-2048 signature timed around the same two runs (scenarios "
                  f"with messages up to {DKIM_COST_MAX_SIZE // 1024} KiB):", "", cost, ""]
    cost = cluster_cost(results)
    if cost:
        lines += ["Cluster mode on the hot path: relayd-cluster (one node, directory on a durable "
                  "PostgreSQL) against relayd on SQLite, same run (target: at most 5 % slower):",
                  "", cost, ""]
    vs = versus(results)
    if vs:
        lines += ["relayd against the relays users pick (issue 18), end-to-end msg/s, this run:",
                  "", vs, ""]
    auth = auth_cache_ratio(results)
    if auth:
        lines += [auth, ""]
    subj = [s for s in ("relayd", "relayd-dkim") if s in a.systems_list]
    for s in subj:
        rt = ratios(results, s)
        if rt:
            lines += [f"Ratios {s}/peer (throughput: higher is better; "
                      "p99, RSS, CPU: lower is better):", "", rt, ""]
    notes = [f"- {r.scenario} {r.system}: {p}" for r in results for p in r.problems]
    notes += [f"- {r.scenario} {r.system}: ERROR {r.error}" for r in results if r.error]
    if notes:
        lines += ["Notes:", "", *notes[:60], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="S1,S2,S3,S4,S5")
    ap.add_argument("--systems", default=None,
                    help="comma list; default: every available one of " + ",".join(
                        n for n in SYSTEMS if n not in OPT_IN) + "; relayd-cluster only when named")
    ap.add_argument("--messages", type=int, default=20000, help="messages in S1-S3 (S4 derives)")
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--s3-per-conn", type=int, default=1, help="S3: messages per AUTH'd connection")
    ap.add_argument("--cold-logins", type=int, default=200,
                    help="S3-cold: logins (one fresh account each), argon2 on every one")
    ap.add_argument("--big-messages", type=int, default=20, help="S4-10m: number of 10 MB messages")
    ap.add_argument("--idle", type=int, default=1000, help="S5: idle connections")
    ap.add_argument("--hold", type=float, default=10.0, help="S5: seconds to hold them")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up messages (at most 10%%)")
    ap.add_argument("--tool-timeout", type=float, default=600.0)
    ap.add_argument("--e2e-timeout", type=float, default=300.0)
    ap.add_argument("--stall", type=float, default=60.0,
                    help="give up waiting for the sink after this long without progress")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure every pair N times and report the median run (by accepted msg/s)")
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work dir (configs, logs, Postfix maillog) for inspection")
    ap.add_argument("--results", default=str(BENCH / "RESULTS.md"))
    a = ap.parse_args(argv)
    if a.quick:
        if "--messages" not in " ".join(argv):
            a.messages = 300
        a.idle = min(a.idle, 100)
        a.hold = min(a.hold, 2.0)
        a.warmup = 20
        a.e2e_timeout = min(a.e2e_timeout, 60)
        a.stall = min(a.stall, 20)
    names = a.systems.split(",") if a.systems else [n for n in SYSTEMS if n not in OPT_IN]
    if not a.systems:
        for n in [n for n in names if not installed(n)]:
            print(f"bench: {n} left out: not installed (make bench installs it)", flush=True)
            names.remove(n)
    for n in names:
        if n not in SYSTEMS:
            raise SystemExit(f"unknown or unavailable system {n!r}; "
                             f"available: {', '.join(SYSTEMS)}")
    a.systems_list = names
    scs = scenarios(a)
    base = make_base()
    started = dt.datetime.now(dt.UTC)
    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    print(f"bench: {len(scs)} scenario(s) x {len(names)} system(s), work dir {base}", flush=True)
    results: list[Result] = []
    all_runs: list[Result] = []
    t_start = time.monotonic()
    for sc in scs:
        # Rounds of every system in turn, so the machine's drift (up to 25 % from one
        # minute to the next here) falls on every system alike, not on one block of runs.
        by_system: dict[str, list[Result]] = {n: [] for n in names}
        for i in range(a.repeat):
            for n in names:
                if sc.cold and not SYSTEMS[n].cold_auth:
                    continue
                runs = by_system[n]
                t = time.monotonic()
                rep = f" (run {i + 1}/{a.repeat})" if a.repeat > 1 else ""
                print(f"bench: {sc.key} {n}{rep}: {sc.describe()} ...", end=" ", flush=True)
                probe = n in ("relayd", "relayd-dkim") and "relayd-dkim" in names
                before = bare_rsa_us() if probe else None
                r = measure(sc, n, base / f"run{i}", a)
                if before is not None:
                    r.bare_rsa_us = round((before + bare_rsa_us()) / 2, 1)
                runs.append(r)
                print(f"{time.monotonic() - t:.1f}s accepted={r.accepted} delivered={r.delivered} "
                      f"acc/s={r.accepted_per_s} e2e/s={r.e2e_per_s}"
                      + (f" ERROR {r.error}" if r.error else ""), flush=True)
        medians = {n: pick_median(runs) for n, runs in by_system.items() if runs}
        note_round_ratios(by_system, medians)
        results.extend(medians.values())
        for runs in by_system.values():
            all_runs.extend(runs)
    wall = time.monotonic() - t_start
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (out_dir / f"{stamp}.json").write_text(json.dumps(
        {"started": started.isoformat(), "argv": argv, "machine": procstat.machine_info(),
         "commit": git_commit(), "results": [asdict(r) for r in results],
         "all_runs": [asdict(r) for r in all_runs]}, indent=1))
    text = record(results, a, argv, started, loadavg, wall)
    print()
    print(text)
    if not a.no_record:
        path = Path(a.results)
        if not path.exists():
            path.write_text("# relayd benchmark results\n\nAppended by `python -m bench.run`; "
                            "see bench/README.md for what the figures mean.\n\n")
        with open(path, "a") as f:
            f.write(text + "\n")
    if a.keep:
        print(f"bench: work dir kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    bad = [r for r in results if r.error or (r.failed and r.idle_open is None)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
