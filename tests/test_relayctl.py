"""relayctl, the real CLI, against the real control socket (and without one)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

from tests.conftest import RelayHandle

REPO = Path(__file__).resolve().parent.parent


async def relayctl(sock: str | Path, *args: str) -> tuple[int, str, str]:
    """Run relayctl in a subprocess (so the relay's loop keeps serving)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "--socket", str(sock), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    """Against a socket that does not exist: one clear line, non-zero exit, no traceback."""
    rc, out, err = await relayctl(tmp_path / "nope.sock", "status")
    assert rc == 3
    assert "no control socket" in err
    assert "Traceback" not in err
    assert out == ""


async def test_domain_and_user_add_json(relay: RelayHandle) -> None:
    """domain add and user add print the documented JSON shapes."""
    sock = relay.ctl.path
    rc, out, err = await relayctl(sock, "--json", "domain", "add", "example.org")
    assert rc == 0, err
    dom = json.loads(out)
    assert dom["name"] == "example.org"
    kinds = {(r["type"], r["purpose"].split()[0]) for r in dom["dns_records"]}
    assert ("TXT", "dkim") in kinds and ("TXT", "spf") in kinds
    rc, out, err = await relayctl(sock, "--json", "user", "add", "--domain", "example.org")
    assert rc == 0, err
    cred = json.loads(out)
    assert set(cred) == {"username", "password"}
    assert len(cred["password"]) >= 24
    rc, out, _ = await relayctl(sock, "user", "list")
    assert rc == 0 and cred["username"] in out
    assert cred["password"] not in out
    rc, out, _ = await relayctl(sock, "domain", "list")
    assert rc == 0 and "example.org" in out


async def test_status_shows_listeners_and_queue(relay: RelayHandle) -> None:
    """relayctl status shows the listening addresses, the queue and the uptime."""
    rc, out, err = await relayctl(relay.ctl.path, "--json", "status")
    assert rc == 0, err
    st = json.loads(out)
    assert {"kind": "smtp", "address": f"{relay.host}:{relay.port}"} in st["listeners"]
    assert set(st["queue"]) == {"queued", "waiting_limit", "held", "deferred"}
    assert st["uptime_seconds"] >= 0


async def test_refused_operation_exits_1_with_the_reason(relay: RelayHandle) -> None:
    """A refused operation prints the daemon's reason on one line and exits 1."""
    rc, _, err = await relayctl(relay.ctl.path, "user", "add", "--domain", "unknown.example")
    assert rc == 1
    assert err.strip() == "relayctl: no such domain: unknown.example"


async def test_bad_usage_exits_2(relay: RelayHandle) -> None:
    """Unknown subcommands are a usage error (exit 2), not a traceback."""
    rc, _, err = await relayctl(relay.ctl.path, "frobnicate")
    assert rc == 2
    assert "Traceback" not in err


async def test_control_socket_is_not_world_accessible(relay: RelayHandle) -> None:
    """The control socket is created with mode 0660."""
    mode = stat.S_IMODE(os.stat(relay.ctl.path).st_mode)
    assert mode == 0o660


async def test_control_api_rejects_bad_requests(relay: RelayHandle) -> None:
    """Malformed JSON, unknown fields, wrong types and unknown paths get clear 4xx errors."""
    ctl = relay.ctl
    status, body = await ctl.call("POST", "/v1/domains", None)
    assert status == 400
    import aiohttp
    conn = aiohttp.UnixConnector(path=ctl.path)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.post("http://x/v1/domains", data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["code"] == "malformed_json"
    status, body = await ctl.call("POST", "/v1/domains", {"name": "a.com", "extra": 1})
    assert status == 400 and "extra" in body["error"]
    status, body = await ctl.call("POST", "/v1/domains", {"name": 5})
    assert status == 400 and body["code"] == "invalid_request"
    status, body = await ctl.call("GET", "/v1/nothing-here")
    assert status == 404 and body["code"] == "unknown_endpoint"
