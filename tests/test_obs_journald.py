"""journald priorities: the ``<N>`` prefix of sd-daemon(3) on each line (issue 13 item 6).

A real relayd process whose stdout is a file, with ``$JOURNAL_STREAM`` naming
that file's device:inode as systemd does for ``StandardOutput=journal``,
writes ``<N>{json}`` with N from the line's level, on structlog's path and the
fast Event path alike; with ``$JOURNAL_STREAM`` naming another file (stdout
redirected) it writes plain JSON. Then the mode switch in-process.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging as stdlib_logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from relayd.observe import logs as rlog
from tests.conftest import start_sink
from tests.procs import BASE_TOML, RelayProcess
from tests.rawsmtp import Raw

PREFIXED = re.compile(r"^<(\d)>(\{.*\})$")
EXTRA = """[smtp]
auth_failures_before_delay = 20
"""


def _journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


async def _scenario(tmp: Path, journal_stream_of: str) -> Path:
    """Run relayd with JOURNAL_STREAM naming ``journal_stream_of`` ("stdout" or "other");
    make it log at debug, info, warning and error; return its stdout file."""
    sink = await start_sink()
    rp = RelayProcess(tmp, sink.address)
    rp.config.write_text(
        BASE_TOML.replace('log_level = "info"', 'log_level = "debug"\n'
                          "log_rejections_burst = 1\nlog_rejections_summary_seconds = 0.3")
        + EXTRA)
    rp.log.touch()
    other = tmp / "elsewhere.log"
    other.touch()
    rp.env["JOURNAL_STREAM"] = _journal_stream(rp.log if journal_stream_of == "stdout"
                                               else other)
    await rp.start()
    try:
        await rp.ctl("domain", "add", "example.com")
        cred = await rp.ctl("user", "add", "--domain", "example.com")
        c = await Raw.open("127.0.0.1", rp.port)
        assert (await c.login(cred["username"], cred["password"])).startswith("235 ")  # debug
        assert (await c.cmd("FROB")).startswith("500 ")  # info, the Event path
        assert (await c.cmd("FROB")).startswith("500 ")  # held back: a warning summary
        await c.quit()
        await asyncio.sleep(0.8)
        rp.config.write_text("[server\n")  # SIGHUP with a broken file: reload_failed, error
        assert rp.proc is not None
        rp.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if "reload_failed" in rp.log.read_text():
                break
            await asyncio.sleep(0.05)
        assert await rp.terminate() == 0
    finally:
        if rp.proc is not None and rp.proc.returncode is None:
            await rp.kill()
        assert sink.server is not None
        sink.server.close()
    return rp.log


def _split(path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    """(priority digit or None, decoded JSON) of each line; fails on any other line."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    for line in path.read_text().splitlines():
        m = PREFIXED.match(line)
        out.append((m.group(1), json.loads(m.group(2))) if m else (None, json.loads(line)))
    return out


@pytest.fixture(scope="module")
def journal_log(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str | None, Any]]:
    """The lines of a relayd whose stdout is the journal stream."""
    return _split(uvloop.run(_scenario(tmp_path_factory.mktemp("journal"), "stdout")))


@pytest.mark.slow
def test_journal_stdout_gets_the_priority_of_each_level(
        journal_log: list[tuple[str | None, dict[str, Any]]]) -> None:
    """Every line is <N>{json}: 7 debug, 6 info, 4 warning, 3 error."""
    expected = {"debug": "7", "info": "6", "warning": "4", "error": "3"}
    assert journal_log
    assert all(prio == expected[line["level"]] for prio, line in journal_log)
    assert {line["level"] for _, line in journal_log} == set(expected)


@pytest.mark.slow
def test_journal_prefix_is_on_structlog_and_event_lines(
        journal_log: list[tuple[str | None, dict[str, Any]]]) -> None:
    """Lines of both writers carry it: relayd_started, auth_ok, smtp_rejected (Event),
    smtp_rejections_suppressed and reload_failed."""
    prio = {line["event"]: p for p, line in journal_log}
    assert (prio["relayd_started"], prio["auth_ok"], prio["smtp_rejected"],
            prio["smtp_rejections_suppressed"], prio["reload_failed"]) == (
        "6", "7", "6", "4", "3")


@pytest.mark.slow
def test_redirected_stdout_gets_plain_json(tmp_path: Path) -> None:
    """With $JOURNAL_STREAM naming another file than stdout, no line has a prefix."""
    lines = _split(uvloop.run(_scenario(tmp_path, "other")))
    assert {line["level"] for _, line in lines} == {"debug", "info", "warning", "error"}
    assert {prio for prio, _ in lines} == {None}


# --- the mode switch, in-process ---------------------------------------------------------


@pytest.fixture
def reset() -> Iterator[None]:
    """Undo configure() after the test."""
    yield
    rlog.reset()


def _lines_of(mode: str, stream: Any, log_stdlib: bool = False) -> list[str]:
    rlog.configure("info", stream, priority_prefix=mode)
    rlog.get_logger("t").warning("structlog_line")
    rlog.Event(rlog.get_logger("t"), "event_line")({"n": 1})
    if log_stdlib:
        stdlib_logging.getLogger("aiohttp.server").error("stdlib_line")
    stream.flush()
    stream.seek(0)
    return [ln.rstrip("\n") for ln in stream.readlines()]


def test_always_prefixes_every_writer(reset: None, tmp_path: Path) -> None:
    """"always": structlog, Event and stdlib-bridge lines each get their level's prefix."""
    with open(tmp_path / "out", "w+") as f:
        lines = _lines_of("always", f, log_stdlib=True)
    assert [ln[:3] for ln in lines] == ["<4>", "<6>", "<3>"]
    assert [json.loads(ln[3:])["event"] for ln in lines] == [
        "structlog_line", "event_line", "stdlib_line"]


def test_auto_needs_journal_stream_to_name_the_stream(
        reset: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto": prefixed when $JOURNAL_STREAM is the stream's dev:inode, else plain."""
    with open(tmp_path / "out", "w+") as f:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(tmp_path / "out"))
        assert all(ln.startswith("<") for ln in _lines_of("auto", f))
    for value in (None, "", "garbage", _journal_stream(tmp_path), "1:"):
        if value is None:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        else:
            monkeypatch.setenv("JOURNAL_STREAM", value)
        with open(tmp_path / f"out{value!s:.3}", "w+") as f:
            assert all(ln.startswith("{") for ln in _lines_of("auto", f)), value


def test_never_ignores_the_journal(
        reset: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"never": plain JSON even on the journal stream."""
    with open(tmp_path / "out", "w+") as f:
        monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(tmp_path / "out"))
        assert all(ln.startswith("{") for ln in _lines_of("never", f))


def test_a_stream_without_a_descriptor_is_not_the_journal() -> None:
    """A StringIO (no fileno) never matches, whatever $JOURNAL_STREAM says."""
    assert not rlog.is_journal_stream(io.StringIO(), "1:2")


def test_unknown_mode_is_refused() -> None:
    """configure() names a mode it does not know."""
    with pytest.raises(ValueError, match="sometimes"):
        rlog.configure("info", io.StringIO(), priority_prefix="sometimes")
