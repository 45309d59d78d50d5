"""Small shared helpers: free ports, SMTP readiness, process cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def smtp_greets(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if something accepts a connection on host:port and greets with 220."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(512)
                if not chunk:
                    return False
                data += chunk
            ok = data.startswith(b"220")
            try:
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            except OSError:
                pass
            return ok
    except OSError:
        return False


def wait_smtp_ready(host: str, port: int, timeout: float = 30.0,
                    proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before {host}:{port} was ready")
        if smtp_greets(host, port, timeout=1.0):
            return
        time.sleep(0.1)
    raise TimeoutError(f"no 220 greeting on {host}:{port} within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0,
                 sig: int = signal.SIGTERM, group: bool = True) -> int | None:
    """SIGTERM (to the process group if started with start_new_session), then SIGKILL."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except ProcessLookupError:
                pass
            proc.wait(5)
    return proc.returncode
