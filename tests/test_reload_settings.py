"""Reload, proven setting by setting: each one relayd.app.RELOADABLE promises is
changed in the file of a running relayd process, SIGHUP is sent, and the new
behaviour is observed over a socket (SMTP, the control socket, a receiving sink).

Settings a reload cannot apply are logged as ``reload_needs_restart``; the list
in docs/OPERATIONS.md ("What a reload applies") is checked against RELOADABLE.
Settings with no test here (and why) are named in ``NOT_OBSERVED``.
"""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP as AioSMTP

from relayd.app import RELOADABLE
from tests.conftest import Sink, _SinkHandler, message, start_sink
from tests.procs import BASE_TOML, REPO, RelayProcess, free_port
from tests.rawsmtp import Raw
from tests.test_ops_support import log_lines, wait_log

#: Each reloadable setting and the test here that changes it and watches the effect.
OBSERVED = {
    "limits": "test_reload_applies_default_sending_limits",  # and the two below
    "limits.min_free_disk_bytes": "test_reload_applies_min_free_disk",
    "limits.max_accounts": "test_reload_applies_max_accounts",
    "server.shutdown_grace_seconds": "test_reload_applies_shutdown_grace",
    "smtp.max_message_size_bytes": "test_reload_applies_max_message_size",
    "smtp.idle_timeout_seconds": "test_reload_applies_idle_timeout",
    "smtp.max_commands_per_session": "test_reload_applies_max_commands_per_session",
    "smtp.max_connections": "test_reload_applies_connection_caps",
    "smtp.max_connections_per_ip": "test_reload_applies_connection_caps",
    "smtp.plaintext_auth_networks": "test_reload_applies_plaintext_auth_networks",
    "smtp.greet_pause_seconds": "test_reload_applies_greet_pause",
    "delivery.routes": "test_reload_applies_routes",
    "delivery.smarthost": "test_reload_applies_smarthost",
    "delivery.smarthost_tls": "test_reload_applies_tls_verify",
    "delivery.tls_verify": "test_reload_applies_tls_verify",
    "delivery.retry_first_seconds": "test_reload_applies_retry_timing",
    "delivery.max_queue_lifetime_seconds": "test_reload_applies_max_queue_lifetime",
    "delivery.bounces": "test_reload_applies_bounces",
    "delivery.messages_per_connection": "test_reload_applies_messages_per_connection",
}

#: Reloadable settings not observed here, with the reason (reviewed with RELOADABLE).
NOT_OBSERVED = {
    "delivery.connect_timeout_seconds": "needs a next hop that never answers SYN; "
                                        "loopback refuses at once",
    "delivery.command_timeout_seconds": "needs a stalling next hop; the pool's cfg is "
                                        "the same one messages_per_connection proves",
    "delivery.idle_connection_seconds": "same pool cfg as messages_per_connection",
    "delivery.smarthost_username": "needs an AUTH-capable sink",
    "delivery.smarthost_password": "needs an AUTH-capable sink",
    "delivery.retry_max_seconds": "same BackoffPolicy as retry_first_seconds",
    "delivery.retry_jitter": "same BackoffPolicy as retry_first_seconds",
    "delivery.shaping": "tests/test_shaping.py (test_reload_applies_shaping: MX mode)",
    "smtp.min_data_rate_bytes_per_second": "[smtp] min_data_rate_grace_seconds (30 s) "
                                           "needs a restart",
    "smtp.tls_cert_file": "tests/test_signals.py (renewed certificate)",
    "smtp.tls_key_file": "tests/test_signals.py (renewed certificate)",
    "smtp.max_recipients": "tests/test_signals.py",
    "limits.max_queued_per_account": "tests/test_signals.py",
    "delivery.tls_level": "tests/test_mx_tls.py (MX sinks with STARTTLS, reload)",
    "delivery.tls_policy": "tests/test_mx_tls.py (MX sinks with STARTTLS, reload)",
    "delivery.tls_ca_file": "tests/test_mx_tls.py (MX sinks with STARTTLS, reload)",
    "spool.delivery_log_retention_days": "the prune runs every 10 minutes",
    "spool.delivery_log_max_bytes": "read by the same prune as delivery_log_retention_days",
    "spool.last_connection_flush_seconds": "the control API answers from memory: only a "
                                           "crash shows what was flushed; read each period",
}


def _toml(**sections: str) -> str:
    """BASE_TOML with ``lines`` added to each named section (created if missing)."""
    text = BASE_TOML
    for section, lines in sections.items():
        for line in lines.splitlines():  # a key BASE_TOML has: replace its line
            key = line.split("=", 1)[0].strip()
            old = re.search(rf"^{key} = .*\n", text, re.MULTILINE)
            if old:
                text = text.replace(old.group(0), "")
        header = f"[{section}]\n"
        if header in text:
            text = text.replace(header, header + lines.rstrip("\n") + "\n")
        else:
            text += header + lines.rstrip("\n") + "\n"
    return text


async def _reload(rp: RelayProcess, **sections: str) -> dict[str, Any]:
    """Rewrite the file, send SIGHUP, wait for the ``reloaded`` line; return it."""
    before = len([x for x in log_lines(rp.log) if x.get("event") == "reloaded"])
    rp.config.write_text(_toml(**sections))
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    return (await wait_log(rp, "reloaded", before + 1))[-1]


async def _start(tmp: Path, smarthost: str | None = None, text: str | None = None,
                 **sections: str) -> RelayProcess:
    rp = RelayProcess(tmp, smarthost if smarthost is not None else f"127.0.0.1:{free_port()}")
    rp.config.write_text(text if text is not None else _toml(**sections))
    await rp.start()
    return rp


async def _account(rp: RelayProcess) -> tuple[str, str]:
    await rp.ctl("domain", "add", "example.com")
    cred = await rp.ctl("user", "add", "--domain", "example.com")
    return cred["username"], cred["password"]


_CREDS: dict[str, tuple[str, str]] = {}  # control socket -> (username, password)


async def _sender(rp: RelayProcess) -> Raw:
    """A new authenticated SMTP connection (an account is created on first use)."""
    if rp.sock not in _CREDS:
        _CREDS[rp.sock] = await _account(rp)
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.login(*_CREDS[rp.sock])).startswith("235 ")
    return c


async def _send(rp: RelayProcess, rcpt: str, subject: str = "hello") -> str:
    """Submit one message over a new connection; return its queue id."""
    c = await _sender(rp)
    reply = await c.transaction("app@example.com", [rcpt], message(subject))
    assert reply.startswith("250 "), reply
    await c.quit()
    return reply.rsplit(" ", 1)[1]



@pytest.fixture
async def sink() -> Any:
    s = await start_sink()
    yield s
    assert s.server is not None
    s.server.close()


# --- the promise and the documentation -------------------------------------------


def _documented(heading: str) -> set[str]:
    """The `section.key` names listed under a bold heading of OPERATIONS.md's reload part."""
    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    part = text.split("### What a reload applies", 1)[1].split("\n#", 1)[0]
    block = part.split(heading, 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", block))


def test_documented_reloadable_settings_are_the_ones_reload_applies() -> None:
    """docs/OPERATIONS.md lists exactly RELOADABLE as the settings a reload applies."""
    assert _documented("**Applied by a reload:**") == set(RELOADABLE)


def test_every_reloadable_setting_is_observed_or_explained() -> None:
    """Each reloadable setting has a test in this file or a stated reason for having none."""
    assert all(callable(globals().get(test)) for test in OBSERVED.values())
    names = set(OBSERVED) | set(NOT_OBSERVED)
    assert names >= RELOADABLE
    assert all(n in RELOADABLE or n.split(".")[0] in RELOADABLE for n in names)


# --- inbound SMTP ------------------------------------------------------------------


@pytest.mark.slow
async def test_reload_applies_max_message_size(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a lower max_message_size_bytes is advertised and a larger MAIL gets 552."""
    rp = await _start(tmp_path)
    procs.append(rp)
    line = await _reload(rp, smtp="max_message_size_bytes = 1000")
    assert line["changed"] == ["smtp.max_message_size_bytes"]
    c = await Raw.open("127.0.0.1", rp.port)
    assert "250-SIZE 1000" in await c.cmd("EHLO client.test")
    await c.quit()
    c = await _sender(rp)
    assert (await c.cmd("MAIL FROM:<app@example.com> SIZE=2000")).startswith("552 5.3.4")
    await c.quit()


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "refusal"), [
    ("max_connections", "421 4.3.2 Too many connections"),
    ("max_connections_per_ip", "421 4.7.0 Too many connections from your address"),
])
async def test_reload_applies_connection_caps(
        tmp_path: Path, procs: list[RelayProcess], setting: str, refusal: str) -> None:
    """After SIGHUP a cap of 1 refuses a second connection with its 421."""
    rp = await _start(tmp_path)
    procs.append(rp)
    first = await Raw.open("127.0.0.1", rp.port)
    second = await Raw.open("127.0.0.1", rp.port)  # allowed before the reload
    await second.quit()
    await _reload(rp, smtp=f"{setting} = 1")
    r, w = await asyncio.open_connection("127.0.0.1", rp.port)
    greeting = (await asyncio.wait_for(r.readline(), 5)).decode()
    assert greeting.startswith(refusal), greeting
    w.close()
    await first.quit()


@pytest.mark.slow
async def test_reload_applies_idle_timeout(tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a 1 s idle_timeout_seconds closes a silent new connection with 421 4.4.2."""
    rp = await _start(tmp_path)
    procs.append(rp)
    await _reload(rp, smtp="idle_timeout_seconds = 1.0")
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.reply(timeout=4.0)).startswith("421 4.4.2")
    c.close()


@pytest.mark.slow
async def test_reload_applies_max_commands_per_session(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP max_commands_per_session = 3 ends a session at its fourth command."""
    rp = await _start(tmp_path)
    procs.append(rp)
    await _reload(rp, smtp="max_commands_per_session = 3")
    c = await Raw.open("127.0.0.1", rp.port)
    for _ in range(3):
        assert (await c.cmd("NOOP")).startswith("250 ")
    assert (await c.cmd("NOOP")).startswith("421 4.7.0 Too many commands")
    c.close()


@pytest.mark.slow
async def test_reload_applies_greet_pause(tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a greet_pause_seconds makes a client that talks first get 554 5.5.0."""
    rp = await _start(tmp_path)
    procs.append(rp)
    await _reload(rp, smtp="greet_pause_seconds = 1.0")
    r, w = await asyncio.open_connection("127.0.0.1", rp.port)
    w.write(b"EHLO early.test\r\n")
    await w.drain()
    first = (await asyncio.wait_for(r.readline(), 5)).decode()
    assert first.startswith("554 5.5.0"), first
    w.close()


@pytest.mark.slow
async def test_reload_applies_plaintext_auth_networks(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP plaintext_auth_networks without loopback refuses AUTH there with 538."""
    rp = await _start(tmp_path)
    procs.append(rp)
    (await _sender(rp)).close()  # AUTH over plain text from loopback: allowed
    await _reload(rp, smtp='plaintext_auth_networks = ["192.0.2.0/24"]')
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.login(*_CREDS[rp.sock])).startswith("538 5.7.11")
    await c.quit()


@pytest.mark.slow
async def test_reload_applies_min_free_disk(tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a [limits] min_free_disk_bytes above the free space refuses MAIL with 452."""
    rp = await _start(tmp_path)
    procs.append(rp)
    c = await _sender(rp)
    await _reload(rp, limits=f"min_free_disk_bytes = {2**62}")
    await asyncio.sleep(1.1)  # the free-space reading is cached for a second
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("452 4.3.1")
    await c.quit()


@pytest.mark.slow
async def test_reload_applies_max_accounts(tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a [limits] max_accounts of 1 refuses a second account on the control socket."""
    rp = await _start(tmp_path)
    procs.append(rp)
    await _account(rp)
    await _reload(rp, limits="max_accounts = 1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "--socket", rp.sock, "--json", "user", "add",
        "--domain", "example.com", cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode != 0
    assert b"max_accounts" in out + err or b"accounts" in out + err


@pytest.mark.slow
async def test_reload_applies_default_sending_limits(
        tmp_path: Path, sink: Sink, procs: list[RelayProcess]) -> None:
    """After SIGHUP a default [limits] per_day of 1 holds an account's second message back
    (a day, not a minute: the window must not roll over between the two messages)."""
    rp = await _start(tmp_path, sink.address)
    procs.append(rp)
    await _send(rp, "one@dest.test")
    await sink.wait_for(1)
    await _reload(rp, limits="per_day = 1")
    await _send(rp, "two@dest.test")  # the day already holds one
    await asyncio.sleep(1.5)
    assert len(sink.messages) == 1
    (item,) = (await rp.ctl("queue", "list"))["items"]
    assert item["state"] == "waiting_limit"


# --- delivery ----------------------------------------------------------------------


@pytest.mark.slow
async def test_reload_applies_routes(
        tmp_path: Path, sink: Sink, procs: list[RelayProcess]) -> None:
    """After SIGHUP a new [delivery] routes entry sends that domain's mail to its host."""
    rp = await _start(tmp_path)  # the smarthost is down
    procs.append(rp)
    line = await _reload(rp, delivery=f'routes = {{ "routed.test" = "{sink.address}" }}')
    assert line["changed"] == ["delivery.routes"]
    await _send(rp, "x@routed.test")
    (got,) = await sink.wait_for(1, timeout=15)
    assert got.rcpt_tos == ["x@routed.test"]


@pytest.mark.slow
async def test_reload_applies_smarthost(
        tmp_path: Path, sink: Sink, procs: list[RelayProcess]) -> None:
    """After SIGHUP a new [delivery] smarthost (no --smarthost flag) gets the queued mail."""
    rp = RelayProcess(tmp_path, None)
    rp.config.write_text(_toml(delivery=f'smarthost = "127.0.0.1:{free_port()}"'))
    await rp.start()
    procs.append(rp)
    await _send(rp, "waiting@dest.test")
    line = await _reload(rp, delivery=f'smarthost = "{sink.address}"')
    assert line["changed"] == ["delivery.smarthost"]
    (got,) = await sink.wait_for(1, timeout=15)  # the next retry (1-2 s) goes to the new one
    assert got.rcpt_tos == ["waiting@dest.test"]


@pytest.mark.slow
async def test_reload_applies_retry_timing(tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a longer retry_first_seconds sets a deferred message's next attempt."""
    rp = await _start(tmp_path)  # the smarthost is down
    procs.append(rp)
    await _reload(rp, delivery="retry_first_seconds = 3600.0\nretry_max_seconds = 7200.0")
    await _send(rp, "later@dest.test")
    deadline = time.monotonic() + 15
    while True:
        items = (await rp.ctl("queue", "list"))["items"]
        if items and items[0]["attempts"] >= 1:
            break
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.1)
    assert items[0]["next_attempt"] - time.time() > 3000


@pytest.mark.slow
async def test_reload_applies_max_queue_lifetime(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a 1 s max_queue_lifetime_seconds fails a deferred message at its next try."""
    rp = await _start(tmp_path, delivery="bounces = false")  # the smarthost is down
    procs.append(rp)
    await _send(rp, "expired@dest.test")
    await _reload(rp, delivery="bounces = false\nmax_queue_lifetime_seconds = 1.0")
    deadline = time.monotonic() + 15
    while (await rp.ctl("queue", "list"))["items"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_reload_applies_bounces(
        tmp_path: Path, sink: Sink, procs: list[RelayProcess]) -> None:
    """After SIGHUP bounces = true sends a DSN to the sender of a refused message."""
    rp = await _start(tmp_path, sink.address, delivery="bounces = false")
    procs.append(rp)
    sink.rcpt_script["<nobody@dest.test>"] = "550 5.1.1 no such user"
    sink.rcpt_script["nobody@dest.test"] = "550 5.1.1 no such user"
    line = await _reload(rp, delivery="bounces = true")
    assert line["changed"] == ["delivery.bounces"]
    await _send(rp, "nobody@dest.test")
    (dsn,) = await sink.wait_for(1, timeout=15)
    assert dsn.rcpt_tos == ["app@example.com"]
    assert dsn.mail_from in ("", "<>")


@pytest.mark.slow
async def test_reload_applies_messages_per_connection(
        tmp_path: Path, sink: Sink, procs: list[RelayProcess]) -> None:
    """After SIGHUP messages_per_connection = 1 opens a new connection to an
    already-used next hop for each message."""
    rp = await _start(tmp_path, sink.address)
    procs.append(rp)
    await _send(rp, "a@dest.test")
    await sink.wait_for(1)
    await _send(rp, "b@dest.test")
    await sink.wait_for(2)
    assert sink.connections == 1  # reused
    await _reload(rp, delivery="messages_per_connection = 1")
    for i in range(3):
        await _send(rp, f"c{i}@dest.test")
        await sink.wait_for(3 + i)
    assert sink.connections >= 3


async def _tls_sink(tmp: Path) -> Sink:
    """A sink offering STARTTLS with a certificate from a CA relayd does not trust."""
    cert = trustme.CA().issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    sink = Sink()
    handler = _SinkHandler(sink)

    def factory() -> AioSMTP:
        sink.connections += 1
        return AioSMTP(handler, hostname="sink.test", tls_context=ctx)

    sink.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    sink.port = sink.server.sockets[0].getsockname()[1]
    return sink


@pytest.mark.slow
async def test_reload_applies_tls_verify(tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP tls_verify = false delivers to a smarthost whose certificate failed
    verification before (the hop's existing pool too)."""
    sink = await _tls_sink(tmp_path)
    try:
        rp = await _start(tmp_path, sink.address, delivery='smarthost_tls = "starttls"')
        procs.append(rp)
        await _send(rp, "tls@dest.test")
        deadline = time.monotonic() + 15
        while True:  # the first attempt fails verification: deferred
            items = (await rp.ctl("queue", "list"))["items"]
            if items and items[0]["attempts"] >= 1:
                break
            assert time.monotonic() < deadline, items
            await asyncio.sleep(0.1)
        assert not sink.messages
        await _reload(rp, delivery='smarthost_tls = "starttls"\ntls_verify = false')
        (got,) = await sink.wait_for(1, timeout=15)
        assert got.rcpt_tos == ["tls@dest.test"]
    finally:
        assert sink.server is not None
        sink.server.close()


# --- process -----------------------------------------------------------------------


@pytest.mark.slow
async def test_reload_applies_shutdown_grace(tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a 0.5 s shutdown_grace_seconds bounds the wait for an open transaction."""
    rp = await _start(tmp_path)  # shutdown_grace_seconds = 10 in BASE_TOML
    procs.append(rp)
    c = await _sender(rp)
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    await _reload(rp, server="shutdown_grace_seconds = 0.5")
    started = time.monotonic()
    assert await rp.terminate(timeout=15) == 0
    assert time.monotonic() - started < 5.0
    c.close()


@pytest.mark.slow
async def test_reload_names_a_setting_that_needs_a_restart(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """A changed [spool] reconcile_seconds is logged as reload_needs_restart, not as applied."""
    rp = await _start(tmp_path)
    procs.append(rp)
    line = await _reload(rp, spool="reconcile_seconds = 5.0")
    assert line["changed"] == []
    (warning,) = await wait_log(rp, "reload_needs_restart")
    assert warning["settings"] == ["spool.reconcile_seconds"]
