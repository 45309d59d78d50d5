"""Credential rotation in cluster mode (issue 16 item 2): two real nodes on one real
PostgreSQL. reset-password --keep-old through node a: when it returns, the old and the new
password both log in on node b (its cache, which held the old one, included), and a session
on b authenticated with the old one keeps sending; expire-old-password through a: when it
returns, the old password is refused on b and b's session loses its authentication.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster_support import start_node
from tests.conftest import RelayFactory, RelayHandle
from tests.rawsmtp import Raw

pytestmark = pytest.mark.timeout(60)


async def _login(node: RelayHandle, user: str, password: str) -> tuple[Raw, str]:
    raw = await Raw.open(node.host, node.port)
    return raw, await raw.login(user, password)


async def _answer(node: RelayHandle, user: str, password: str) -> str:
    raw, answer = await _login(node, user, password)
    raw.close()
    return answer[:3]


async def test_keep_old_and_expire_old_across_nodes(pg_dsn: str, relay_factory: RelayFactory,
                                                    tmp_path: Path) -> None:
    """The grace given and ended through node a holds on node b when each call returns."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    await a.ctl.add_domain("example.com")
    user, old = await a.ctl.add_user("example.com")
    assert await _answer(b, user, old) == "235"  # b has the old password in its cache
    session, answer = await _login(b, user, old)
    assert answer.startswith("235 ")

    cred = await a.ctl.ok("POST", f"/v1/users/{user}/reset-password",
                          {"keep_old_seconds": 3600})
    assert sorted(cred["propagation"]["acknowledged"]) == ["a", "b"]
    assert cred["old_password_expires"] > time.time() + 3500
    new = cred["password"]
    assert await _answer(b, user, new) == "235"
    assert await _answer(b, user, old) == "235"
    assert (await session.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await session.cmd("RSET")).startswith("250 ")
    shown = await b.ctl.ok("GET", f"/v1/users/{user}")
    assert shown["old_password_expires"] == pytest.approx(cred["old_password_expires"])

    info = await a.ctl.ok("POST", f"/v1/users/{user}/expire-old-password")
    assert sorted(info["propagation"]["acknowledged"]) == ["a", "b"]
    assert await _answer(b, user, old) == "535"
    assert await _answer(a, user, old) == "535"
    assert (await session.cmd("MAIL FROM:<app@example.com>")).startswith("530 ")
    session.close()
    assert await _answer(b, user, new) == "235"
    assert "old_password_expires" not in await b.ctl.ok("GET", f"/v1/users/{user}")


async def test_a_second_rotation_and_a_disable_across_nodes(
        pg_dsn: str, relay_factory: RelayFactory, tmp_path: Path) -> None:
    """Two rotations through a: on b only the last two passwords work; a disable through
    a then ends both on b, and an enable through a brings back the current one only."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    await a.ctl.add_domain("example.com")
    user, p0 = await a.ctl.add_user("example.com")
    p1 = (await a.ctl.ok("POST", f"/v1/users/{user}/reset-password",
                         {"keep_old_seconds": 3600}))["password"]
    assert await _answer(b, user, p0) == "235"
    p2 = (await a.ctl.ok("POST", f"/v1/users/{user}/reset-password",
                         {"keep_old_seconds": 3600}))["password"]
    assert [await _answer(b, user, p) for p in (p0, p1, p2)] == ["535", "235", "235"]
    await a.ctl.ok("POST", f"/v1/users/{user}/disable")
    await a.ctl.ok("POST", f"/v1/users/{user}/enable")
    assert [await _answer(b, user, p) for p in (p1, p2)] == ["535", "235"]
