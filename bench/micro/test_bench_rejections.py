"""Micro-benchmarks: the cost of one SMTP rejection in relayd.observe.events (issue 13 item 6).

Not the hot path, but a flood of rejections is an attack path. Each case is
``Observer.rejected`` as relayd.smtp.server calls it, logging configured (level info)
into a stream that discards its input:

- written: a rejection whose line the budget lets out (counter + budget + one
  JSON line through the fast Event path);
- suppressed: a flood from one address past its burst (counter + budget only);
- rotating: a flood from ever new addresses past the global ceiling (the budget's
  key table at its bound, evicting the oldest key on each call);
- unlimited: the line written without a budget (what the budget saves).

Run: .venv/bin/pytest bench/micro/test_bench_rejections.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from pytest_benchmark.fixture import BenchmarkFixture

from relayd.observe import logs as rlog
from relayd.observe.events import Observer
from relayd.observe.logbudget import LogBudget
from relayd.observe.metrics import Metrics
from relayd.smtp import replies
from relayd.smtp.server import SessionState


class _Null(io.TextIOBase):
    """A text stream that drops what it is given."""

    def write(self, s: str) -> int:
        return len(s)


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    rlog.configure("info", _Null())  # type: ignore[arg-type]
    yield
    rlog.reset()


def _observer(budget: LogBudget | None, clock: list[float]) -> Observer:
    return Observer(Metrics(CollectorRegistry()), rlog.get_logger("relayd"), budget,
                    clock=lambda: clock[0])


def test_rejection_written(benchmark: BenchmarkFixture) -> None:
    """A rejection within its budget: the line is written."""
    clock = [0.0]
    obs = _observer(LogBudget(burst=10**9, per_minute=0, max_per_second=1e12), clock)
    session = SessionState(peer_ip="192.0.2.7", sid="0123456789ab")
    benchmark(obs.rejected, replies.TOO_MANY_RECIPIENTS, session)


def test_rejection_suppressed(benchmark: BenchmarkFixture) -> None:
    """A flood from one address past its burst: counted, not written."""
    clock = [0.0]
    obs = _observer(LogBudget(burst=1, per_minute=0, max_per_second=100), clock)
    session = SessionState(peer_ip="192.0.2.7", sid="0123456789ab")
    obs.rejected(replies.UNKNOWN_COMMAND, session)
    benchmark(obs.rejected, replies.UNKNOWN_COMMAND, session)


def test_rejection_rotating_addresses(benchmark: BenchmarkFixture) -> None:
    """A flood from ever new addresses past the global ceiling, key table full."""
    clock = [0.0]
    obs = _observer(LogBudget(burst=20, per_minute=6, max_per_second=100), clock)
    session = SessionState(peer_ip="", sid="0123456789ab")
    counter = itertools.count()
    for i in range(10_100):  # fill the table and use up the global budget
        session.peer_ip = f"2001:db8::{i:x}"
        obs.rejected(replies.PREGREET if hasattr(replies, "PREGREET")
                     else replies.UNKNOWN_COMMAND, session)

    def one() -> None:
        session.peer_ip = f"2001:db8:1::{next(counter):x}"
        obs.rejected(replies.UNKNOWN_COMMAND, session)

    benchmark(one)


def test_rejection_unlimited(benchmark: BenchmarkFixture) -> None:
    """The same line without a budget (every rejection written)."""
    obs = _observer(None, [0.0])
    session = SessionState(peer_ip="192.0.2.7", sid="0123456789ab")
    benchmark(obs.rejected, replies.TOO_MANY_RECIPIENTS, session)
