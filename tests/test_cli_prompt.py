"""relayctl's confirmation dialogue and human output (SEMANTICS §4.2): on a terminal the
CLI shows the last connection, warns when it is recent, and asks for the name again;
off a terminal it needs --confirm. The real CLI runs in a subprocess, on a real
pseudo-terminal where a terminal is needed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import sys
from pathlib import Path

from tests.conftest import RelayHandle, Sink, message
from tests.test_queue_support import install_clock
from tests.test_relayctl import relayctl

REPO = Path(__file__).resolve().parent.parent


class Terminal:
    """relayctl running with a pseudo-terminal as stdin, stdout and stderr."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.output = b""
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.proc: asyncio.subprocess.Process | None = None

    def _readable(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child side is closed
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
        self._chunks.put_nowait(chunk or None)

    async def start(self, sock: str, *args: str) -> None:
        """Start ``relayctl --socket SOCK ARGS`` on the terminal."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control.cli", "--socket", sock, *args,
            stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=REPO)
        os.close(self.slave)
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    async def expect(self, marker: bytes, timeout: float = 20.0) -> str:
        """Read until ``marker`` has appeared; return everything shown so far."""
        async def _read() -> None:
            while marker not in self.output:
                chunk = await self._chunks.get()
                if chunk is None:
                    raise AssertionError(f"{marker!r} never shown:\n{self.output.decode()}")
                self.output += chunk
        await asyncio.wait_for(_read(), timeout)
        return self.output.decode()

    def type(self, line: str) -> None:
        """Type a line (as the operator would, ending with Enter)."""
        os.write(self.master, line.encode() + b"\r")

    async def finish(self) -> tuple[int, str]:
        """Wait for exit; return the exit code and the whole terminal output."""
        assert self.proc is not None
        while True:
            chunk = await asyncio.wait_for(self._chunks.get(), 20)
            if chunk is None:
                break
            self.output += chunk
        rc = await asyncio.wait_for(self.proc.wait(), 20)
        with contextlib.suppress(OSError):
            os.close(self.master)
        return rc, self.output.decode().replace("\r\n", "\n")


async def test_delete_prompts_on_a_terminal_with_recent_use_warning(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """On a terminal, user delete shows the last connection, warns it is within 24 h,
    asks for the username, and deletes when it is typed."""
    user, pw = account
    await (await relay.client(user, pw)).quit()
    term = Terminal()
    await term.start(relay.ctl.path, "user", "delete", user)
    shown = await term.expect(b"Type the username to confirm: ")
    assert f"user {user} (example.com): last connection " in shown
    assert "s ago)" in shown
    assert "warning: this account connected within the last 24 hours" in shown
    assert shown.index("warning:") < shown.index("Type the username")
    term.type(user)
    rc, out = await term.finish()
    assert rc == 0, out
    assert f"deleted {user}" in out
    status, _ = await relay.ctl.call("GET", f"/v1/users/{user}")
    assert status == 404


async def test_prompt_with_wrong_name_deletes_nothing(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """Typing another name at the prompt is refused (exit 1) and the account stays."""
    user, _ = account
    term = Terminal()
    await term.start(relay.ctl.path, "user", "delete", user)
    shown = await term.expect(b"Type the username to confirm: ")
    assert "last connection - (never)" in shown
    assert "warning" not in shown  # never connected: nothing recent to warn about
    term.type(user + "x")
    rc, out = await term.finish()
    assert rc == 1
    assert "confirmation does not match" in out
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["status"] == "active"


async def test_delete_off_a_terminal_needs_confirm(relay: RelayHandle,
                                                   account: tuple[str, str]) -> None:
    """Without a terminal and without --confirm, user delete is a usage error (exit 2)."""
    user, _ = account
    rc, _, err = await relayctl(relay.ctl.path, "user", "delete", user)
    assert rc == 2
    assert "--confirm NAME is required" in err
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["status"] == "active"


async def test_delete_with_confirm_shows_last_connection_and_warns(
        relay: RelayHandle, account: tuple[str, str]) -> None:
    """user delete --confirm still shows the last connection and the 24 h warning."""
    user, pw = account
    await (await relay.client(user, pw)).quit()
    rc, out, err = await relayctl(relay.ctl.path, "user", "delete", user, "--confirm", user)
    assert rc == 0, err
    assert f"user {user} (example.com): last connection 20" in err  # a date, then the age
    assert "connected within the last 24 hours" in err
    assert out.strip() == f"deleted {user}"


async def test_delete_refused_with_queued_mail_then_purged(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """The CLI shows the refusal with the queued count, and --purge-queue deletes."""
    user, pw = account
    install_clock(relay)  # the minute must not roll over while the test looks
    await relay.ctl.ok("POST", f"/v1/users/{user}/limits", {"per_minute": 1})
    c = await relay.client(user, pw)
    for i in range(3):
        await c.sendmail("app@example.com", [f"r{i}@dest.test"], message(f"m{i}"))
    await c.quit()
    await sink.wait_for(1)
    for _ in range(200):
        if (await relay.ctl.ok("GET", f"/v1/users/{user}"))["queued"] == 2:
            break
        await asyncio.sleep(0.02)
    rc, _, err = await relayctl(relay.ctl.path, "user", "delete", user, "--confirm", user)
    assert rc == 1
    assert "still has 2 queued message(s)" in err and "--purge-queue" in err
    rc, out, err = await relayctl(relay.ctl.path, "user", "delete", user, "--confirm", user,
                                  "--purge-queue")
    assert rc == 0, err
    assert out.strip() == f"deleted {user}; purged 2 queued message(s)"


async def test_user_show_human_output(relay: RelayHandle, account: tuple[str, str]) -> None:
    """user show prints status with its reason, last connection, sent, queued, networks."""
    user, pw = account
    await (await relay.client(user, pw)).quit()
    await relay.ctl.ok("POST", f"/v1/users/{user}/disable")
    rc, out, err = await relayctl(relay.ctl.path, "user", "show", user)
    assert rc == 0, err
    lines = dict(line.strip().split(":", 1) for line in out.splitlines()[1:])
    assert out.splitlines()[0] == f"user {user}"
    assert lines["status"].strip() == "disabled (manual)"
    assert lines["domain"].strip() == "example.com"
    assert lines["last connection"].strip().endswith("s ago)")
    assert lines["total sent"].strip() == "0"
    assert lines["queued"].strip() == "0"
    assert lines["networks"].strip() == "-"


async def test_lifecycle_commands_json(relay: RelayHandle, account: tuple[str, str]) -> None:
    """disable, enable and reset-password print the documented JSON through the CLI."""
    user, _ = account
    sock = relay.ctl.path
    rc, out, err = await relayctl(sock, "--json", "user", "disable", user)
    assert rc == 0, err
    assert (json.loads(out)["status"], json.loads(out)["disabled_reason"]) == (
        "disabled", "manual")
    rc, out, _ = await relayctl(sock, "--json", "user", "enable", user)
    assert json.loads(out)["status"] == "active"
    rc, out, _ = await relayctl(sock, "--json", "user", "reset-password", user)
    cred = json.loads(out)
    assert set(cred) == {"username", "password"} and cred["username"] == user
    c = await relay.client(user, cred["password"])
    await c.quit()


async def test_domain_delete_prompts_on_a_terminal(relay: RelayHandle,
                                                   account: tuple[str, str]) -> None:
    """On a terminal, domain delete asks for the domain name and then reports the effect."""
    term = Terminal()
    await term.start(relay.ctl.path, "domain", "delete", "example.com")
    shown = await term.expect(b"Type the domain name to confirm: ")
    assert "1 account(s) will be disabled for good" in shown
    term.type("example.com")
    rc, out = await term.finish()
    assert rc == 0, out
    assert "deleted domain example.com: 1 account(s) disabled, 0 message(s) held" in out


async def test_domain_delete_of_unknown_domain_fails_before_asking(relay: RelayHandle) -> None:
    """domain delete of a name that is not a live domain fails at once (exit 1), no prompt."""
    term = Terminal()
    await term.start(relay.ctl.path, "domain", "delete", "nowhere.example")
    rc, out = await term.finish()
    assert rc == 1
    assert "no such domain: nowhere.example" in out
    assert "confirm" not in out
