"""The shipped fail2ban filter and jail against real relayd log lines (issue 13 item 6).

One scenario (module fixture) runs a real relayd process, stdout into a file,
at log level debug (so success lines such as ``auth_ok`` are there too), with
clients bound to their own 127.0.0.x: 127.0.0.1 logs in, sends a message and
makes a syntax error; 127.0.0.2 fails with wrong passwords until relayd's
throttle refuses it (421), and past its log burst (a suppression summary);
127.0.0.3 fails with many unknown usernames until its whole address is
refused; 127.0.0.4 sends a PLAIN whose authzid differs (535 without a check);
127.0.0.5 talks before the greeting when relayd has that check. Then
``fail2ban-regex`` runs config/fail2ban/filter.d/relayd.conf over the file.

fail2ban comes from the system (``fail2ban-regex`` on PATH) or, as
scripts/install-debs.sh leaves it, unpacked under .cache/fail2ban; without it
the tests fail (tests/tools.py). FAIL2BAN_REGEX=path overrides the search.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import uvloop

from relayd.smtp.replies import REJECTION_REASONS
from tests.conftest import start_sink
from tests.procs import BASE_TOML, REPO, RelayProcess
from tests.rawsmtp import Raw
from tests.test_ops_support import log_lines
from tests.tools import missing

pytestmark = pytest.mark.slow

FILTER = REPO / "config" / "fail2ban" / "filter.d" / "relayd.conf"
JAIL = REPO / "config" / "fail2ban" / "jail.d" / "relayd.conf"
CACHED = REPO / ".cache" / "fail2ban"
#: The rejection reasons the filter bans for (its comment says why).
BAN_REASONS = {"auth_failed", "account_disabled", "account_deleted", "domain_deleted",
               "auth_rate_limited", "auth_rate_limited_address", "pregreet"}
PREGREET = "pregreet" in REJECTION_REASONS  # issue 12 item 9, merged or not

CONFIG = BASE_TOML.replace('log_level = "info"', 'log_level = "debug"\nlog_rejections_burst = 4\n'
                           "log_rejections_per_minute = 0") + """
[smtp]
auth_failures_before_delay = 20
auth_failures_before_disconnect = 3
auth_max_usernames_per_address = 4
""" + ("greet_pause_seconds = 0.3\n" if PREGREET else "")


def _tool(name: str) -> tuple[list[str], dict[str, str], Path]:
    """(command, environment, fail2ban's /etc/fail2ban) for a fail2ban program."""
    env = dict(os.environ)
    override = os.environ.get("FAIL2BAN_REGEX") if name == "fail2ban-regex" else None
    found = override or shutil.which(name)
    if found:
        return [found], env, Path("/etc/fail2ban")
    script = CACHED / "usr" / "bin" / name
    if script.is_file():
        env["PYTHONPATH"] = str(CACHED / "usr" / "lib" / "python3" / "dist-packages")
        return [sys.executable, str(script)], env, CACHED / "etc" / "fail2ban"
    missing(name)


def _regex(log: Path, out: str = "ip") -> list[str]:
    """fail2ban-regex's ``-o out`` line for each matched line of ``log``."""
    cmd, env, _ = _tool("fail2ban-regex")
    proc = subprocess.run([*cmd, "-r", "-o", out, str(log), str(FILTER)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [ln for ln in proc.stdout.splitlines() if ln.strip()]


@dataclass
class Run:
    log: Path
    lines: list[dict[str, Any]]
    user: str


def _plain(authzid: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


async def _fail(port: int, source: str, user: str, password: str) -> str:
    c = await Raw.open("127.0.0.1", port, source=source)
    reply = await c.login(user, password)
    await c.quit()
    return reply


async def _scenario(tmp: Path) -> Run:
    sink = await start_sink()
    rp = RelayProcess(tmp, sink.address)
    rp.config.write_text(CONFIG)
    await rp.start()
    try:
        await rp.ctl("domain", "add", "example.com")
        cred = await rp.ctl("user", "add", "--domain", "example.com")
        user, password = cred["username"], cred["password"]
        # 127.0.0.1: success lines (auth_ok at debug, smtp_accepted) and a syntax error.
        c = await Raw.open("127.0.0.1", rp.port, source="127.0.0.1")
        assert (await c.login(user, password)).startswith("235 ")
        assert (await c.transaction(
            "app@example.com", ["a@dest.test"],
            b"From: app@example.com\r\nSubject: t\r\n\r\nhi\r\n")).startswith("250 ")
        assert (await c.cmd("MAIL FROM:<bad")).startswith("501 ")
        await c.quit()
        await sink.wait_for(1, timeout=20)
        # 127.0.0.2: three wrong passwords lock the username (421), then two unknown
        # users: six auth_failed lines, past the burst of 4.
        for i in range(3):
            assert (await _fail(rp.port, "127.0.0.2", user, f"wrong-{i}")).startswith("535 ")
        assert (await _fail(rp.port, "127.0.0.2", user, "wrong-3")).startswith("421 ")
        for name in ("ghost-a", "ghost-b"):
            assert (await _fail(rp.port, "127.0.0.2", name, "x")).startswith("535 ")
        # 127.0.0.3: four unknown usernames lock the address.
        for i in range(4):
            assert (await _fail(rp.port, "127.0.0.3", f"nobody-{i}", "x")).startswith("535 ")
        assert (await _fail(rp.port, "127.0.0.3", "nobody-9", "x")).startswith("421 ")
        # 127.0.0.4: PLAIN with an authzid other than the user: 535 without a check.
        c = await Raw.open("127.0.0.1", rp.port, source="127.0.0.4")
        assert (await c.cmd("EHLO client.test")).startswith("250")
        reply = await c.cmd(f"AUTH PLAIN {_plain('someone-else', user, password)}")
        assert reply.startswith("535 ")
        await c.quit()
        if PREGREET:  # 127.0.0.5 speaks first
            r, w = await asyncio.open_connection("127.0.0.1", rp.port,
                                                 local_addr=("127.0.0.5", 0))
            w.write(b"EHLO early.test\r\n")
            assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"554 ")
            w.close()
        assert await rp.terminate() == 0  # writes the pending suppression summary
    finally:
        if rp.proc is not None and rp.proc.returncode is None:
            await rp.kill()
        assert sink.server is not None
        sink.server.close()
    return Run(rp.log, log_lines(rp.log), user)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The scenario, run once for this module in its own event loop."""
    _tool("fail2ban-regex")  # fail before starting anything
    return uvloop.run(_scenario(tmp_path_factory.mktemp("fail2ban")))


def _ban_worthy(line: dict[str, Any]) -> bool:
    """What the filter is meant to match (see its comment), decided on the parsed JSON."""
    event = line.get("event")
    return event == "auth_failed" or (
        event in ("smtp_rejected", "smtp_rejections_suppressed")
        and line.get("reason") in BAN_REASONS)


def test_filter_matches_each_failure_line_with_its_address(run: Run) -> None:
    """fail2ban finds exactly the ban-worthy lines, each with the client that caused it."""
    expected = Counter(x["client"] for x in run.lines if _ban_worthy(x))
    assert expected["127.0.0.2"] >= 6 and expected["127.0.0.3"] >= 5
    assert Counter(_regex(run.log)) == expected


def test_filter_sees_every_kind_of_failure(run: Run) -> None:
    """The real log holds auth_failed, both throttle refusals, the authzid 535 and a
    suppression summary (and pregreet when relayd has it): the filter is tried on each."""
    kinds = {(x["event"], x.get("reason")) for x in run.lines if _ban_worthy(x)}
    assert {("auth_failed", "auth_failed"), ("smtp_rejected", "auth_rate_limited"),
            ("smtp_rejected", "auth_rate_limited_address"), ("smtp_rejected", "auth_failed"),
            ("smtp_rejections_suppressed", "auth_failed")} <= kinds
    if PREGREET:
        assert ("smtp_rejected", "pregreet") in kinds


def test_filter_does_not_match_success_lines(run: Run, tmp_path: Path) -> None:
    """Every other line of the same log (auth_ok, smtp_accepted, delivery_attempt, a syntax
    error, start and stop, ...) matches nothing."""
    events = {x["event"] for x in run.lines if not _ban_worthy(x)}
    assert {"auth_ok", "smtp_accepted", "delivery_attempt", "relayd_started", "smtp_rejected",
            "stopped"} <= events
    rest = tmp_path / "rest.log"
    rest.write_text("".join(ln + "\n" for ln, x in zip(
        run.log.read_text().splitlines(), run.lines, strict=True) if not _ban_worthy(x)))
    assert _regex(rest) == []
    assert "127.0.0.1" not in _regex(run.log)


def test_filter_reads_the_time_from_the_timestamp_field(run: Run) -> None:
    """Each match carries the epoch second of its line's "timestamp" (UTC)."""
    rows = _regex(run.log, "row")
    stamps = [int(datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")).timestamp())
              for x in run.lines if _ban_worthy(x)]
    assert [int(r.split(",")[1]) for r in rows] == stamps


def test_jail_and_filter_pass_fail2ban_configuration_test(tmp_path: Path) -> None:
    """fail2ban-client -t accepts the jail and filter installed over fail2ban's own config."""
    cmd, env, etc = _tool("fail2ban-client")
    if not etc.is_dir():
        missing("fail2ban's configuration", f" ({etc})")
    conf = tmp_path / "fail2ban"
    shutil.copytree(etc, conf)
    for f in (conf / "jail.d").glob("*"):  # the distribution's jails (sshd) need their logs
        f.unlink()
    shutil.copy(FILTER, conf / "filter.d" / "relayd.conf")
    shutil.copy(JAIL, conf / "jail.d" / "relayd.conf")
    proc = subprocess.run([*cmd, "-c", str(conf), "-t"], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dump = subprocess.run([*cmd, "-c", str(conf), "-d"], capture_output=True, text=True,
                          timeout=120, env=env, check=False).stdout
    assert "['add', 'relayd', 'systemd']" in dump
    assert "_SYSTEMD_UNIT=relayd.service" in dump
