"""Micro-benchmark of relayd.smtp.server's own per-connection and per-message cost, in process.

One S1-shaped connection (greeting, EHLO, MAIL, RCPT, DATA with 1 KB, QUIT) fed
through ``data_received`` of a ``RelaySMTP`` (and its ``Session``) on a fake
transport, with a spool that commits instantly and no-op events: what the SMTP
layer itself costs on the loop thread, without sockets, SQLite or logging. An
S2-shaped variant sends 20 messages on one connection, with a commit that
returns at once or (as the real group commit does) after one loop turn.

Run: .venv/bin/pytest bench/micro/test_bench_smtp.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from relayd.directory.accounts import Account, Directory, Domain
from relayd.smtp import policy
from relayd.smtp.server import RelaySMTP, SmtpContext
from relayd.store.spool import IdAllocator, NewMessage

BODY = b"Subject: bench\r\n\r\n" + (b"y" * 78 + b"\r\n") * 12
TRANSACTION = (b"MAIL FROM:<a@bench.example>\r\nRCPT TO:<r@dest.test>\r\nDATA\r\n"
               + BODY + b".\r\n")


class _Transport:
    def __init__(self) -> None:
        self.out = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.out:
            assert data.startswith(b"220 "), data
        self.out += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0


class _Spool:
    ids = IdAllocator()

    async def accept(self, msg: NewMessage, then: Any = None) -> None:
        if then is not None:
            then(msg)


class _WaitingSpool(_Spool):
    """Like the real group commit: ``accept`` waits for a future the writer resolves."""

    async def accept(self, msg: NewMessage, then: Any = None) -> None:
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(done.set_result, None)
        await done
        if then is not None:
            then(msg)


class _Scheduler:
    def queued_count(self, account_id: int) -> int:
        return 0

    def enqueue_new(self, msg: NewMessage) -> None:
        return None


class _Events:
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def rejected(self, *a: Any, **k: Any) -> None: ...
    def auth_result(self, *a: Any, **k: Any) -> None: ...
    def accepted(self, *a: Any, **k: Any) -> None: ...
    def error(self, *a: Any, **k: Any) -> None:
        raise AssertionError(a)


@pytest.fixture
def ctx() -> SmtpContext:
    directory = Directory()
    domain = Domain(1, "bench.example", "s1")
    directory.put_domain(domain)
    directory.put_account(Account(id=1, username="bench", domain=domain, password_hash="",
                                  networks=["127.0.0.0/8"]))
    directory.rebuild_networks()
    return SmtpContext(
        hostname="relayd.bench.local", directory=directory, credentials=None,  # type: ignore[arg-type]
        spool=_Spool(), scheduler=_Scheduler(), signer=None,  # type: ignore[arg-type]
        events=_Events(), plaintext_auth=policy.PlaintextAuthPolicy([]),
        throttle=policy.AuthThrottle(free_failures=3, max_failures=10, base_delay=1.0,
                                     max_delay=10.0),
        max_message_size=10 << 20, max_recipients=100, max_queued_per_account=1000,
        min_free_disk=0, free_disk=lambda: 1 << 40, idle_timeout=300.0, min_data_rate=0,
        max_commands=1000, max_connections=1000, max_connections_per_ip=1000, smtputf8=True,
    )


@pytest.fixture
def waiting_ctx(ctx: SmtpContext) -> SmtpContext:
    ctx.spool = _WaitingSpool()  # type: ignore[assignment]
    return ctx


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    try:
        import uvloop
        lp: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _session(loop: asyncio.AbstractEventLoop, ctx: SmtpContext, messages: int) -> int:
    async def run() -> int:
        proto = RelaySMTP(ctx)
        transport = _Transport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the greeting goes out first (input before it gets 554)
        proto.data_received(b"EHLO client.bench\r\n" + TRANSACTION * messages + b"QUIT\r\n")
        while not transport.closed:  # the commits run as tasks: until QUIT closes
            await asyncio.sleep(0)
        proto.connection_lost(None)
        return transport.out

    return loop.run_until_complete(run())


def test_smtp_connection_one_message(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop,
                                     ctx: SmtpContext) -> None:
    """S1 shape: one connection, one 1 KB message (the SMTP layer only)."""
    assert benchmark(_session, loop, ctx, 1) > 0


def test_smtp_connection_20_messages(benchmark: BenchmarkFixture,
                                     loop: asyncio.AbstractEventLoop, ctx: SmtpContext) -> None:
    """S2 shape: 20 messages of 1 KB on one connection (divide by 20 per message)."""
    assert benchmark(_session, loop, ctx, 20) > 0


def test_smtp_connection_20_messages_commit_waits(benchmark: BenchmarkFixture,
                                                  loop: asyncio.AbstractEventLoop,
                                                  waiting_ctx: SmtpContext) -> None:
    """S2 shape with a commit that waits one loop turn, as the real group commit does."""
    assert benchmark(_session, loop, waiting_ctx, 20) > 0
