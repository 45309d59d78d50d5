"""End to end: relayd as a process, its stdout as JSON lines, read back after a scenario.

One scenario (module fixture) runs a real relayd with stdout captured into a
file: relayctl creates a domain and an account, one message is sent and
delivered, and AUTH fails with a known password through PLAIN (initial
response and challenge) and LOGIN (initial response and challenge). Each test
checks one property of the resulting log.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.conftest import message, start_sink
from tests.procs import RelayProcess
from tests.rawsmtp import Raw
from tests.test_ops_support import log_lines

pytestmark = pytest.mark.slow

WRONG = "Correct-Horse-9f3Battery"  # the known wrong password


@dataclass
class Run:
    """What the scenario did and where its log is."""

    log: Path
    username: str
    password: str
    queue_id: str


def _secret_forms(username: str, password: str) -> list[str]:
    """A password and every base64 form an AUTH exchange carries it in."""
    forms = [password, base64.b64encode(password.encode()).decode()]
    for user in (username, "nobody-here", ""):
        forms.append(base64.b64encode(f"\0{user}\0{password}".encode()).decode())
        forms.append(base64.b64encode(f"{user}\0{user}\0{password}".encode()).decode())
    return forms


async def _scenario(tmp: Path) -> Run:
    sink = await start_sink()
    # Failed AUTH from one address is slowed down after a few: not what this tests.
    rp = RelayProcess(tmp, sink.address, "[smtp]\nauth_failures_before_delay = 50\n"
                      "auth_failures_before_disconnect = 100\n")
    await rp.start()
    try:
        await rp.ctl("domain", "add", "example.com")
        cred = await rp.ctl("user", "add", "--domain", "example.com")
        user, password = cred["username"], cred["password"]
        c = await Raw.open("127.0.0.1", rp.port)
        assert (await c.login(user, password)).startswith("235 ")
        reply = await c.transaction("app@example.com", ["a@dest.test"], message())
        assert reply.startswith("250 "), reply
        await c.quit()
        await sink.wait_for(1, timeout=20)

        b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
        for name in (user, "nobody-here"):
            c = await Raw.open("127.0.0.1", rp.port)
            assert (await c.login(name, WRONG)).startswith("535 ")  # PLAIN, initial response
            assert (await c.cmd("AUTH PLAIN")).startswith("334 ")  # PLAIN, challenge
            assert (await c.cmd(b64(f"\0{name}\0{WRONG}"))).startswith("535 ")
            await c.quit()
            c = await Raw.open("127.0.0.1", rp.port)
            assert (await c.cmd("EHLO client.test")).startswith("250")
            assert (await c.cmd(f"AUTH LOGIN {b64(name)}")).startswith("334 ")  # LOGIN, initial
            assert (await c.cmd(b64(WRONG))).startswith("535 ")
            assert (await c.cmd("AUTH LOGIN")).startswith("334 ")  # LOGIN, challenges
            assert (await c.cmd(b64(name))).startswith("334 ")
            assert (await c.cmd(b64(WRONG))).startswith("535 ")
            await c.quit()
        assert await rp.terminate() == 0
    finally:
        if rp.proc is not None and rp.proc.returncode is None:
            await rp.kill()
        assert sink.server is not None
        sink.server.close()
    accepted = [x for x in log_lines(rp.log) if x.get("event") == "smtp_accepted"]
    return Run(rp.log, user, password, accepted[0]["id"] if accepted else "")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The scenario, run once for this module in its own event loop."""
    return uvloop.run(_scenario(tmp_path_factory.mktemp("logs")))


def _events(run: Run, name: str) -> list[dict[str, Any]]:
    return [x for x in log_lines(run.log) if x.get("event") == name]


def test_every_stdout_line_is_a_json_object(run: Run) -> None:
    """relayd writes nothing to stdout or stderr but JSON lines."""
    lines = [ln for ln in run.log.read_text().splitlines() if ln.strip()]
    assert lines
    assert len(log_lines(run.log)) == len(lines)


def test_failed_auth_is_logged_with_its_reason(run: Run) -> None:
    """Each failed AUTH gives one auth_failed line naming bad_password or unknown_user."""
    failed = _events(run, "auth_failed")
    details = sorted(x["detail"] for x in failed)
    assert details == ["bad_password"] * 4 + ["unknown_user"] * 4
    assert {x["reason"] for x in failed} == {"auth_failed"}
    assert all(x["user"] in (run.username, "nobody-here") for x in failed)


def test_a_535_is_not_logged_twice(run: Run) -> None:
    """The 535 that follows a failed credential check adds no smtp_rejected line."""
    assert not [x for x in _events(run, "smtp_rejected") if x["reason"] == "auth_failed"]


def test_passwords_and_auth_payloads_never_appear(run: Run) -> None:
    """Neither password, nor any base64 form of it, is anywhere in the log."""
    text = run.log.read_text()
    for form in _secret_forms(run.username, WRONG) + _secret_forms(run.username, run.password):
        assert form not in text, form


def test_smtp_lines_carry_the_session_id(run: Run) -> None:
    """Acceptance and AUTH lines carry a 12-hex-digit sid; each connection has its own."""
    lines = _events(run, "smtp_accepted") + _events(run, "auth_failed")
    sids = [x["sid"] for x in lines]
    assert all(len(s) == 12 and int(s, 16) >= 0 for s in sids)
    assert len(set(sids)) == 5  # one sending connection, four failing ones


def test_acceptance_and_delivery_share_the_message_id(run: Run) -> None:
    """The 250's queue id is the id of the delivery_attempt line, delivered to the sink."""
    assert run.queue_id
    attempts = _events(run, "delivery_attempt")
    assert [(x["id"], x["outcome"], x["rcpt"]) for x in attempts] == [
        (run.queue_id, "delivered", "a@dest.test")]
    assert attempts[0]["user"] == run.username


def test_lifecycle_operations_carry_the_control_peer_uid(run: Run) -> None:
    """domain_added and user_added name the uid of the relayctl process that asked."""
    for name in ("domain_added", "user_added"):
        (line,) = _events(run, name)
        assert line["peer_uid"] == os.getuid()


def test_lifecycle_of_the_process_is_logged(run: Run) -> None:
    """Start, graceful stop and the end of the stop are each one line, in that order."""
    names = [x["event"] for x in log_lines(run.log)]
    started, stopping, stopped = (names.index(n) for n in
                                  ("relayd_started", "stopping", "stopped"))
    assert started < stopping < stopped
    assert _events(run, "stopping")[0]["mode"] == "graceful"
