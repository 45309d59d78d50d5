"""A reload that fails, as systemd sees it over a real NOTIFY_SOCKET, and all or nothing.

relayd runs as a subprocess with ``NOTIFY_SOCKET`` pointing to a datagram socket
the test owns. A failed reload ends with one ``READY=1`` datagram carrying a
``STATUS=`` that says so and ``ERRNO=`` (sd_notify(3)'s error field: 22 for a
bad file, the file's errno for a certificate that cannot be opened); a good
reload clears it with ``ERRNO=0``. A file whose every part parses but whose
retry schedule contradicts itself changes nothing, not even the settings that
were valid: observed over SMTP.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import BASE_TOML, RelayProcess, free_port
from tests.rawsmtp import Raw
from tests.test_ops_support import NotifySocket, log_lines, wait_log


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    """A stand-in for systemd's notify socket."""
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def _fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if line)


async def _reload_done(rp: RelayProcess, notify: NotifySocket, text: str, event: str,
                       ) -> dict[str, str]:
    """Write ``text`` as the file, SIGHUP, wait for ``event`` in the log and the READY=1."""
    before = len([x for x in log_lines(rp.log) if x.get("event") == event])
    notify.drain()
    notify.messages.clear()
    rp.config.write_text(text)
    assert rp.proc is not None
    rp.proc.send_signal(signal.SIGHUP)
    await wait_log(rp, event, before + 1)
    await notify.wait_for("READY=1")
    return _fields(next(m for m in notify.messages if "READY=1" in m))


async def _rcpts_accepted(c: Raw, n: int) -> int:
    assert (await c.cmd("MAIL FROM:<app@example.com>")).startswith("250 ")
    ok = 0
    for i in range(n):
        ok += (await c.cmd(f"RCPT TO:<r{i}@dest.test>")).startswith("250 ")
    assert (await c.cmd("RSET")).startswith("250 ")
    return ok


async def test_failed_reloads_set_errno_and_change_nothing(
        tmp_path: Path, notify: NotifySocket, procs: list[RelayProcess]) -> None:
    """Bad retry schedule: 22 and no setting applied; missing certificate: 2; good: 0."""
    rp = RelayProcess(tmp_path, f"127.0.0.1:{free_port()}", "[smtp]\nmax_recipients = 3\n",
                      env={"NOTIFY_SOCKET": notify.path})
    procs.append(rp)
    await rp.start()
    await notify.wait_for("READY=1")
    await rp.ctl("domain", "add", "example.com")
    cred = await rp.ctl("user", "add", "--domain", "example.com")
    c = await Raw.open("127.0.0.1", rp.port)
    assert (await c.login(cred["username"], cred["password"])).startswith("235 ")

    contradictory = (BASE_TOML.replace("retry_max_seconds = 2.0", "retry_max_seconds = 0.5")
                     + "[smtp]\nmax_recipients = 1\n")
    done = await _reload_done(rp, notify, contradictory, "reload_failed")
    assert done["READY"] == "1"
    assert done["STATUS"].startswith("reload failed, running configuration kept:")
    assert "maximum" in done["STATUS"] and f"smtp=127.0.0.1:{rp.port}" in done["STATUS"]
    assert done["ERRNO"] == str(errno.EINVAL)
    assert await _rcpts_accepted(c, 3) == 3  # the valid max_recipients was not applied

    missing = tmp_path / "gone"
    no_cert = (BASE_TOML + f'[smtp]\ntls_cert_file = "{missing}.pem"\n'
               f'tls_key_file = "{missing}.key"\n')
    done = await _reload_done(rp, notify, no_cert, "reload_failed")
    assert done["STATUS"].startswith("reload failed, running configuration kept:")
    assert done["ERRNO"] == str(errno.ENOENT)

    done = await _reload_done(rp, notify, BASE_TOML + "[smtp]\nmax_recipients = 1\n",
                              "reloaded")
    assert done["READY"] == "1" and done["ERRNO"] == "0"
    assert done["STATUS"].startswith("listening on ")
    assert await _rcpts_accepted(c, 3) == 1
    await c.quit()
