"""Where an acknowledged disable spends its time: the phases of each call, seen from a
watcher LISTENing on the cluster's channels (no change to relayd).

    python -m bench.invalidation_phases [--nodes 3] [--rounds 100] [--no-fsync]

The same cluster as ``bench.invalidation``, plus one more PostgreSQL connection in this
process that LISTENs on ``relayd_control`` (a change committed: its version) and
``relayd_ack`` (node N recorded version V as applied: committed). For every timed
disable it splits the call, on this process's clock, into:

- write: from sending the request to the change's commit being announced (HTTP, the
  memory change, the write transaction on node a, its commit);
- apply a / apply others: from that announcement to node a's own, and to the slowest
  other node's, acknowledgement commit (wake-up, reading the log and the row, the spool
  barrier, the ``applied`` transaction);
- tail: from the last acknowledgement to the answer (node a noticing, reading the node
  list, answering).

``--no-fsync`` runs PostgreSQL with the test suite's settings (fsync off), to show what
durability of the directory's commits costs. Prints a table of p50/p90/p99 per phase and
one JSON line; records nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

from bench.invalidation import cluster, make_account, percentiles, timed_change
from bench.systems import make_base

PHASES = ("write", "apply a", "apply others", "tail", "total")


class Watcher:
    """A thread of its own LISTENing on the cluster's channels; arrival times recorded."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.control: dict[int, float] = {}            # version -> arrival
        self.acks: dict[tuple[str, int], float] = {}   # (node, version) -> arrival
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the watcher did not connect to PostgreSQL")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _notified(self, channel: str, payload: str) -> None:
        now = time.perf_counter()
        if channel == "relayd_control":
            self.control.setdefault(int(payload), now)
        else:
            node, _, version = payload.partition(" ")
            self.acks.setdefault((node, int(version)), now)

    async def _run(self) -> None:
        from relayd.store.pg import Database
        from relayd.store.pgdirectory import ACK_CHANNEL, CONTROL_CHANNEL

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        db = Database(self.dsn, None, connect_timeout=10, command_timeout=10)
        await db.open()
        listener = await db.listen([CONTROL_CHANNEL, ACK_CHANNEL], self._notified,
                                   lambda: None)
        self._ready.set()
        await self._stop.wait()
        await listener.close()
        await db.close()


def phases(watch: Watcher, version: int, names: list[str], t0: float,
           t1: float) -> dict[str, float] | None:
    """One call's phases in seconds (None if an announcement was missed)."""
    w = watch.control.get(version)
    acks = {n: watch.acks.get((n, version)) for n in names}
    if w is None or any(a is None for a in acks.values()):
        return None
    last = max(a for a in acks.values() if a is not None)
    own = acks[names[0]]
    assert own is not None
    others = max(a for n, a in acks.items() if n != names[0] and a is not None)
    return {"write": w - t0, "apply a": own - w, "apply others": others - w,
            "tail": t1 - last, "total": t1 - t0}


def run(nodes: int, rounds: int, durable: bool) -> dict[str, Any]:
    """The cluster, the watcher, ``rounds`` timed disables (each followed by an enable)."""
    from control import schemas
    from control.client import Client

    base = make_base("relayd-bench-phases-")
    split: dict[str, list[float]] = {p: [] for p in PHASES}
    missed = 0
    try:
        with cluster(base, nodes, durable) as (dsn, members), Watcher(dsn) as watch:
            names, sock = [n.name for n in members], members[0].sock
            user = make_account(sock)
            path = f"/v1/users/{Client.seg(user)}/disable"
            for _ in range(rounds):
                t0 = time.perf_counter()
                info = Client(str(sock)).call("POST", path, schemas.UserInfo)
                t1 = time.perf_counter()
                assert info.propagation is not None
                time.sleep(0.01)  # the last notifications reach the watcher
                got = phases(watch, info.propagation.version, names, t0, t1)
                if got is None:
                    missed += 1
                else:
                    for k, v in got.items():
                        split[k].append(v)
                timed_change(sock, user, "enable", names)
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return {"nodes": nodes, "rounds": rounds, "fsync": durable, "missed": missed,
            "phases_ms": {k: percentiles(v) for k, v in split.items() if v}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.invalidation_phases",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--no-fsync", action="store_true", help="PostgreSQL with fsync off")
    a = ap.parse_args(argv)
    out = run(a.nodes, a.rounds, durable=not a.no_fsync)
    print(f"{a.nodes} nodes, {a.rounds} disables, fsync {'on' if out['fsync'] else 'off'}, "
          f"{out['missed']} without every announcement")
    print("| phase | p50 ms | p90 ms | p99 ms | max ms | mean ms |")
    print("|---|---|---|---|---|---|")
    for k, v in out["phases_ms"].items():
        print(f"| {k} | {v['p50']} | {v['p90']} | {v['p99']} | {v['max']} | {v['mean']} |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
