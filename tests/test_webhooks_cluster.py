"""Issue 16 item 5 in cluster mode: the webhook set through node a is node b's too.

Two real relayd nodes (in this process) on one throwaway PostgreSQL database. The webhook
and its secret are stored once (the secret sealed with the cluster key); node b follows
the change, writes the events of its own deliveries in its own spool and posts them,
signed with the secret node a printed; a rotation and a removal through a reach b too.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relayd.webhooks.policy import SIGNATURE_HEADER, verify
from tests.cluster_support import start_node
from tests.conftest import RelayFactory, Sink, message
from tests.test_webhooks import Hook

pytestmark = pytest.mark.timeout(90)


async def test_webhook_set_on_a_is_used_by_b(pg_dsn: str, relay_factory: RelayFactory,
                                             tmp_path: Path, sink: Sink) -> None:
    """Set on a, delivered on b: b posts the event signed with a's secret; the secret
    is not readable from the database; a rotation on a is b's next signature."""
    a = await start_node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    b = await start_node(relay_factory, pg_dsn, "b", tmp_path, "127.0.0.2")
    hook = await Hook().start()
    try:
        await a.ctl.add_domain("example.com")
        user, password = await a.ctl.add_user("example.com")
        info = await a.ctl.ok("POST", "/v1/domains/example.com/settings",
                              {"webhook": hook.url})
        secret = info["webhook_secret"]
        assert secret
        import asyncpg  # the tests' own connection, as an operator's psql would be
        conn = await asyncpg.connect(pg_dsn)
        try:
            stored = await conn.fetchrow("SELECT url, secret FROM domain_webhooks")
        finally:
            await conn.close()
        assert stored[0] == hook.url and secret.encode() not in bytes(stored[1])
        shown_b = await b.ctl.ok("GET", "/v1/domains/example.com")
        assert shown_b["webhook_url"] == hook.url and shown_b["webhook_secret"] is None

        c = await b.client(user, password)
        await c.sendmail("app@example.com", ["r1@dest.test"], message("via b"))
        await c.quit()
        events = await hook.wait_for(1)
        assert events[0]["outcome"] == "delivered" and events[0]["recipient"] == "r1@dest.test"
        headers, body = hook.posts[0]
        assert verify(secret, headers[SIGNATURE_HEADER], body, time.time())
        # the event was b's: written in b's spool, never in a's
        assert await a.relay.spool.fetchall("SELECT id FROM webhook_events") == []

        rotated = (await a.ctl.ok("POST", "/v1/domains/example.com/settings",
                                  {"rotate_webhook_secret": True}))["webhook_secret"]
        assert rotated and rotated != secret
        c = await b.client(user, password)
        await c.sendmail("app@example.com", ["r2@dest.test"], message("via b again"))
        await c.quit()
        await hook.wait_for(2)
        headers, body = next(p for p in hook.posts if b"r2@dest.test" in p[1])
        assert verify(rotated, headers[SIGNATURE_HEADER], body, time.time())
        assert not verify(secret, headers[SIGNATURE_HEADER], body, time.time())

        await a.ctl.ok("POST", "/v1/domains/example.com/settings", {"webhook": "off"})
        assert b.relay.spool.hooks.domains == frozenset()
        dom = b.relay.directory.active_domain("example.com")
        assert dom is not None and dom.webhook_url is None and dom.webhook_secret is None
    finally:
        await hook.stop()
