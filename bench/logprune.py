"""Accept latency while relayd prunes a delivery log of many expired rows (issue 14, item 7).

    .venv/bin/python -m bench.logprune                  # 10 million expired rows
    .venv/bin/python -m bench.logprune --rows 1000000   # a quicker run

Fills ``DATA/relayd-log.sqlite3`` with ``--rows`` rows 60 days old (a recursive CTE
insert, one transaction per million rows), starts relayd on it (the bench config,
next hop an ``smtp-sink``), and runs ``bench.loadgen`` in rounds of ``--round``
messages (``--sessions``, 50; 100 messages a connection, 1 KiB) for as long as the prune
runs (until relayd logs ``delivery_log_pruned``), then one round after it. Prints
one JSON object: the fill time, the prune's rows, batches and seconds, each round's
accept p50/p99/max and whether the prune was running, and the worst p99 of the
rounds that ran during the prune. Target (issue 14): p99 < 25 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.relayd_peer import RelaydRelay
from bench.sink import Sink
from bench.systems import REPO, make_base
from relayd.store.deliverylog import DeliveryLog

_FILL = """
WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?)
INSERT INTO delivery_log(ts, message_id, username, domain, recipient, next_hop, code, text,
                         outcome)
SELECT ? + x * 0.0001, 72057594037927936 + x, 'bench' || (x % 100), 'bench.example',
       'rcpt' || x || '@dest.example', '127.0.0.1:2525', 250,
       '250 2.0.0 Ok: queued as 4Xb9s71Gz4z9', 'delivered' FROM c
"""


def fill(path: Path, rows: int, step: int = 1_000_000) -> float:
    """``rows`` expired rows (60 days old) in the log file at ``path``; seconds taken."""
    t0 = time.monotonic()
    log = DeliveryLog(str(path))

    async def create() -> None:  # the file as relayd makes it (pragmas, schema)
        await log.open()
        await log.close()

    asyncio.run(create())
    conn = sqlite3.connect(path, isolation_level=None)
    # Fast: no journal, the indexes built once at the end (the file stays WAL after).
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    indexes = [r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE type='index'"
                                          " AND tbl_name='delivery_log' AND sql IS NOT NULL")]
    for name in ("delivery_log_user_ts", "delivery_log_ts"):
        conn.execute(f"DROP INDEX {name}")
    old = time.time() - 60 * 86400
    for start in range(1, rows + 1, step):
        conn.execute("BEGIN")
        conn.execute(_FILL, (start, min(rows, start + step - 1), old))
        conn.execute("COMMIT")
    for sql in indexes:
        conn.execute(sql)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return time.monotonic() - t0


def loadgen(target: str, messages: int, sessions: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.loadgen", "--target", target, "--sessions", str(sessions),
           "--messages", str(messages), "--per-conn", "100", "--size", "1024",
           "--timeout", "600"]
    p = subprocess.run(cmd, capture_output=True, cwd=str(REPO), stdin=subprocess.DEVNULL,
                       timeout=700, check=False)
    out: dict[str, Any] = json.loads(p.stdout.decode().strip().splitlines()[-1])
    return out


def pruned(logpath: Path) -> dict[str, Any] | None:
    for line in logpath.read_text(errors="replace").splitlines():
        if '"delivery_log_pruned"' in line:
            return dict(json.loads(line[line.index("{"):]))
    return None


def run(a: argparse.Namespace) -> dict[str, Any]:
    base = make_base("relayd-logprune-")
    (base / "data").mkdir(mode=0o750)
    fill_s = fill(base / "data" / "relayd-log.sqlite3", a.rows)
    size = (base / "data" / "relayd-log.sqlite3").stat().st_size
    rounds: list[dict[str, Any]] = []
    with Sink() as sink:
        relay = RelaydRelay(base, sink)
        relay.start()
        try:
            done = None
            while done is None and len(rounds) < a.max_rounds:
                res = loadgen(relay.target, a.round, a.sessions)
                done = pruned(relay.logpath)
                rounds.append({"during_prune": done is None, "accepted": res["accepted"],
                               "failed": res["failed"], "per_s": res["accepted_per_s"],
                               **{k: res["latency_ms"][k] for k in ("p50", "p99", "max")}})
            res = loadgen(relay.target, a.round, a.sessions)
            rounds.append({"during_prune": False, "accepted": res["accepted"],
                           "failed": res["failed"], "per_s": res["accepted_per_s"],
                           **{k: res["latency_ms"][k] for k in ("p50", "p99", "max")}})
        finally:
            relay.stop()
    during = [r["p99"] for r in rounds if r["during_prune"] and r["p99"] is not None]
    return {"rows": a.rows, "log_file_bytes": size, "fill_s": round(fill_s, 1),
            "prune": done, "rounds": rounds,
            "worst_p99_during_prune_ms": max(during) if during else None,
            "target_p99_ms": 25.0, "base": str(base)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="expired rows to prune")
    ap.add_argument("--round", type=int, default=10_000, help="messages per loadgen round")
    ap.add_argument("--max-rounds", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=50, help="loadgen's concurrent sessions")
    a = ap.parse_args(argv)
    result = run(a)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0 if result["worst_p99_during_prune_ms"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
