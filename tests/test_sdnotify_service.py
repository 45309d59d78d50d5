"""systemd notifications of a real relayd process: STATUS=, the watchdog, a failed reload.

relayd runs as a subprocess with ``NOTIFY_SOCKET`` pointing to a datagram
socket the test owns (tests.test_ops_support.NotifySocket) and, where the
watchdog is tested, ``WATCHDOG_USEC`` set as systemd sets it for
``WatchdogSec=``. The pure helpers of relayd.observe.sdnotify are tested beside them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.observe import sdnotify
from tests.procs import BASE_TOML, RelayProcess, free_port
from tests.test_ops_support import NotifySocket, wait_log


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    """A stand-in for systemd's notify socket."""
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()



def _fields(message: str) -> dict[str, str]:
    """The KEY=VALUE lines of one notification datagram."""
    return dict(line.split("=", 1) for line in message.split("\n") if line)


async def _started(tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess],
                   **env: str) -> RelayProcess:
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}",
                      env={"NOTIFY_SOCKET": notify.path, **env})
    procs.append(rp)
    await rp.start()
    await notify.wait_for("READY=1")
    return rp


async def test_ready_carries_a_status_with_listeners_and_queue(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """READY=1 comes with a STATUS= naming the SMTP listener and the queue depth."""
    rp = await _started(tmp_path, notify, procs)
    ready = _fields(notify.messages[0])
    assert ready["READY"] == "1"
    assert f"smtp=127.0.0.1:{rp.port}" in ready["STATUS"]
    assert f"control={rp.sock}" in ready["STATUS"]
    assert "queue 0" in ready["STATUS"]


async def test_watchdog_is_fed_at_half_the_interval(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """With WATCHDOG_USEC=1 s, WATCHDOG=1 arrives about every half second."""
    await _started(tmp_path, notify, procs, WATCHDOG_USEC="1000000")
    notify.messages.clear()
    await asyncio.sleep(2.6)
    pings = [m for m in notify.drain() if m == "WATCHDOG=1"]
    assert 3 <= len(pings) <= 7, notify.messages


async def test_no_watchdog_without_watchdog_usec(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """Without WATCHDOG_USEC (no WatchdogSec=), relayd sends no WATCHDOG=1."""
    await _started(tmp_path, notify, procs)
    await asyncio.sleep(1.0)
    assert not [m for m in notify.drain() if "WATCHDOG" in m]


async def test_watchdog_for_another_pid_is_not_fed(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """A WATCHDOG_PID naming another process (inherited variables) turns the pings off."""
    await _started(tmp_path, notify, procs, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    await asyncio.sleep(1.0)
    assert not [m for m in notify.drain() if "WATCHDOG" in m]


@pytest.mark.slow
async def test_status_follows_the_queue_without_repeating_itself(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """A queued message shows in STATUS= within a status period; an unchanged one is not resent."""
    rp = await _started(tmp_path, notify, procs)
    client = await rp.sender()  # the smarthost is a closed port: the message stays queued
    await client.sendmail("app@example.com", ["rcpt@example.org"],
                          b"From: app@example.com\r\nSubject: t\r\n\r\nbody\r\n")
    await client.quit()
    await notify.wait_for("queue 1", timeout=3 * 5.0 + 5)
    await asyncio.sleep(5.5)  # one more status period, nothing changed
    statuses = [m for m in notify.drain()[1:] if m.startswith("STATUS=")]
    assert all(a != b for a, b in itertools.pairwise(statuses)), statuses


async def test_failed_reload_is_reported_in_the_status(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """A bad file at SIGHUP: RELOADING=1, then READY=1 with STATUS= saying the reload failed."""
    rp = await _started(tmp_path, notify, procs)
    rp.config.write_text(BASE_TOML + "[smtp]\nmax_recipient = 10\n")
    notify.messages.clear()
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    await wait_log(rp, "reload_failed")
    await notify.wait_for("READY=1")
    reloading, done = [_fields(m) for m in notify.messages[:2]]
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert done["READY"] == "1"
    assert done["STATUS"].startswith("reload failed, running configuration kept:")
    assert "max_recipient" in done["STATUS"]
    assert f"smtp=127.0.0.1:{rp.port}" in done["STATUS"]


async def test_good_reload_clears_the_failure(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """After a failed reload, a good one ends with READY=1 and a status without the failure."""
    rp = await _started(tmp_path, notify, procs)
    assert rp.proc is not None
    rp.config.write_text(BASE_TOML + "[smtp]\nmax_recipient = 10\n")
    rp.proc.send_signal(signal.SIGHUP)
    await wait_log(rp, "reload_failed")
    await notify.wait_for("reload failed")  # that reload's READY=1 is in, not sent later
    rp.config.write_text(BASE_TOML + "[smtp]\nmax_recipients = 10\n")
    notify.drain()
    notify.messages.clear()
    rp.proc.send_signal(signal.SIGHUP)
    await wait_log(rp, "reloaded")
    await notify.wait_for("READY=1")
    done = _fields(next(m for m in notify.messages if "READY=1" in m))
    assert done["STATUS"].startswith("listening on ")


# --- pure helpers ----------------------------------------------------------------


def test_watchdog_interval_is_half_the_timeout() -> None:
    """WATCHDOG_USEC=30 s gives a ping every 15 s; our own WATCHDOG_PID is accepted."""
    assert sdnotify.watchdog_interval("30000000", None, 42) == 15.0
    assert sdnotify.watchdog_interval("30000000", "42", 42) == 15.0


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon"])
def test_watchdog_interval_off_without_a_usable_timeout(usec: str | None) -> None:
    """No, zero, negative or malformed WATCHDOG_USEC means no watchdog."""
    assert sdnotify.watchdog_interval(usec, None, os.getpid()) is None


def test_status_line_lists_non_empty_states() -> None:
    """The status names the listeners, the total and each non-empty queue state."""
    line = sdnotify.status_line(["smtp=127.0.0.1:25"], {"queued": 2, "held": 0, "deferred": 1})
    assert line == "listening on smtp=127.0.0.1:25; queue 3 (2 queued, 1 deferred)"
    unknown = "listening on nothing; queue unknown (spool unreadable)"
    assert sdnotify.status_line([], None) == unknown
