"""schemathesis against a live relayd's control socket (issue 13 item 5): every
operation of docs/openapi.json, with valid and invalid data, must answer a
documented status with a body that matches the document, and never a 5xx."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.config import SchemathesisConfig

from control import openapi, schemas
from control.client import Client, ControlError
from tests.procs import BASE_TOML, REPO, free_port

BASE_URL = "http://relayd"
EXAMPLES = 25  # per operation and phase: the whole run stays near a minute

CONFIG = SchemathesisConfig.from_dict({
    "generation": {"mode": "all", "max-examples": EXAMPLES},
    "phases": {"stateful": {"enabled": False}},
    # A schema-valid value the relay still refuses (a domain name, a CIDR, a confirmation
    # that does not match) is a documented 400: the schema types, the relay judges.
    "checks": {"positive_data_acceptance": {"enabled": False}},
})
schema = schemathesis.openapi.from_dict(openapi.document(), config=CONFIG)


class _UnixConnection(urllib3.connection.HTTPConnection):
    """urllib3's HTTP connection, to a Unix socket instead of a host."""

    socket_path = ""

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30.0)
        sock.connect(self.socket_path)
        return sock


class _UnixAdapter(HTTPAdapter):
    """A requests transport adapter for every URL: all of them go to one Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        conn = type("_Conn", (_UnixConnection,), {"socket_path": path})
        self._pool = urllib3.HTTPConnectionPool("localhost", maxsize=1)
        self._pool.ConnectionCls = conn

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> urllib3.HTTPConnectionPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real relayd process (control socket in tmp); yields (socket path, log path)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    config = tmp / "relayd.toml"
    config.write_text(BASE_TOML)
    sock, log = str(tmp / "var" / "control.sock"), tmp / "relayd.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relayd.app", "--config", str(config),
             "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp / "var"),
             "--control-socket", sock, "--smarthost", f"127.0.0.1:{free_port()}"],
            cwd=REPO, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(ControlError):
                Client(sock, timeout=2).call("GET", "/v1/health", dict)
                break
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "relayd did not start"
            time.sleep(0.05)
        # some state for the operations to find besides random names
        client = Client(sock)
        client.call("POST", "/v1/domains", dict, schemas.DomainAdd(name="example.com"))
        client.call("POST", "/v1/users", dict, schemas.UserAdd(domain="example.com"))
        yield sock, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def session(relayd: tuple[str, Path]) -> Iterator[requests.Session]:
    """A requests session whose every request goes to the relay's control socket."""
    s = requests.Session()
    s.mount("http://", _UnixAdapter(relayd[0]))
    yield s
    s.close()


@pytest.mark.slow
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_control_api_conforms(case: schemathesis.Case, session: requests.Session) -> None:
    """One operation: valid and invalid requests get documented answers, never a 5xx."""
    case.call_and_validate(base_url=BASE_URL, session=session)


@pytest.mark.slow
def test_no_internal_errors_logged(relayd: tuple[str, Path]) -> None:
    """After the run, the relay logged no control_error (an unhandled exception)."""
    assert "control_error" not in relayd[1].read_text()
