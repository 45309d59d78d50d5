"""Peer: Haraka configured as an authenticated forwarding relay, in its own directory.

Haraka and its plugins come from ``.cache/haraka`` (scripts/install-haraka.sh, versions
pinned by bench/haraka/package-lock.json).  Everything of one instance lives under one
temp dir: ``config/`` (written here), ``queue/`` (Haraka's outbound queue, unused:
``smtp_forward`` takes every message) and ``haraka.log``.  Plugins: ``relay`` with an
ACL for 127.0.0.0/8 (smtp-source sends without AUTH, as to Postfix's ``mynetworks``),
``auth/flat_file`` (AUTH PLAIN/LOGIN, offered without TLS to loopback clients), and
``queue/smtp_forward`` to the sink with ``enable_outbound`` (relayed mail goes there,
not to Haraka's MX delivery).  ``connection.ini`` is Haraka's own default with the
message size limit raised to 64 MiB; ``smtp.ini`` sets ``listen`` and ``nodes``.

Started as ``node bin/haraka -c DIR`` in a session of its own: the process is the
cluster master, ``nodes`` workers are its children.  Stopped with SIGTERM (graceful,
``force_shutdown_timeout`` 5 s), then SIGKILL to whatever of the tree is left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench import procstat
from bench.util import free_port, wait_smtp_ready

REPO = Path(__file__).resolve().parent.parent
INSTALL_DIR = REPO / ".cache" / "haraka"
HARAKA_JS = INSTALL_DIR / "node_modules" / "Haraka" / "bin" / "haraka"
DEFAULT_CONFIG = INSTALL_DIR / "node_modules" / "Haraka" / "config"
MESSAGE_SIZE_LIMIT = 64 * 1024 * 1024
#: Log lines worth a note; the TLS key/cert complaints are expected (no TLS is configured).
_PROBLEM = re.compile(r"\[(ERROR|CRIT|EMERG|ALERT)\] (?:\[[^\]]*\] )?(.*)")
_EXPECTED = ("tls key", "tls cert")


def node() -> str | None:
    return shutil.which("node")


def available() -> bool:
    """Node.js and the Haraka of scripts/install-haraka.sh are there."""
    return node() is not None and HARAKA_JS.exists()


def connection_ini(default: str, size_limit: int = MESSAGE_SIZE_LIMIT) -> str:
    """Haraka's default connection.ini with ``[max] bytes`` set to ``size_limit``.

    A config file of the instance replaces Haraka's default file as a whole, so it is
    derived from the default rather than written from scratch (sections left out would
    lose their defaults: the greeting, for one)."""
    out, section, done = [], "", False
    for line in default.splitlines():
        s = line.strip()
        if s.startswith("["):
            section = s
        elif section == "[max]" and re.match(r"bytes\s*=", s):
            line, done = f"bytes={size_limit}", True
        out.append(line)
    if not done:
        raise ValueError("no [max] bytes= in Haraka's default connection.ini")
    return "\n".join(out) + "\n"


class Haraka:
    def __init__(self, base: Path, sink_port: int, nodes: int = 1, port: int | None = None,
                 auth_user: str = "bench", auth_password: str = "bench-secret"):  # noqa: S107
        self.base = Path(base)
        self.conf = self.base / "config"
        self.log = self.base / "haraka.log"
        self.port = port or free_port()
        self.sink_port = sink_port
        self.nodes = nodes
        self.auth_user, self.auth_password = auth_user, auth_password
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        files = {
            "plugins": "relay\nauth/flat_file\nqueue/smtp_forward\n",
            "smtp.ini": (f"listen=127.0.0.1:{self.port}\nnodes={self.nodes}\n"
                         "force_shutdown_timeout=5\n"),
            "relay.ini": "[relay]\nacl=true\n",
            "relay_acl_allow": "127.0.0.0/8\n",
            "auth_flat_file.ini": ("[core]\nmethods=PLAIN,LOGIN\n\n[users]\n"
                                   f"{self.auth_user}={self.auth_password}\n"),
            "smtp_forward.ini": (f"[main]\nhost=127.0.0.1\nport={self.sink_port}\n"
                                 "enable_outbound=true\n"),
            # Haraka's default is info, a line per plugin hook; notice keeps a line per
            # connection (as Postfix's maillog keeps a few per message) and the errors.
            "log.ini": "[main]\nlevel=notice\n",
            "connection.ini": connection_ini((DEFAULT_CONFIG / "connection.ini").read_text()),
        }
        for name, text in files.items():
            (self.conf / name).write_text(text)

    def start(self, timeout: float = 60) -> Haraka:
        exe = node()
        if exe is None or not HARAKA_JS.exists():
            raise RuntimeError("Haraka is not installed: sh scripts/install-haraka.sh")
        self.write_config()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, str(HARAKA_JS), "-c", str(self.base)], cwd=str(self.base),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        try:
            self._wait_listening(timeout)
            wait_smtp_ready("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"haraka did not start: {e}\n{self.log_tail()}") from e
        return self

    def _wait_listening(self, timeout: float) -> None:
        """Until every worker logged that it listens (a greeting shows only one of them)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if text.count(f"Listening on 127.0.0.1:{self.port}") >= self.nodes:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.nodes} worker(s) not listening within {timeout}s")
            time.sleep(0.1)

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = procstat.tree_pids([self.proc.pid])
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        # the workers exit with the master; SIGKILL whatever is left (the group, then
        # any process of the tree that left it)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and procstat.tree_pids(pids):
            time.sleep(0.1)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in procstat.tree_pids(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no haraka.log)"

    def log_problems(self, limit: int = 4) -> list[str]:
        """Distinct error lines of haraka.log (connection ids dropped), the expected TLS
        complaints left out."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        seen: dict[str, int] = {}
        for ln in text.splitlines():
            m = _PROBLEM.search(ln)
            if m is None or m.group(2).lstrip().startswith("at "):
                continue
            msg = f"{m.group(1)} {m.group(2)}"
            if any(e in msg for e in _EXPECTED):
                continue
            seen[msg] = seen.get(msg, 0) + 1
        out = [k + (f" (x{n})" if n > 1 else "") for k, n in seen.items()]
        return out[:limit] + ([f"... {len(out) - limit} more kinds"] if len(out) > limit else [])

    def __enter__(self) -> Haraka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
