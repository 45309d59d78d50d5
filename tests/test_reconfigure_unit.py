"""Each component's ``reconfigure`` (what a SIGHUP reload calls), built directly.

The reload as a whole is proven over real sockets in tests/test_reload_settings.py;
these check each component's part without a running relay, and the routing
error kinds the scheduler reads instead of the text.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from relayd.config import Config, DeliveryConfig
from relayd.controlplane.lifecycle import Lifecycle
from relayd.delivery.client import Deliverer, Hop, Router
from relayd.delivery.mx import MxResolver
from relayd.delivery.routing import (
    NULL_MX_MESSAGE,
    NullMxRouteError,
    PermanentRouteError,
    RefusedRouteError,
    RouteError,
    TemporaryRouteError,
)
from relayd.directory.accounts import Account, Directory, Domain
from relayd.directory.credentials import CredentialCache, Hasher
from relayd.queue import backoff
from relayd.queue.bounces import status_of
from relayd.queue.ratelimit import Limits, limits_from
from relayd.queue.scheduler import Scheduler
from relayd.smtp import policy
from relayd.smtp.server import SmtpContext
from relayd.store.deliverylog import DeliveryLog
from relayd.store.spool import AttemptResult, Spool
from tests.delivery_fake import InProcessTransport


def _cfg(**sections: dict[str, object]) -> Config:
    return msgspec.convert(sections, Config)


def _scheduler(tmp_path: Path, cfg: Config, directory: Directory) -> Scheduler:
    return Scheduler(Spool(str(tmp_path / "s.sqlite3")), directory,
                     Deliverer(cfg.delivery, InProcessTransport(cfg.delivery, "relay.test")),
                     log=DeliveryLog(str(tmp_path / "log.sqlite3")),
                     policy=backoff.policy_from(cfg.delivery),
                     default_limits=limits_from(cfg.limits), workers=2)


async def _bounce(_msg: object, _failed: object) -> None:
    return None


async def test_scheduler_reconfigure_applies_limits_policy_and_bounces(tmp_path: Path) -> None:
    """New default limits reach an account without its own; new schedule; bounces on/off."""
    directory = Directory()
    domain = Domain(1, "example.com", "s1")
    directory.put_domain(domain)
    plain = Account(1, "a", domain, "h")
    own = Account(2, "b", domain, "h", per_minute=7)
    directory.put_account(plain)
    directory.put_account(own)
    sched = _scheduler(tmp_path, Config(), directory)
    assert sched.limits_of(plain) == Limits()
    new = _cfg(limits={"per_minute": 3, "per_day": 100},
               delivery={"retry_first_seconds": 5, "retry_max_seconds": 50, "bounces": False})
    retry = backoff.policy_from(new.delivery)
    sched.reconfigure(new, retry, _bounce)
    assert sched.limits_of(plain) == Limits(per_minute=3, per_day=100)
    assert sched.limits_of(own) == Limits(per_minute=7, per_day=100)
    assert sched.policy is retry and sched.policy.first == 5
    assert sched.dispatcher.policy is retry  # the dispatcher computes the next attempts
    assert sched.on_failed is None and sched.dispatcher.on_failed is None
    sched.reconfigure(Config(), backoff.policy_from(Config().delivery), _bounce)
    assert sched.on_failed is _bounce and sched.dispatcher.on_failed is _bounce
    assert sched.limits_of(plain) == Limits()


def test_policy_from_refuses_a_maximum_below_the_first_delay() -> None:
    """What reload must build before reconfiguring anything: it can fail."""
    with pytest.raises(ValueError, match="maximum"):
        backoff.policy_from(DeliveryConfig(retry_first_seconds=100, retry_max_seconds=10))
    assert backoff.policy_from(DeliveryConfig(retry_jitter=1.0)).jitter == 0.99


async def test_deliverer_reconfigure_swaps_router_and_pool_settings() -> None:
    """The new smarthost routes at once; an existing pool's next connection uses the new cfg."""
    old = DeliveryConfig(smarthost="127.0.0.1:2526")
    transport = InProcessTransport(old, "relay.test")
    deliverer = Deliverer(old, transport)
    pool = transport.pools.pool(Hop("127.0.0.1", 2526, "none"))
    new = DeliveryConfig(smarthost="192.0.2.9:587", messages_per_connection=3,
                         routes={"example.org": "192.0.2.1:25"})
    deliverer.reconfigure(new, Router(new))
    assert deliverer.route_now("x.example.net") == [Hop("192.0.2.9", 587, "none")]
    assert deliverer.route_now("mail.example.org") == [Hop("192.0.2.1", 25, "opportunistic")]
    assert deliverer.cfg is new and pool.cfg is new
    await deliverer.close()


async def test_smtp_context_reconfigure_sets_limits_and_networks() -> None:
    """Every session limit a reload promises lands in the context the sessions read."""
    old = Config()
    hasher = Hasher(old.credentials)
    try:
        ctx = SmtpContext(
            hostname="relay.test", directory=Directory(), credentials=CredentialCache(hasher),
            spool=Spool("unused.sqlite3"), scheduler=None,  # type: ignore[arg-type]
            signer=None, events=None,  # type: ignore[arg-type]
            plaintext_auth=policy.PlaintextAuthPolicy(old.smtp.plaintext_auth_networks),
            throttle=policy.AuthThrottle(free_failures=1, max_failures=2),
            max_message_size=1, max_recipients=1,
            max_queued_per_account=1, min_free_disk=1, free_disk=lambda: 1 << 40,
            idle_timeout=1.0, min_data_rate=1, max_commands=1, max_connections=1,
            max_connections_per_ip=1, smtputf8=True)
        new = _cfg(smtp={"max_message_size_bytes": 1000, "max_recipients": 9,
                         "idle_timeout_seconds": 7.0, "min_data_rate_bytes_per_second": 11,
                         "max_commands_per_session": 13, "max_connections": 17,
                         "max_connections_per_ip": 19, "greet_pause_seconds": 0.5,
                         "plaintext_auth_networks": ["192.0.2.0/24"]},
                   limits={"max_queued_per_account": 23, "min_free_disk_bytes": 29})
        plaintext = policy.PlaintextAuthPolicy(new.smtp.plaintext_auth_networks)
        ctx.reconfigure(new, plaintext, None)
        assert (ctx.max_message_size, ctx.max_recipients, ctx.idle_timeout, ctx.min_data_rate,
                ctx.max_commands, ctx.max_connections, ctx.max_connections_per_ip,
                ctx.greet_pause, ctx.max_queued_per_account, ctx.min_free_disk) == (
                    1000, 9, 7.0, 11, 13, 17, 19, 0.5, 23, 29)
        assert ctx.plaintext_auth is plaintext
    finally:
        hasher.close()


def test_lifecycle_reconfigure_reads_the_new_settings(tmp_path: Path) -> None:
    """Operations after a reload read the new configuration (limits, retention)."""
    cfg = Config()
    lc = Lifecycle(cfg, Spool(str(tmp_path / "s.sqlite3")), Directory(), None,  # type: ignore[arg-type]
                   None, None,  # type: ignore[arg-type]
                   delivery_log=DeliveryLog(str(tmp_path / "log.sqlite3")))
    new = _cfg(spool={"delivery_log_retention_days": 3})
    lc.reconfigure(new)
    assert lc.cfg.spool.delivery_log_retention_days == 3


@pytest.mark.parametrize(("error", "permanent", "code", "status"), [
    (NullMxRouteError(), True, 556, "5.1.10"),
    (RefusedRouteError("every address is loopback"), True, 550, "5.4.4"),
    (PermanentRouteError("domain not found (NXDOMAIN)"), True, 550, "5.1.2"),
    (TemporaryRouteError("MX lookup failed: timed out"), False, 550, "5.1.2"),
])
def test_route_error_kinds_carry_what_the_scheduler_records(
        error: RouteError, permanent: bool, code: int, status: str) -> None:
    """One RouteError type; its kind, not its text, says fail or defer, code and status."""
    assert isinstance(error, RouteError)
    assert (error.permanent, error.code, error.status) == (permanent, code, status)


def test_null_mx_text_is_unchanged() -> None:
    """The text of a null MX failure, as the delivery log and DSN show it."""
    assert str(NullMxRouteError()) == NULL_MX_MESSAGE == "domain does not accept mail (null MX)"


def test_mx_resolver_from_config_answers_an_address_literal_without_dns() -> None:
    """from_config wires [delivery] mx_port and the destination policy into the resolver."""
    allowed = DeliveryConfig(mode="mx", mx_port=2600, mx_allowed_networks=("127.0.0.0/8",),
                             dns_nameservers=("127.0.0.1:5353",))
    assert [h[:2] for h in asyncio.run(MxResolver.from_config(allowed).named_hops(
        "[127.0.0.1]"))] == [("127.0.0.1", 2600)]
    with pytest.raises(RefusedRouteError) as refused:
        asyncio.run(MxResolver.from_config(DeliveryConfig(mode="mx")).named_hops("[127.0.0.1]"))
    assert (refused.value.code, refused.value.status) == (550, "5.4.4")


@pytest.mark.parametrize(("code", "text", "status"), [
    (550, "5.1.1 no such user", "5.1.1"),
    (554, "transaction failed", "5.0.0"),
    (None, "4.4.7 timed out (gave up: queue lifetime exceeded)", "4.4.7"),
    (None, "connection refused", "5.0.0"),
])
def test_bounce_status_comes_from_the_text_else_the_code(
        code: int | None, text: str, status: str) -> None:
    """The DSN's Status: the enhanced code at the start of the reply, else the code's class."""
    r = AttemptResult(message_id=1, idx=0, recipient="x@example.net", username="u",
                      domain="example.com", next_hop="-", code=code, text=text,
                      outcome="failed", ts=0.0)
    assert status_of(r) == status
