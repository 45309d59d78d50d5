"""Control socket abuse: every bad request gets a clear 4xx with an error code and never
a traceback, and the socket is not reachable by other local users."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import RelayFactory, RelayHandle

pytestmark = pytest.mark.timeout(60)


async def _raw_call(path: str, method: str, url: str, data: bytes,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    conn = aiohttp.UnixConnector(path=path)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.request(method, f"http://relayd{url}", data=data,
                             headers=headers or {}) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(("body", "code"), [
    (b"[1, 2]", "invalid_request"),
    (b'"a string"', "invalid_request"),
    (b"{}", "invalid_request"),
    (b'{"name": null}', "invalid_request"),
    (b'{"name": "a.com"', "malformed_json"),
    (b"\xff\xfe\x00", "malformed_json"),
])
async def test_bad_bodies_get_400(relay: RelayHandle, body: bytes, code: str) -> None:
    """A body that is not the documented JSON object gets 400 with a machine-readable code."""
    status, answer = await _raw_call(relay.ctl.path, "POST", "/v1/domains", body)
    assert (status, answer["code"]) == (400, code)
    assert "Traceback" not in answer["error"]


async def test_wrong_types_in_user_add_get_400(relay: RelayHandle) -> None:
    """Wrong field types in user add (networks as a string, bad CIDR) get 400."""
    await relay.ctl.add_domain("example.com")
    status, answer = await relay.ctl.call("POST", "/v1/users",
                                          {"domain": "example.com", "allow_networks": "10/8"})
    assert (status, answer["code"]) == (400, "invalid_request")
    status, answer = await relay.ctl.call("POST", "/v1/users",
                                          {"domain": "example.com",
                                           "allow_networks": ["not-a-network"]})
    assert 400 <= status < 500 and answer["code"] != "internal"


async def test_unknown_command_and_method_get_4xx(relay: RelayHandle) -> None:
    """An unknown operation gets 404 unknown_endpoint; a known path with the wrong method 405."""
    status, answer = await relay.ctl.call("POST", "/v1/users/nobody/frobnicate", {})
    assert (status, answer["code"]) == (404, "unknown_endpoint")
    status, answer = await relay.ctl.call("DELETE", "/v1/domains")
    assert (status, answer["code"]) == (405, "method_not_allowed")


async def test_oversized_body_gets_413(relay: RelayHandle) -> None:
    """A request body over 1 MiB gets 413 too_large."""
    big = b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    status, answer = await _raw_call(relay.ctl.path, "POST", "/v1/domains", big)
    assert (status, answer["code"]) == (413, "too_large")


async def test_bad_query_values_get_400(relay: RelayHandle) -> None:
    """Query parameters of the wrong type or an unknown state get 400, not 500."""
    for url in ("/v1/dormant?days=abc", "/v1/log?status=bogus", "/v1/queue?state=bogus",
                "/v1/queue/XYZ"):
        status, answer = await _raw_call(relay.ctl.path, "GET", url, b"")
        assert 400 <= status < 500, (url, status, answer)
        assert answer["code"] != "internal"


async def test_socket_is_not_world_accessible_even_with_umask_0(
        relay_factory: RelayFactory, tmp_path: Path) -> None:
    """With a process umask of 0 the control socket is still 0660 and the data dir has no
    access for others."""
    old = os.umask(0)
    try:
        relay = await relay_factory()
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(relay.ctl.path).st_mode)
    assert mode & 0o007 == 0, oct(mode)
    assert stat.S_IMODE(os.stat(relay.data_dir).st_mode) & 0o007 == 0
