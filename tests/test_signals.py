"""relayd as a process under signals: readiness, reload (SIGHUP), graceful and fast stop.

Each test runs a real relayd subprocess (tests.procs.RelayProcess) with its
stdout in a file and, where systemd's side matters, ``NOTIFY_SOCKET`` pointing
at a datagram socket the test reads.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import message, start_sink
from tests.procs import BASE_TOML, RelayProcess, free_port
from tests.rawsmtp import Raw
from tests.test_ops_support import NotifySocket, log_lines, wait_log

pytestmark = pytest.mark.slow


async def _account(rp: RelayProcess) -> tuple[str, str]:
    await rp.ctl("domain", "add", "example.com")
    cred = await rp.ctl("user", "add", "--domain", "example.com")
    return cred["username"], cred["password"]


@pytest.fixture
def notify(tmp_path: Path) -> Any:
    """A stand-in for systemd's notify socket."""
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()



# --- readiness (Type=notify) -----------------------------------------------------


async def test_ready_is_sent_when_the_listeners_accept(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """When READY=1 arrives, the SMTP port greets and the control socket answers at once."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}", env={"NOTIFY_SOCKET": notify.path})
    procs.append(rp)
    starting = asyncio.create_task(rp.start())
    await notify.wait_for("READY=1")
    c = await Raw.open("127.0.0.1", rp.port)  # no retry: it must be up already
    await c.quit()
    assert (await rp.ctl("status"))["version"]
    await starting
    assert notify.messages[0].split("\n")[0] == "READY=1"  # with its first STATUS=


async def test_stopping_is_sent_when_shutdown_begins(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """SIGTERM makes relayd send STOPPING=1, then exit 0."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}", env={"NOTIFY_SOCKET": notify.path})
    procs.append(rp)
    await rp.start()
    await notify.wait_for("READY=1")
    assert await rp.terminate() == 0
    assert notify.drain()[-1] == "STOPPING=1"


async def test_reload_is_bracketed_by_reloading_and_ready(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """SIGHUP makes relayd send RELOADING=1 (with MONOTONIC_USEC) and then READY=1 again."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}", env={"NOTIFY_SOCKET": notify.path})
    procs.append(rp)
    await rp.start()
    await notify.wait_for("READY=1")
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    await wait_log(rp, "reloaded")
    await asyncio.sleep(0.1)
    msgs = notify.drain()
    assert msgs[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert [m.split("\n")[0] for m in msgs[2:]] == ["READY=1"]


# --- reload ------------------------------------------------------------------------


async def _rcpts_accepted(c: Raw, n: int) -> int:
    """Start a transaction with ``n`` recipients; how many got 250 (then RSET)."""
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    ok = 0
    for i in range(n):
        ok += (await c.cmd(f"RCPT TO:<r{i}@dest.test>")).startswith("250 ")
    assert (await c.cmd("RSET")).startswith("250 ")
    return ok


async def test_reload_applies_new_limits_and_keeps_open_connections(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a lower max_recipients applies, on an open and on a new connection."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}", "[smtp]\nmax_recipients = 3\n")
    procs.append(rp)
    await rp.start()
    user, password = await _account(rp)
    old = await Raw.open("127.0.0.1", rp.port)
    assert (await old.login(user, password)).startswith("235 ")
    assert await _rcpts_accepted(old, 3) == 3

    rp.config.write_text(BASE_TOML + "[smtp]\nmax_recipients = 1\n")
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    (line,) = await wait_log(rp, "reloaded")
    assert line["changed"] == ["smtp.max_recipients"]

    assert await _rcpts_accepted(old, 3) == 1  # same connection, new limit
    reply = await old.transaction("app@example.com", ["x@dest.test"], message())
    assert reply.startswith("250 "), reply
    new = await Raw.open("127.0.0.1", rp.port)
    assert (await new.login(user, password)).startswith("235 ")
    assert await _rcpts_accepted(new, 3) == 1
    await old.quit()
    await new.quit()


async def test_reload_applies_the_per_account_queue_cap(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """After SIGHUP a lower [limits] max_queued_per_account refuses MAIL with 452 4.3.1."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}")  # next hop down: mail stays queued
    procs.append(rp)
    await rp.start()
    user, password = await _account(rp)
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.login(user, password)).startswith("235 ")
    assert (await c.transaction("app@example.com", ["a@dest.test"], message())).startswith("250 ")

    rp.config.write_text(BASE_TOML + "[limits]\nmax_queued_per_account = 1\n")
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    await wait_log(rp, "reloaded")
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("452 4.3.1")
    await c.quit()


async def test_bad_config_on_reload_keeps_the_old_one(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """A reload of a file with an unknown key logs reload_failed and changes nothing."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}", "[smtp]\nmax_recipients = 1\n")
    procs.append(rp)
    await rp.start()
    user, password = await _account(rp)
    rp.config.write_text(BASE_TOML + "[smtp]\nmax_recipients = 10\nmax_recipient = 10\n")
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    (line,) = await wait_log(rp, "reload_failed")
    assert "max_recipient" in line["error"]
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.login(user, password)).startswith("235 ")
    assert await _rcpts_accepted(c, 2) == 1
    await c.quit()
    assert not [x for x in log_lines(rp.log) if x.get("event") == "reloaded"]


async def test_reload_names_settings_that_need_a_restart(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """A changed hostname is reported as reload_needs_restart and the banner keeps the old one."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}")
    procs.append(rp)
    await rp.start()
    rp.config.write_text(BASE_TOML.replace('hostname = "relay.test"',
                                           'hostname = "other.test"'))
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    (line,) = await wait_log(rp, "reload_needs_restart")
    assert line["settings"] == ["server.hostname"]
    c = await Raw.open("127.0.0.1", rp.port)
    assert c.greeting.startswith("220 relay.test ")
    await c.quit()


def _cert_files(ca: trustme.CA, tmp: Path, name: str) -> None:
    """Write a certificate for ``name`` (and 127.0.0.1) to tmp/cert.pem and tmp/key.pem."""
    cert = ca.issue_cert(name, "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))


def _dns_names(cert: dict[str, Any]) -> list[str]:
    return [v for k, v in cert["subjectAltName"] if k == "DNS"]


async def _implicit_tls_name(port: int, ctx: ssl.SSLContext) -> tuple[str, Raw]:
    c = await Raw.open("127.0.0.1", port, tls=ctx)
    return _dns_names(c.writer.get_extra_info("peercert"))[0], c


async def _starttls_name(port: int, ctx: ssl.SSLContext) -> str:
    c = await Raw.open("127.0.0.1", port)
    assert (await c.cmd("EHLO client.test")).startswith("250")
    assert (await c.cmd("STARTTLS")).startswith("220 ")
    await c.writer.start_tls(ctx, server_hostname="a.test")
    name = _dns_names(c.writer.get_extra_info("peercert"))[0]
    assert (await c.cmd("EHLO client.test")).startswith("250")
    await c.quit()
    return name


async def test_reload_serves_a_renewed_certificate_to_new_connections(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """A certificate replaced in place is used after SIGHUP by new STARTTLS and implicit-TLS
    connections, while a connection opened before keeps working."""
    ca = trustme.CA()
    _cert_files(ca, tmp_path, "a.test")
    tls_port = free_port()
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}",
                      f'[smtp]\ntls_listen = "127.0.0.1:{tls_port}"\n'
                      f'tls_cert_file = "{tmp_path / "cert.pem"}"\n'
                      f'tls_key_file = "{tmp_path / "key.pem"}"\n')
    procs.append(rp)
    await rp.start()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.check_hostname = False
    name, before = await _implicit_tls_name(tls_port, client)
    assert name == "a.test"
    assert await _starttls_name(rp.port, client) == "a.test"

    _cert_files(ca, tmp_path, "b.test")  # renewed in place, same paths
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    await wait_log(rp, "reloaded")

    name, after = await _implicit_tls_name(tls_port, client)
    assert name == "b.test"
    assert await _starttls_name(rp.port, client) == "b.test"
    assert (await before.cmd("NOOP")).startswith("250 ")
    await before.quit()
    await after.quit()


# --- graceful and fast stop -------------------------------------------------------


async def test_sigterm_lets_an_open_data_transfer_finish(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """SIGTERM in the middle of DATA: the client still gets 250, relayd exits 0, and the
    message is delivered after a restart."""
    hop = free_port()  # next hop down during the first run: the message stays queued
    rp = RelayProcess(tmp_path, f"127.0.0.1:{hop}", env={"NOTIFY_SOCKET": notify.path})
    procs.append(rp)
    await rp.start()
    user, password = await _account(rp)
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.login(user, password)).startswith("235 ")
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<late@dest.test>")).startswith("250 ")
    assert (await c.cmd("DATA")).startswith("354 ")
    body = message("half and half", body="first half\r\n" * 50 + "second half\r\n" * 50)
    await c.send(body[: len(body) // 2])

    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGTERM)
    await notify.wait_for("STOPPING=1")
    with pytest.raises(OSError):  # no longer listening
        await Raw.open("127.0.0.1", rp.port)
    await c.send(body[len(body) // 2:] + b"\r\n.\r\n")
    reply = await c.reply()
    assert reply.startswith("250 "), reply
    queue_id = reply.rsplit(" ", 1)[1]
    assert (await c.reply()).startswith("421 ")  # then the server says goodbye
    assert await asyncio.wait_for(rp.proc.wait(), 20) == 0

    sink = await start_sink(port=hop)
    try:
        await rp.start()
        (got,) = await sink.wait_for(1, timeout=20)
        assert got.rcpt_tos == ["late@dest.test"]
        assert f"id {queue_id};".encode() in got.data
        assert b"second half" in got.data
    finally:
        assert sink.server is not None
        sink.server.close()


async def test_second_signal_exits_fast_without_losing_accepted_mail(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """A second SIGTERM ends a graceful stop held up by an open transaction at once;
    mail acknowledged before is delivered after a restart, the unfinished one is not."""
    hop = free_port()
    rp = RelayProcess(tmp_path, f"127.0.0.1:{hop}", env={"NOTIFY_SOCKET": notify.path})
    procs.append(rp)  # shutdown_grace_seconds = 10 (tests.procs)
    await rp.start()
    user, password = await _account(rp)
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.login(user, password)).startswith("235 ")
    reply = await c.transaction("app@example.com", ["kept@dest.test"], message())
    assert reply.startswith("250 "), reply
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<unfinished@dest.test>")).startswith("250 ")
    assert (await c.cmd("DATA")).startswith("354 ")
    await c.send(b"Subject: never finished\r\n\r\nhalf")

    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGTERM)
    await notify.wait_for("STOPPING=1")
    await asyncio.sleep(0.2)
    assert rp.proc.returncode is None  # graceful stop waits for the transaction
    started = time.monotonic()
    rp.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(rp.proc.wait(), 5) == 0
    assert time.monotonic() - started < 2.0
    assert [x["mode"] for x in log_lines(rp.log) if x.get("event") == "stopping"] == [
        "graceful", "fast"]
    c.close()

    sink = await start_sink(port=hop)
    try:
        await rp.start()
        (got,) = await sink.wait_for(1, timeout=20)
        assert got.rcpt_tos == ["kept@dest.test"]
        await asyncio.sleep(0.5)
        assert len(sink.messages) == 1
    finally:
        assert sink.server is not None
        sink.server.close()
