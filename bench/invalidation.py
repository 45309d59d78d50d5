"""Acknowledged invalidation across a cluster: how long ``user disable`` takes to return
once every live node has applied it (docs/SEMANTICS.md §7).

    python -m bench.invalidation [--nodes 3] [--rounds 200] [--no-record]

One throwaway PostgreSQL server (durable: bench/pgcluster.py), N relayd processes in
cluster mode (nodes a, b, c...: own data directory and control socket, SMTP on
127.0.0.1, .2, .3... on a free port), one domain and one account made through node a.
Then ``--rounds`` times: ``POST /v1/users/NAME/disable`` and ``.../enable`` through
node a's control socket (HTTP over the Unix socket, one connection per call, as
relayctl does), each call timed end to end on this side of the socket. Every answer's
``propagation.acknowledged`` must name every node, or the run fails. Node a's
``relayd_cluster_ack_duration_seconds`` (scraped before and after the rounds) says how
much of a call is the wait for the other nodes.

Prints the summary (p50, p90, p99, max in ms) as one JSON line last, and appends a
dated entry to bench/RESULTS.md unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench import procstat
from bench.pgcluster import cluster_settings, durable_server, node_flags
from bench.relayd_peer import DOMAIN, bench_config, dump_toml, relayd_cmd
from bench.systems import REPO, make_base
from bench.util import free_port, stop_process, wait_smtp_ready

BENCH = Path(__file__).resolve().parent
#: The issue's target for the p99 of an acknowledged disable, in ms.
TARGET_P99_MS = 50.0


@dataclass
class Node:
    """One relayd process of the cluster."""

    name: str
    address: str
    base: Path
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    cmd: list[str] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.base / "control.sock"

    @property
    def logpath(self) -> Path:
        return self.base / "relayd.log"

    def launch(self, dsn: str, key_dir: Path) -> None:
        """Write its config and start the process (not waiting for it)."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.address)
        self.metrics_port = free_port()
        cfg = bench_config(self.base, dkim=False)
        cfg.setdefault("cluster", {}).update(cluster_settings(key_dir))
        config = self.base / "relayd.toml"
        config.write_text(dump_toml(cfg))
        self.cmd = [*relayd_cmd(), "--config", str(config),
                    "--listen", f"{self.address}:{self.port}", "--data-dir", str(self.base),
                    "--control-socket", str(self.sock),
                    "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                    *node_flags(dsn, self.name)]
        self.log = open(self.logpath, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=str(REPO), stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until it greets on SMTP and its control socket exists (it has joined)."""
        try:
            wait_smtp_ready(self.address, self.port, timeout=timeout, proc=self.proc)
            deadline = time.monotonic() + timeout
            while not self.sock.exists():
                if (self.proc is not None and self.proc.poll() is not None) \
                        or time.monotonic() > deadline:
                    raise RuntimeError(f"no control socket at {self.sock}")
                time.sleep(0.05)
        except Exception as exc:
            raise RuntimeError(f"node {self.name}: {exc}\n--- {self.logpath} ---\n"
                               f"{self.log_tail()}") from exc

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)
        if self.log is not None:
            self.log.close()


@contextmanager
def cluster(base: Path, nodes: int, durable: bool = True) -> Iterator[tuple[str, list[Node]]]:
    """A PostgreSQL server (durable unless told) and ``nodes`` relayd nodes on it, all
    ready: the DSN and the nodes; everything stopped after.

    Node a starts first (it creates the schema), the others together."""
    names = string.ascii_lowercase[:nodes]
    with ExitStack() as stack:
        pg = durable_server(durable)
        stack.callback(pg.stop)
        dsn = pg.create_database()
        members = [Node(name, f"127.0.0.{i}", base / name)
                   for i, name in enumerate(names, start=1)]
        for node in members:
            stack.callback(node.stop)
        members[0].launch(dsn, base)
        members[0].wait_ready()
        for node in members[1:]:
            node.launch(dsn, base)
        for node in members[1:]:
            node.wait_ready()
        yield dsn, members


def control_call(sock: Path, method: str, path: str, kind: type[Any],
                 body: Any = None) -> Any:
    """One call to a node's control API (control.client: HTTP over the Unix socket)."""
    from control.client import Client

    return Client(str(sock), timeout=60.0).call(method, path, kind, body)


def make_account(sock: Path) -> str:
    """The bench domain and one account on it, through ``sock``; the username."""
    from control import schemas

    control_call(sock, "POST", "/v1/domains", schemas.DomainInfo,
                 schemas.DomainAdd(name=DOMAIN))
    creds = control_call(sock, "POST", "/v1/users", schemas.Credentials,
                         schemas.UserAdd(domain=DOMAIN))
    return str(creds.username)


def timed_change(sock: Path, user: str, action: str, names: list[str]) -> float:
    """One disable or enable; its duration in seconds. Fails unless every node applied it."""
    from control import schemas
    from control.client import Client

    t0 = time.perf_counter()
    info = control_call(sock, "POST", f"/v1/users/{Client.seg(user)}/{action}",
                        schemas.UserInfo)
    took = time.perf_counter() - t0
    want = "disabled" if action == "disable" else "active"
    if info.status != want:
        raise RuntimeError(f"{action}: status {info.status!r}, expected {want!r}")
    acked = sorted(info.propagation.acknowledged) if info.propagation else []
    if acked != sorted(names):
        raise RuntimeError(f"{action}: acknowledged by {acked}, expected every node {names}")
    return took


def ack_histogram(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of a node's relayd_cluster_ack_duration_seconds."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    got = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for part in got:
            if line.startswith(f"relayd_cluster_ack_duration_seconds_{part} "):
                got[part] = float(line.split()[1])
    return got["sum"], got["count"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50, p90, p99 (nearest rank), max and mean, in ms."""
    lat = sorted(seconds)

    def pct(q: float) -> float:
        k = max(0, min(len(lat) - 1, int(q / 100.0 * len(lat) + 0.5) - 1))
        return round(lat[k] * 1000, 2)

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": round(lat[-1] * 1000, 2), "mean": round(sum(lat) / len(lat) * 1000, 2)}


def measure(nodes: int, rounds: int, base: Path) -> dict[str, Any]:
    """The whole run: cluster up, account made, rounds timed; the summary."""
    t_start = time.monotonic()
    with cluster(base, nodes) as (_, members):
        names = [n.name for n in members]
        sock = members[0].sock
        user = make_account(sock)
        timed_change(sock, user, "disable", names)  # warm-up: connections, code paths
        timed_change(sock, user, "enable", names)
        ack0 = ack_histogram(members[0].metrics_port)
        disables, enables = [], []
        for _ in range(rounds):
            disables.append(timed_change(sock, user, "disable", names))
            enables.append(timed_change(sock, user, "enable", names))
        ack1 = ack_histogram(members[0].metrics_port)
    calls = ack1[1] - ack0[1]
    ack_mean = round((ack1[0] - ack0[0]) / calls * 1000, 2) if calls else None
    return {"nodes": names, "rounds": rounds, "disable_ms": percentiles(disables),
            "enable_ms": percentiles(enables), "ack_wait_mean_ms": ack_mean,
            "ack_calls": int(calls), "all_acknowledged": True,
            "wall_s": round(time.monotonic() - t_start, 1)}


def machine_line() -> str:
    """nproc, CPU model and lscpu's topology, RAM, kernel."""
    m = procstat.machine_info()
    extra = []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Thread(s) per core", "L3 cache", "Hypervisor vendor"):
                extra.append(f"{key.strip()} {value.strip()}")
    except (OSError, subprocess.SubprocessError):
        pass
    return (f"nproc {m['nproc']}, {m['cpu']}" + (f" ({', '.join(extra)})" if extra else "")
            + f", {m['ram']} RAM, kernel {m['kernel']}")


def record_text(summary: dict[str, Any], argv: list[str], started: dt.datetime,
                loadavg: str) -> str:
    """The entry appended to bench/RESULTS.md."""
    from bench.run import git_commit

    d, e = summary["disable_ms"], summary["enable_ms"]
    met = "yes" if d["p99"] < TARGET_P99_MS else "**no**"
    return "\n".join([
        f"## {started.strftime('%Y-%m-%d %H:%M UTC')} — acknowledged invalidation, commit "
        f"{git_commit()}",
        "",
        f"- machine: {machine_line()}",
        f"- load average before the run: {loadavg}",
        f"- command: `{shlex.join(['python', '-m', 'bench.invalidation', *argv])}` "
        f"(wall {summary['wall_s']:.0f} s)",
        f"- {len(summary['nodes'])} nodes ({', '.join(summary['nodes'])}), one durable "
        "PostgreSQL; calls through node a's control socket; every answer acknowledged by "
        "every node",
        "",
        "| call | rounds | p50 ms | p90 ms | p99 ms | max ms | mean ms |",
        "|---|---|---|---|---|---|---|",
        f"| user disable | {summary['rounds']} | {d['p50']} | {d['p90']} | {d['p99']} "
        f"| {d['max']} | {d['mean']} |",
        f"| user enable | {summary['rounds']} | {e['p50']} | {e['p90']} | {e['p99']} "
        f"| {e['max']} | {e['mean']} |",
        "",
        f"Target p99 of disable under {TARGET_P99_MS:.0f} ms: {met}. Node a's wait for the "
        f"acknowledgements (relayd_cluster_ack_duration_seconds) averaged "
        f"{summary['ack_wait_mean_ms']} ms over {summary['ack_calls']} calls.",
        ""])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.invalidation",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--nodes", type=int, default=3, help="relayd nodes (2-26)")
    ap.add_argument("--rounds", type=int, default=200, help="disable+enable pairs timed")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--results", default=str(BENCH / "RESULTS.md"))
    a = ap.parse_args(argv)
    if not 2 <= a.nodes <= 26 or a.rounds < 1:
        ap.error("--nodes must be 2-26 and --rounds at least 1")
    started = dt.datetime.now(dt.UTC)
    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    base = make_base("relayd-bench-inval-")
    try:
        summary = measure(a.nodes, a.rounds, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = record_text(summary, argv, started, loadavg)
    print(text)
    if not a.no_record:
        path = Path(a.results)
        before = path.read_text() if path.exists() else ""
        with open(path, "a") as f:
            f.write(("" if before.endswith("\n\n") or not before else "\n") + text + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
