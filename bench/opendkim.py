"""Peer part: OpenDKIM (Debian's ``opendkim``) as the signing milter of the postfix-dkim peer.

One process per measurement with its own configuration (never /etc/opendkim.conf, never
the system service).  OpenDKIM refuses a configuration or key file below a directory
others can write to, /tmp included, so the configuration, the key and the socket live
in a private directory under /run (``BENCH_DKIM_DIR`` to change it), removed at stop;
the log goes to the run's temp dir: signing mode only, RSA-2048 key made
here for ``bench.example`` (selector ``bench``), relaxed/relaxed, rsa-sha256, the
milter on a Unix socket Postfix's cleanup (user postfix) can connect to. It signs
what comes from its default InternalHosts (127.0.0.1), i.e. every message of the
bench, whose From: is in bench.example. Runs in the foreground; SIGTERM stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.util import stop_process

OPENDKIM = "/usr/sbin/opendkim"
DOMAIN = "bench.example"
SELECTOR = "bench"


def available() -> bool:
    return os.access(OPENDKIM, os.X_OK) or shutil.which("opendkim") is not None


class OpenDkim:
    def __init__(self, base: Path, domain: str = DOMAIN, selector: str = SELECTOR):
        self.base = Path(base)
        self.domain, self.selector = domain, selector
        self.base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="relayd-bench-dkim-",
                                         dir=os.environ.get("BENCH_DKIM_DIR", "/run")))
        self.socket = self.dir / "opendkim.sock"
        self.key = self.dir / f"{selector}.private"
        self.conf = self.dir / "opendkim.conf"
        self.log = self.base / "opendkim.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def milter(self) -> str:
        """The milter address in Postfix's notation."""
        return f"unix:{self.socket}"

    def write_config(self) -> None:
        os.chmod(self.dir, 0o755)  # noqa: S103 - Postfix's cleanup reaches the socket
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        os.chmod(self.key, 0o600)  # RequireSafeKeys: readable by its owner only
        settings = {
            "Syslog": "no",
            "Background": "no",
            "Mode": "s",
            "Socket": f"local:{self.socket}",
            "PidFile": str(self.dir / "opendkim.pid"),
            "UMask": "0111",  # the socket 0666: cleanup runs as the postfix user
            "Domain": self.domain,
            "Selector": self.selector,
            "KeyFile": str(self.key),
            "Canonicalization": "relaxed/relaxed",
            "SignatureAlgorithm": "rsa-sha256",
            "OversignHeaders": "From",  # as Debian's /etc/opendkim.conf
        }
        self.conf.write_text("".join(f"{k}\t{v}\n" for k, v in settings.items()))

    def start(self, timeout: float = 15) -> OpenDkim:
        self.write_config()
        exe = OPENDKIM if os.access(OPENDKIM, os.X_OK) else (shutil.which("opendkim") or OPENDKIM)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "-f", "-x", str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"opendkim did not start: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        stop_process(self.proc, timeout=10, sig=signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no opendkim.log)"
