"""One log line per SMTP rejection, rate-limited per (reason, client address) (issue 13 item 6).

In-process relays over real sockets, their log configured into a buffer;
clients bind their own 127.0.0.x. Then the pure relayd.observe.logbudget.LogBudget
decisions with an injected clock.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from relayd.observe import logs as rlog
from relayd.observe.logbudget import LogBudget
from tests.conftest import RelayFactory, RelayHandle
from tests.rawsmtp import Raw
from tests.test_ops_support import scrape, value


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """relayd's log, configured (level info) into a buffer; reset afterwards."""
    stream = io.StringIO()
    rlog.configure("info", stream)
    yield stream
    rlog.reset()


def _events(out: io.StringIO, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(ln) for ln in out.getvalue().splitlines() if ln.strip()]
    return [x for x in lines if x.get("event") == name]


async def _account(h: RelayHandle) -> tuple[str, str]:
    await h.ctl.add_domain("example.com")
    return await h.ctl.add_user("example.com")


def _limits(burst: int, per_minute: int = 0, summary: float = 60.0,
            **smtp: Any) -> dict[str, Any]:
    return {"server": {"log_rejections_burst": burst, "log_rejections_per_minute": per_minute,
                       "log_rejections_summary_seconds": summary}, "smtp": smtp}


async def _unknown_commands(h: RelayHandle, source: str, n: int) -> None:
    c = await Raw.open(h.host, h.port, source=source)
    for _ in range(n):
        assert (await c.cmd("FROB")).startswith("500 5.5.1")
    await c.quit()


# --- the line --------------------------------------------------------------------


async def test_a_4xx_rejection_is_logged_with_its_reason(
        relay_factory: RelayFactory, out: io.StringIO) -> None:
    """452 too_many_recipients gives one smtp_rejected line: reason, code, sid, client, user."""
    h = await relay_factory({"smtp": {"max_recipients": 1}})
    user, password = await _account(h)
    c = await Raw.open(h.host, h.port, source="127.0.0.2")
    assert (await c.login(user, password)).startswith("235 ")
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<a@dest.test>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<b@dest.test>")).startswith("452 4.5.3")
    await c.quit()
    (line,) = [x for x in _events(out, "smtp_rejected") if x["reason"] == "too_many_recipients"]
    assert (line["code"], line["client"], line["user"], line["level"]) == (
        452, "127.0.0.2", user, "info")
    assert len(line["sid"]) == 12 and int(line["sid"], 16) >= 0
    assert password not in out.getvalue()


async def test_every_rejection_is_logged_once_within_the_budget(
        relay_factory: RelayFactory, out: io.StringIO) -> None:
    """Each refused command (4xx and 5xx) is one line, as many as the metric counts."""
    h = await relay_factory({"smtp": {"max_recipients": 1}})
    user, password = await _account(h)
    c = await Raw.open(h.host, h.port, source="127.0.0.2")
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("503 ")  # before EHLO
    assert (await c.login(user, password)).startswith("235 ")
    assert (await c.cmd("MAIL FROM:<app@other.test>")).startswith("553 ")
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<a@dest.test>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<b@dest.test>")).startswith("452 ")
    assert (await c.cmd("FROB")).startswith("500 ")
    await c.quit()
    reasons = sorted(x["reason"] for x in _events(out, "smtp_rejected"))
    assert reasons == ["bad_sequence", "sender_not_allowed", "too_many_recipients",
                       "unknown_command"]
    samples = await scrape(h.metrics_url)
    for reason in reasons:
        assert value(samples, "relayd_smtp_rejections_total", reason=reason) == 1


# --- the rate limit ----------------------------------------------------------------


async def test_a_flood_from_one_address_is_sampled_then_summarised(
        relay_factory: RelayFactory, out: io.StringIO) -> None:
    """Past the burst an address's lines are counted, reported by one summary line when
    the window rolls over; the metric still counts every rejection."""
    h = await relay_factory(_limits(burst=3, summary=0.4))
    await _unknown_commands(h, "127.0.0.2", 10)
    lines = [x for x in _events(out, "smtp_rejected") if x["client"] == "127.0.0.2"]
    assert len(lines) == 3
    for _ in range(50):
        if _events(out, "smtp_rejections_suppressed"):
            break
        await asyncio.sleep(0.05)
    (summary,) = _events(out, "smtp_rejections_suppressed")
    assert (summary["client"], summary["reason"], summary["suppressed"], summary["level"]) == (
        "127.0.0.2", "unknown_command", 7, "warning")
    samples = await scrape(h.metrics_url)
    assert value(samples, "relayd_smtp_rejections_total", reason="unknown_command") == 10


async def test_one_loud_address_does_not_hide_another(
        relay_factory: RelayFactory, out: io.StringIO) -> None:
    """After 127.0.0.2 used up its budget for a reason, 127.0.0.3's line of it is written."""
    h = await relay_factory(_limits(burst=2))
    await _unknown_commands(h, "127.0.0.2", 8)
    await _unknown_commands(h, "127.0.0.3", 1)
    clients = [x["client"] for x in _events(out, "smtp_rejected")]
    assert clients == ["127.0.0.2", "127.0.0.2", "127.0.0.3"]


async def test_the_summary_precedes_the_next_written_line(
        relay_factory: RelayFactory, out: io.StringIO) -> None:
    """When the bucket refills, the count of the lines held back comes just before the line."""
    h = await relay_factory(_limits(burst=1, per_minute=120))  # one more line every 0.5 s
    c = await Raw.open(h.host, h.port, source="127.0.0.2")
    for _ in range(4):
        assert (await c.cmd("FROB")).startswith("500 ")
    await asyncio.sleep(0.6)
    assert (await c.cmd("FROB")).startswith("500 ")
    await c.quit()
    names = [(x["event"], x.get("suppressed")) for x in
             (json.loads(ln) for ln in out.getvalue().splitlines())
             if x["event"] in ("smtp_rejected", "smtp_rejections_suppressed")]
    assert names == [("smtp_rejected", None), ("smtp_rejections_suppressed", 3),
                     ("smtp_rejected", None)]


async def test_failed_auth_lines_share_the_per_address_budget(
        relay_factory: RelayFactory, out: io.StringIO) -> None:
    """auth_failed lines past the burst are counted, and the count is written at stop."""
    h = await relay_factory(_limits(burst=2, auth_failures_before_delay=10))
    user, _ = await _account(h)
    for i in range(5):
        c = await Raw.open(h.host, h.port, source="127.0.0.2")
        assert (await c.login(user, f"wrong-{i}")).startswith("535 ")
        await c.quit()
    assert [x["client"] for x in _events(out, "auth_failed")] == ["127.0.0.2"] * 2
    await h.stop()
    (summary,) = _events(out, "smtp_rejections_suppressed")
    assert (summary["client"], summary["reason"], summary["suppressed"]) == (
        "127.0.0.2", "auth_failed", 3)


# --- LogBudget, pure ------------------------------------------------------------------


def test_budget_writes_the_burst_then_the_refill() -> None:
    """A key writes ``burst`` lines at once, then ``per_minute`` a minute."""
    b = LogBudget(burst=3, per_minute=6, max_per_second=1000)
    assert [b.admit("syntax", "192.0.2.1", 0.0)[0] for _ in range(5)] == [
        True, True, True, False, False]
    assert b.admit("syntax", "192.0.2.1", 9.0)[0] is False  # 0.9 of a token
    assert b.admit("syntax", "192.0.2.1", 10.5) == (True, 3)  # and the 3 held back


def test_budget_keys_are_independent() -> None:
    """Another address, or another reason from the same address, has its own bucket."""
    b = LogBudget(burst=1, per_minute=0, max_per_second=1000)
    assert b.admit("syntax", "192.0.2.1", 0.0)[0]
    assert not b.admit("syntax", "192.0.2.1", 0.0)[0]
    assert b.admit("syntax", "192.0.2.2", 0.0)[0]
    assert b.admit("auth_failed", "192.0.2.1", 0.0)[0]


def test_budget_global_ceiling_bounds_many_addresses() -> None:
    """All keys together write at most max_per_second lines a second; the rest is counted
    under each key and reported."""
    b = LogBudget(burst=5, per_minute=0, max_per_second=10, summary_seconds=1.0)
    written = sum(b.admit("pregreet", f"2001:db8::{i:x}", 0.5)[0] for i in range(100))
    assert written == 10
    assert b.admit("pregreet", "2001:db8::ffff", 1.0)[0]  # 0.5 s refilled 5 tokens
    reports = b.due(3.0)
    assert sum(n for _, _, n in reports) == 90


def test_budget_summary_is_due_after_the_window_once() -> None:
    """due() reports a key's count summary_seconds after its first held-back line, once."""
    b = LogBudget(burst=1, per_minute=0, max_per_second=1000, summary_seconds=60.0)
    b.admit("syntax", "192.0.2.1", 0.0)
    b.admit("syntax", "192.0.2.1", 1.0)
    b.admit("syntax", "192.0.2.1", 2.0)
    assert b.next_due() == 61.0
    assert b.due(60.9) == []
    assert b.due(61.0) == [("syntax", "192.0.2.1", 2)]
    assert b.due(200.0) == [] and b.next_due() is None


def test_budget_forgets_least_recent_keys_keeping_their_counts() -> None:
    """Past max_keys the oldest key goes; its unreported count is reported without address."""
    b = LogBudget(burst=1, per_minute=0, max_per_second=1000, max_keys=2)
    for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"):
        b.admit("syntax", ip, 0.0)
    assert len(b) == 2
    assert b.due(0.0, everything=True) == [("syntax", "", 1)]


def test_budget_refuses_nonsense_settings() -> None:
    """A zero burst or ceiling is a ValueError, not a budget that writes nothing."""
    with pytest.raises(ValueError):
        LogBudget(burst=0, per_minute=1, max_per_second=1)
    with pytest.raises(ValueError):
        LogBudget(burst=1, per_minute=1, max_per_second=0)
