"""Micro-benchmarks of the inbound hot path: credential check, policy decisions, group commit.

Issue 7 asks for: a credential-cache hit (target < 20 us) against a full argon2
verification with the default parameters (the cache must make AUTH >= 200x
cheaper); the policy decisions of one transaction; a spool group commit of 1
and of 64 messages (``synchronous=FULL``: one fsync per commit, shared).

Run: .venv/bin/pytest bench/micro/test_bench_hotpath.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from relayd.config import CredentialsConfig
from relayd.directory.accounts import Account, Domain
from relayd.directory.credentials import CredentialCache, Hasher
from relayd.smtp import policy
from relayd.store.spool import NewMessage, Spool

T = TypeVar("T")
PASSWORD = b"correct horse battery staple"
BODY_1K = b"Subject: bench\r\n\r\n" + b"x" * 76 + b"\r\n" + (b"y" * 78 + b"\r\n") * 12


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that must finish without suspending (a cache hit never awaits)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine suspended: not a cache hit")


@pytest.fixture(scope="module")
def hasher() -> Iterator[Hasher]:
    """argon2id with relayd's default parameters."""
    h = Hasher(CredentialsConfig())
    yield h
    h.close()


@pytest.fixture(scope="module")
def account(hasher: Hasher) -> Account:
    return Account(id=7, username="bench-user", domain=Domain(1, "bench.example", "s1"),
                   password_hash=hasher.hash_sync(PASSWORD.decode()))


def test_credential_cache_hit(benchmark: BenchmarkFixture, hasher: Hasher,
                              account: Account) -> None:
    """A repeated successful AUTH: keyed BLAKE2b digest + constant-time compare."""
    cache = CredentialCache(hasher)
    first = asyncio.run(cache.check(account, PASSWORD))
    assert first.ok and not first.cache_hit
    out = benchmark(lambda: _run_sync(cache.check(account, PASSWORD)))
    assert out.ok and out.cache_hit


def test_argon2_full_verification(benchmark: BenchmarkFixture, hasher: Hasher,
                                  account: Account) -> None:
    """What every AUTH would cost without the cache (argon2id t=3, m=64 MiB, p=4)."""
    ok = benchmark.pedantic(hasher._verify, args=(account.password_hash, PASSWORD),
                            rounds=10, iterations=1, warmup_rounds=1)
    assert ok


# -- policy decisions of one transaction ---------------------------------------------

def test_policy_mail_decisions(benchmark: BenchmarkFixture, account: Account) -> None:
    """MAIL: declared size, sender domain, queue room (the three checks smtp_MAIL makes)."""
    def mail() -> object:
        return (policy.declared_size_ok(1024, 10 << 20)
                or policy.sender_allowed(account, "bench.example")
                or policy.queue_room(3, 1000, 50 << 30, 1 << 30))

    assert benchmark(mail) is None


def test_policy_session_checks(benchmark: BenchmarkFixture, account: Account) -> None:
    """Per command: the epoch check, a recipient count, plaintext-AUTH network (cached)."""
    plain = policy.PlaintextAuthPolicy(["127.0.0.0/8", "10.0.0.0/8"])

    def checks() -> object:
        return (policy.session_account_valid(account, account.epoch),
                policy.recipient_allowed(1, 100), plain.allows("127.0.0.1"),
                policy.may_auth(tls_active=False, plaintext_ok=True))

    assert benchmark(checks) == (True, None, True, None)


def test_policy_data_checks_1k(benchmark: BenchmarkFixture) -> None:
    """End of DATA, 1 KB: bare CR/LF/NUL (smuggling) and line length."""
    def checks() -> object:
        return policy.data_violation(BODY_1K), policy.has_long_line(BODY_1K)

    assert benchmark(checks) == (None, False)


# -- spool group commit -------------------------------------------------------------------

@pytest.fixture
def spool_loop(tmp_path: Path) -> Iterator[tuple[asyncio.AbstractEventLoop, Spool]]:
    try:
        import uvloop
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    spool = Spool(str(tmp_path / "spool.db"))
    loop.run_until_complete(spool.open())
    yield loop, spool
    loop.run_until_complete(spool.close())
    loop.close()


def _commit(loop: asyncio.AbstractEventLoop, spool: Spool, n: int) -> None:
    async def commit() -> None:
        msgs = [NewMessage(id=spool.ids.next(), account_id=1, username="u",
                           domain="bench.example", sender="a@bench.example",
                           recipients=["r@dest.test"], data=BODY_1K, received_at=1.0)
                for _ in range(n)]
        await asyncio.gather(*(spool.accept(m) for m in msgs))

    loop.run_until_complete(commit())


@pytest.mark.parametrize("n", [1, 64])
def test_spool_group_commit(benchmark: BenchmarkFixture,
                            spool_loop: tuple[asyncio.AbstractEventLoop, Spool], n: int) -> None:
    """``n`` accepted 1 KB messages in one group commit (WAL, synchronous=FULL)."""
    loop, spool = spool_loop
    benchmark.extra_info["messages"] = n
    benchmark(_commit, loop, spool, n)
