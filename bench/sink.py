"""The next hop: Postfix's smtp-sink on a loopback port, with delivery counting.

smtp-sink ``-c`` writes ``sess=N quit=N mesg=N`` followed by CR every time a
session ends, QUIT is executed or "." is received; the output is unbuffered even
into a pipe.  A reader thread parses it and timestamps each change of ``mesg``,
which gives the number of messages received and the time of the first and last
one (end-to-end throughput) without writing the messages anywhere.  With
``dump_dir`` (the smoke tests: a handful of messages) smtp-sink also writes each
message to a file there (``-d``), for ``dumped()`` to read back.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from bench.util import free_port, wait_smtp_ready

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
_COUNTER = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


class Sink:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None, backlog: int = 1024,
                 max_conns: int = 1024, dump_dir: Path | None = None):
        self.host = host
        self.port = port or free_port()
        self.backlog = backlog
        self.max_conns = max_conns
        self.dump_dir = dump_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.mesg = 0
        self.sess = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Sink:
        cmd = [SMTP_SINK, "-c", "-m", str(self.max_conns), "-t", "300"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # required when run as root
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self.dump_dir.chmod(0o777)  # smtp-sink writes as nobody
            cmd += ["-d", f"{self.dump_dir}/msg."]
        cmd += [f"{self.host}:{self.port}", str(self.backlog)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="sink-reader", daemon=True)
        self._reader.start()
        try:
            wait_smtp_ready(self.host, self.port, timeout=10, proc=self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\r")
            if not lines:
                continue
            m = _COUNTER.search(lines[-1])
            if m is None:
                continue
            mesg = int(m.group(3))
            with self._cond:
                self.sess = int(m.group(1))
                if mesg != self.mesg:
                    if self.first_ts is None:
                        self.first_ts = now
                    self.last_ts = now
                    self.mesg = mesg
                self._cond.notify_all()

    def dumped(self) -> list[bytes]:
        """The messages smtp-sink wrote to ``dump_dir`` (envelope records, then content)."""
        if self.dump_dir is None:
            return []
        return [p.read_bytes() for p in sorted(self.dump_dir.glob("msg.*"))]

    def snapshot(self) -> tuple[int, float | None]:
        with self._cond:
            return self.mesg, self.last_ts

    def wait_for(self, count: int, timeout: float, stall: float | None = None) -> bool:
        """Wait until the sink has received ``count`` messages in total.

        Gives up after ``timeout`` seconds, or after ``stall`` seconds without progress.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            last_seen, last_change = self.mesg, time.monotonic()
            while self.mesg < count:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if self.mesg != last_seen:
                    last_seen, last_change = self.mesg, now
                elif stall is not None and now - last_change > stall:
                    return False
                if self.proc is not None and self.proc.poll() is not None:
                    return False
                self._cond.wait(min(0.5, deadline - now))
            return True

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(2)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
