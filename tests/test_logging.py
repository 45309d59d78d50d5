"""relayd.observe.logs: JSON lines, context, level filtering, secrets masked."""

from __future__ import annotations

import io
import json
import logging as stdlib_logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from relayd.observe import logs as rlog

PASSWORD = "s3cret-Pa55word"
# base64 of "\0alice\0s3cret-Pa55word": what AUTH PLAIN carries.
PLAIN_B64 = "AGFsaWNlAHMzY3JldC1QYTU1d29yZA=="


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """A stream logging is configured to write to, reset afterwards."""
    stream = io.StringIO()
    rlog.configure("info", stream)
    yield stream
    rlog.reset()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Each line of the stream decoded as JSON (fails if a line is not JSON)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_line_is_a_json_object(out: io.StringIO) -> None:
    """Every emitted line parses as a JSON object on its own."""
    log = rlog.get_logger("relayd.test")
    log.info("one")
    log.warning("two", n=2)
    records = lines(out)
    assert [r["event"] for r in records] == ["one", "two"]


def test_line_carries_event_level_logger_and_context(out: io.StringIO) -> None:
    """A line holds the event, its level, the logger name and bound context."""
    log = rlog.get_logger("relayd.smtp.server").bind(peer="192.0.2.7")
    log.info("session opened", session_id="abc")
    (record,) = lines(out)
    assert record["event"] == "session opened"
    assert record["level"] == "info"
    assert record["logger"] == "relayd.smtp.server"
    assert record["peer"] == "192.0.2.7"
    assert record["session_id"] == "abc"


def test_timestamp_is_iso_utc(out: io.StringIO) -> None:
    """The timestamp is ISO 8601 in UTC (Z suffix)."""
    rlog.get_logger("t").info("x")
    (record,) = lines(out)
    assert record["timestamp"].endswith("Z")
    assert "T" in record["timestamp"]


def test_level_below_threshold_is_dropped() -> None:
    """With level "warning", info and debug lines are not written."""
    stream = io.StringIO()
    rlog.configure("warning", stream)
    try:
        log = rlog.get_logger("t")
        log.debug("d")
        log.info("i")
        log.warning("w")
        assert [r["event"] for r in lines(stream)] == ["w"]
    finally:
        structlog.reset_defaults()


def test_unknown_level_is_refused() -> None:
    """configure() rejects a level name it does not know, naming it."""
    with pytest.raises(ValueError, match="verbose"):
        rlog.configure("verbose", io.StringIO())


@pytest.mark.parametrize(
    "key", ["password", "Password", "passwd", "secret", "auth_data", "Authorization",
            "token", "new_password", "smarthost_password"],
)
def test_secret_key_value_is_masked(out: io.StringIO, key: str) -> None:
    """A value logged under a secret key name is written as ***."""
    rlog.get_logger("t").info("x", **{key: PASSWORD})
    (record,) = lines(out)
    assert record[key] == "***"
    assert PASSWORD not in out.getvalue()


def test_secret_keys_are_masked_inside_nested_dicts(out: io.StringIO) -> None:
    """Secret keys are masked at any depth of dicts and lists."""
    rlog.get_logger("t").info(
        "config", smarthost={"host": "mx", "auth": {"Password": PASSWORD}},
        routes=[{"token": PASSWORD}],
    )
    (record,) = lines(out)
    assert record["smarthost"] == {"host": "mx", "auth": {"Password": "***"}}
    assert record["routes"] == [{"token": "***"}]
    assert PASSWORD not in out.getvalue()


@pytest.mark.parametrize(
    "command",
    [f"AUTH PLAIN {PLAIN_B64}", f"auth plain {PLAIN_B64}", f"AUTH LOGIN {PLAIN_B64}"],
)
def test_auth_command_payload_is_masked(out: io.StringIO, command: str) -> None:
    """The base64 argument of an AUTH command in any string value is masked."""
    rlog.get_logger("t").info("command", line=command)
    (record,) = lines(out)
    assert record["line"] == command.rsplit(" ", 1)[0] + " ***"
    assert PLAIN_B64 not in out.getvalue()


def test_auth_command_in_event_text_is_masked(out: io.StringIO) -> None:
    """An AUTH payload inside the event message itself is masked."""
    rlog.get_logger("t").info(f"client sent AUTH PLAIN {PLAIN_B64} twice")
    (record,) = lines(out)
    assert record["event"] == "client sent AUTH PLAIN *** twice"


def test_auth_command_in_bytes_is_masked(out: io.StringIO) -> None:
    """An AUTH payload in a bytes value (a raw protocol line) is masked."""
    rlog.get_logger("t").info("raw", line=f"AUTH PLAIN {PLAIN_B64}\r\n".encode())
    assert PLAIN_B64 not in out.getvalue()
    assert "AUTH PLAIN ***" in lines(out)[0]["line"]


def test_ordinary_text_mentioning_auth_is_untouched(out: io.StringIO) -> None:
    """Text like "auth failed for alice" is not mistaken for an AUTH command."""
    rlog.get_logger("t").info("auth failed for alice", reason="auth_failed")
    (record,) = lines(out)
    assert record["event"] == "auth failed for alice"


def test_stdlib_records_come_out_as_masked_json(out: io.StringIO) -> None:
    """A stdlib logging record (as aiosmtpd emits) becomes a masked JSON line."""
    line = f"AUTH PLAIN {PLAIN_B64}"
    stdlib_logging.getLogger("mail.log").warning("%r readline: %r", "peer", line)
    (record,) = lines(out)
    assert record["logger"] == "mail.log"
    assert record["level"] == "warning"
    assert "AUTH PLAIN ***" in record["event"]
    assert PLAIN_B64 not in out.getvalue()


def test_configure_twice_installs_one_stdlib_handler(out: io.StringIO) -> None:
    """Reconfiguring replaces the stdlib handler instead of duplicating lines."""
    second = io.StringIO()
    rlog.configure("info", second)
    stdlib_logging.getLogger("x").warning("once")
    assert out.getvalue() == ""
    assert [r["event"] for r in lines(second)] == ["once"]


def test_exception_text_is_logged_and_masked(out: io.StringIO) -> None:
    """log.exception writes the traceback, with AUTH payloads masked in it."""
    log = rlog.get_logger("t")
    try:
        raise RuntimeError(f"bad line AUTH PLAIN {PLAIN_B64}")
    except RuntimeError:
        log.exception("failed")
    (record,) = lines(out)
    assert record["level"] == "error"
    assert "RuntimeError" in record["exception"]
    assert PLAIN_B64 not in out.getvalue()


def test_logger_made_before_configure_uses_the_configuration() -> None:
    """A module-level logger created before configure() writes where configure() says."""
    structlog.reset_defaults()
    early = rlog.get_logger("relayd.early")
    stream = io.StringIO()
    rlog.configure("info", stream)
    try:
        early.info("hello")
        assert lines(stream)[0]["logger"] == "relayd.early"
    finally:
        structlog.reset_defaults()


def test_event_writes_the_line_logger_info_writes(out: io.StringIO) -> None:
    """rlog.Event (the hot-path lines): same keys, order, values and masking as log.info."""
    log = rlog.get_logger("relayd")
    fields = {"id": "0000000000AB", "rcpt": "a@example.com", "code": None, "size": 10,
              "reply": f"said AUTH PLAIN {PLAIN_B64}", "password": PASSWORD}
    structlog.contextvars.bind_contextvars(peer_uid=7)
    try:
        log.info("delivery_attempt", **dict(fields))
        rlog.Event(log, "delivery_attempt")(dict(fields))
    finally:
        structlog.contextvars.unbind_contextvars("peer_uid")
    a, b = out.getvalue().splitlines()
    assert PASSWORD not in b and PLAIN_B64 not in b
    da, db = json.loads(a), json.loads(b)
    assert list(da) == list(db)
    assert db["timestamp"].endswith("Z") and "T" in db["timestamp"]
    da.pop("timestamp"), db.pop("timestamp")
    assert da == db


def test_event_follows_the_level_and_other_configurations(out: io.StringIO) -> None:
    """Below the configured level nothing is written; under another structlog
    configuration (as a test may install) it is the plain log.info call."""
    rlog.configure("warning", out)
    rlog.Event(rlog.get_logger("relayd"), "smtp_accepted")({"id": "x"})
    assert out.getvalue() == ""
    rlog.configure("info", out)
    with structlog.testing.capture_logs() as captured:
        rlog.Event(rlog.get_logger("relayd"), "smtp_accepted")({"id": "x"})
    assert out.getvalue() == ""
    assert captured == [{"id": "x", "event": "smtp_accepted", "log_level": "info"}]


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_event_lines_of_one_loop_turn_share_one_flush(out: io.StringIO) -> None:
    """Inside the event loop, hot-path lines are flushed once per loop turn, in order;
    a structlog line in between flushes them at once (so order is kept)."""
    import asyncio

    stream = _CountingStream()
    rlog.configure("info", stream)  # the fixture's teardown undoes this too
    ev = rlog.Event(rlog.get_logger("relayd"), "smtp_accepted")

    async def scenario() -> tuple[int, int, int]:
        for n in range(3):
            ev({"id": str(n)})
        before = stream.flushes
        await asyncio.sleep(0)
        after_turn = stream.flushes
        ev({"id": "3"})
        rlog.get_logger("relayd").info("user_disabled")  # flushes per line
        await asyncio.sleep(0)
        return before, after_turn, stream.flushes

    before, after_turn, end = asyncio.run(scenario())
    assert before == 0 and after_turn == 1
    assert end >= 2
    assert [r["event"] for r in lines(stream)] == ["smtp_accepted"] * 4 + ["user_disabled"]
    assert [r.get("id") for r in lines(stream)][:4] == ["0", "1", "2", "3"]
    ev({"id": "outside"})  # no running loop: flushed at once
    assert stream.flushes == end + 1
