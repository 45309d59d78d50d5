"""The systems under test, each behind the same small interface.

A system is started fresh for every scenario with a fresh smtp-sink as its next
hop; ``roots()`` names the processes whose tree is measured (CPU, RSS, PSS).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import haraka as hk
from bench import postfix as pf
from bench.opendkim import OpenDkim
from bench.sink import Sink
from bench.util import free_port, stop_process, wait_smtp_ready

REPO = Path(__file__).resolve().parent.parent


class System:
    name = "?"
    relays = True          # messages travel on to the sink (end-to-end measurable)
    cold_auth = False      # can make fresh accounts (S3-cold: argon2 on every login)
    auth_user: str | None = None
    auth_password: str | None = None
    auth_file: Path | None = None  # S3-cold: one fresh account per connection
    mail_from = "sender@bench.example"
    notes: list[str]

    def fresh_accounts(self, n: int) -> list[tuple[str, str]]:
        """``n`` new accounts (username, password) nobody has logged in with (S3-cold)."""
        raise NotImplementedError(f"{self.name} has no accounts of its own")

    def __init__(self, base: Path, sink: Sink):
        self.base = base
        self.sink = sink
        self.port = 0
        self.notes = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def roots(self) -> list[int]:
        raise NotImplementedError

    def problems(self) -> list[str]:
        return []

    def backlog(self) -> int | None:
        """Messages accepted but not yet relayed, if the system can tell."""
        return None


class SinkCeiling(System):
    """The load tool straight into smtp-sink: the ceiling of the load tools + loopback."""

    name = "smtp-sink"
    relays = True  # what it accepts is what the sink counts
    auth_user, auth_password = "bench", "bench-secret"  # smtp-sink accepts any AUTH

    def start(self) -> None:
        self.port = self.sink.port

    def stop(self) -> None:
        pass

    def roots(self) -> list[int]:
        return [self.sink.proc.pid] if self.sink.proc else []


class StockAiosmtpd(System):
    name = "stock-aiosmtpd"
    relays = False
    auth_user, auth_password = "bench", "bench-secret"

    def start(self) -> None:
        self.port = free_port()
        self.log = open(self.base / "stock.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.stock_aiosmtpd", "--listen", self.target],
            cwd=str(REPO), stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_smtp_ready("127.0.0.1", self.port, timeout=15, proc=self.proc)

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        self.log.close()

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []


class PostfixRelay(System):
    name = "postfix"
    auth_user, auth_password = "bench", "bench-secret"

    def start(self) -> None:
        self.pf = pf.Postfix(self.base / "postfix", self.sink.port)
        self.pf.start()
        self.port = self.pf.port

    def stop(self) -> None:
        self.pf.stop()

    def roots(self) -> list[int]:
        return self.pf.roots()

    def problems(self) -> list[str]:
        return self.pf.log_problems()

    def backlog(self) -> int | None:
        return self.pf.queued()


class PostfixDkim(PostfixRelay):
    """Postfix with OpenDKIM as its signing milter: the peer of relayd-dkim."""

    name = "postfix-dkim"

    def start(self) -> None:
        self.dkim = OpenDkim(self.base / "opendkim")
        try:
            self.dkim.start()
            self.pf = pf.Postfix(self.base / "postfix", self.sink.port, milter=self.dkim.milter)
            self.pf.start()
        except Exception:
            self.dkim.stop()
            raise
        self.port = self.pf.port

    def stop(self) -> None:
        try:
            if hasattr(self, "pf"):
                self.pf.stop()
        finally:
            self.dkim.stop()

    def roots(self) -> list[int]:
        return self.pf.roots() + self.dkim.roots()


class HarakaRelay(System):
    """Haraka (bench/haraka.py) with ``nodes`` worker processes."""

    name = "haraka"
    nodes = 1
    auth_user, auth_password = "bench", "bench-secret"

    def start(self) -> None:
        self.hk = hk.Haraka(self.base / "haraka", self.sink.port, nodes=self.nodes,
                            auth_user=self.auth_user or "", auth_password=self.auth_password or "")
        self.hk.start()
        self.port = self.hk.port

    def stop(self) -> None:
        if hasattr(self, "hk"):
            self.hk.stop()

    def roots(self) -> list[int]:
        return self.hk.roots()

    def problems(self) -> list[str]:
        return self.hk.log_problems()


class HarakaRelay2(HarakaRelay):
    name = "haraka-2"
    nodes = 2


def make_base(prefix: str = "relayd-bench-") -> Path:
    """One temp dir per run, on the same disk as everything else, traversable by
    the postfix user."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_TMPDIR")))
    d.chmod(0o755)
    return d
