"""relayctl's output, as an operator reads it (issue 16 item 9): ``queue show`` with
times and durations, ``log`` saying when its limit stopped it, a domain delete's
effect on each queue, the interactive delete refused before the prompt when the
account has queued mail, one-line errors with the documented exit codes, and
``--json`` as the only thing on stdout. The real CLI in a subprocess, over the real
control socket of a real relay (and, for errors, of a server that misbehaves)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import RelayHandle, Sink, message
from tests.test_cli_prompt import Terminal
from tests.test_lifecycle_queue import limited_account, send, states
from tests.test_queue_support import until
from tests.test_relayctl import relayctl

REPO = Path(__file__).resolve().parent.parent
WHEN = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
DURATION = r"\d+[smhd]( \d\d[smh])?"


async def test_queue_show_prints_times_and_durations(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """queue show: the receive time and the next attempt as local times with a duration,
    the error and the recipients as text; no raw epoch seconds or float ages."""
    user, pw = account
    sink.script.append("451 4.3.0 try later")
    [mid] = await send(relay, user, pw, 1)
    await until(states(relay, user), ["deferred"])
    rc, out, err = await relayctl(relay.ctl.path, "queue", "show", mid)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"message {mid}"
    fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:]
                                                 if not ln.startswith("    "))}
    assert re.fullmatch(rf"{WHEN} \({DURATION} ago\)", fields["received"]), out
    assert re.fullmatch(rf"{WHEN} \((in {DURATION}|now)\)", fields["next attempt"]), out
    assert fields["state"] == "deferred"
    assert fields["user"] == user and fields["attempts"] == "1"
    assert fields["last error"] == "4.3.0 try later"
    assert fields["recipients"] == "1" and lines[-1].strip() == "m0@dest.test"
    assert not re.search(r"\d{9,}\.\d", out), out  # no epoch seconds, no float age
    rc, out, _ = await relayctl(relay.ctl.path, "queue", "list")
    assert re.search(rf"{mid}\s+{user}\s+deferred\s+{DURATION}\s", out), out


async def test_log_says_when_it_stopped_at_its_limit(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """log --limit 2 of 3 entries says so on stderr (and "more" in JSON); a limit that
    holds everything says nothing."""
    user, pw = account
    await send(relay, user, pw, 3)
    await sink.wait_for(3)
    await until(lambda: _log_count(relay, user), 3)
    rc, out, err = await relayctl(relay.ctl.path, "log", "--limit", "2")
    assert rc == 0, err
    assert len(out.splitlines()) == 3  # header + 2 rows
    assert err.strip() == ("-- 2 entries shown, the limit; more match: --limit N"
                           " (up to 10000) or --since to see them")
    rc, out, err = await relayctl(relay.ctl.path, "--json", "log", "--limit", "2")
    lst = json.loads(out)
    assert (len(lst["entries"]), lst["more"]) == (2, True)
    assert "2 entries shown, the limit" in err
    rc, out, err = await relayctl(relay.ctl.path, "--json", "log", "--limit", "3")
    assert (len(json.loads(out)["entries"]), json.loads(out)["more"], err) == (3, False, "")


async def _log_count(relay: RelayHandle, user: str) -> int:
    return len((await relay.ctl.ok("GET", "/v1/log", user=user))["entries"])


async def test_domain_delete_reports_each_queue(relay: RelayHandle, sink: Sink) -> None:
    """domain delete says what happened to each queue: held (not yet attempted), retrying
    (deferred, on schedule) and purged, as messages and recipients."""
    await relay.ctl.add_domain("example.com")
    retrier, rpw = await relay.ctl.add_user()
    sink.script.append("451 4.3.0 try later")
    c = await relay.client(retrier, rpw)
    await c.sendmail("app@example.com", ["a@dest.test", "b@dest.test"], message("two"))
    await c.quit()
    await until(states(relay, retrier), ["deferred"])
    await limited_account(relay, sink)  # a second account: 2 messages waiting for the limit
    rc, out, err = await relayctl(relay.ctl.path, "domain", "delete", "example.com",
                                  "--confirm", "example.com")
    assert rc == 0, err
    assert out.splitlines() == [
        "deleted domain example.com: 2 account(s) disabled, 2 message(s) held",
        "  held:     2 message(s), 2 recipient(s): not sent; `queue purge --user NAME`"
        " removes them",
        "  retrying: 1 message(s), 2 recipient(s): retries go on as scheduled",
        "  purged:   0 message(s), 0 recipient(s)"]


async def test_domain_delete_json_carries_the_counts(relay: RelayHandle,
                                                     account: tuple[str, str]) -> None:
    """The answer's schema: held, retrying and purged, each messages and recipients."""
    rc, out, err = await relayctl(relay.ctl.path, "--json", "domain", "delete",
                                  "example.com", "--confirm", "example.com")
    assert rc == 0, err
    zero = {"messages": 0, "recipients": 0}
    assert json.loads(out) == {"name": "example.com", "accounts_disabled": 1,
                               "messages_held": 0, "held": zero, "retrying": zero,
                               "purged": zero}
    assert "1 account(s) will be disabled for good" in err


async def test_interactive_delete_refused_before_the_prompt(
        relay: RelayHandle, sink: Sink) -> None:
    """On a terminal, user delete of an account with queued mail is refused (exit 1, the
    count and --purge-queue named) without asking for the name; with --purge-queue the
    prompt comes and the delete purges."""
    await relay.ctl.add_domain("example.com")
    user, _, _ = await limited_account(relay, sink)
    term = Terminal()
    await term.start(relay.ctl.path, "user", "delete", user)
    rc, out = await term.finish()
    assert rc == 1, out
    assert f"{user} still has 2 queued message(s)" in out and "--purge-queue" in out
    assert "Type the username" not in out
    assert (await relay.ctl.ok("GET", f"/v1/users/{user}"))["queued"] == 2
    term = Terminal()
    await term.start(relay.ctl.path, "user", "delete", user, "--purge-queue")
    await term.expect(b"Type the username to confirm: ")
    term.type(user)
    rc, out = await term.finish()
    assert rc == 0, out
    assert f"deleted {user}; purged 2 queued message(s)" in out


async def test_delete_dry_run_changes_nothing(relay: RelayHandle, sink: Sink) -> None:
    """The API's dry run: refused like the delete (409 with the count), or what it would
    purge; the account and its mail stay either way."""
    await relay.ctl.add_domain("example.com")
    user, _, _ = await limited_account(relay, sink)
    status, body = await relay.ctl.call("POST", f"/v1/users/{user}/delete",
                                        {"confirm": "", "dry_run": True})
    assert (status, body["code"]) == (409, "queue_not_empty")
    assert "still has 2 queued message(s)" in body["error"]
    body = await relay.ctl.ok("POST", f"/v1/users/{user}/delete",
                              {"confirm": "", "dry_run": True, "purge_queue": True})
    assert body == {"username": user, "purged": 2, "dry_run": True}
    info = await relay.ctl.ok("GET", f"/v1/users/{user}")
    assert (info["status"], info["queued"]) == ("active", 2)


def _one_line(rc: int, out: str, err: str, code: int) -> str:
    assert (rc, out) == (code, ""), (rc, out, err)
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("relayctl") and "Traceback" not in err, err  # "relayctl log: ..."
    return err.strip()


async def test_errors_are_one_line_with_their_exit_code(
        relay: RelayHandle, account: tuple[str, str], tmp_path: Path) -> None:
    """Refused (1), bad usage (2), unreachable (3): one line on stderr, stdout empty, with
    or without --json; a name with a newline in an answer is escaped, not a second line."""
    sock = relay.ctl.path
    for json_flag in ((), ("--json",)):
        assert _one_line(*await relayctl(sock, *json_flag, "user", "show", "nobody"), 1) \
            == "relayctl: no such user: nobody"
        assert _one_line(*await relayctl(sock, *json_flag, "domain", "show", "no.example"),
                         1) == "relayctl: no such domain: no.example"
        assert _one_line(*await relayctl(sock, *json_flag, "user", "show", "a\nb"), 1) \
            == "relayctl: no such user: a\\nb"
        _one_line(*await relayctl(sock, *json_flag, "queue", "show", "0000000000000001"), 1)
        _one_line(*await relayctl(sock, *json_flag, "queue", "hold", "xyz"), 2)
        assert "not a message id" in _one_line(
            *await relayctl(sock, *json_flag, "queue", "show", "xyz"), 2)
        _one_line(*await relayctl(sock, *json_flag, "log", "--limit", "0"), 2)
        _one_line(*await relayctl(sock, *json_flag, "user", "limits", "x", "--per-day", "-1"),
                  2)
        _one_line(*await relayctl(sock, *json_flag, "frobnicate"), 2)
        _one_line(*await relayctl(sock, *json_flag, "user"), 2)
        _one_line(*await relayctl(tmp_path / "none.sock", *json_flag, "status"), 3)
    dead = tmp_path / "dead.sock"  # a socket file nothing listens on: relayd is down
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    assert "nothing is listening" in _one_line(*await relayctl(dead, "status"), 3)


@contextlib.asynccontextmanager
async def _answering(path: Path, status: str, body: bytes) -> AsyncIterator[None]:
    """A control socket whose server answers every request with ``status`` and ``body``."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, str(path))
    try:
        yield
    finally:
        server.close()


@pytest.mark.parametrize(("status", "body", "want"), [
    ("500 Internal Server Error", b'{"error": "internal error\\n(see the log)",'
     b' "code": "internal"}', "relayctl: internal error\\n(see the log)"),
    ("503 Service Unavailable", b"<html>\nbusy\n</html>", "relayctl: relayd answered HTTP 503"),
    ("429 Too Many Requests", b'{"error": "slow down", "code": "x"}', "relayctl: slow down"),
])
async def test_error_answers_are_one_line(tmp_path: Path, status: str, body: bytes,
                                          want: str) -> None:
    """A 4xx/5xx answer, JSON or not, with newlines or not: one line, exit 1."""
    path = tmp_path / "ctl.sock"
    async with _answering(path, status, body):
        for args in (("status",), ("--json", "user", "show", "x")):
            assert _one_line(*await relayctl(path, *args), 1) == want


async def test_json_is_the_only_thing_on_stdout(
        relay: RelayHandle, sink: Sink, account: tuple[str, str]) -> None:
    """Every command with --json prints one JSON document on stdout: notes, warnings and
    the confirmation summary go to stderr."""
    user, pw = account
    sock = relay.ctl.path
    sink.script += ["451 4.3.0 try later"] * 2
    mid, gone = await send(relay, user, pw, 2)
    await until(states(relay, user), ["deferred", "deferred"])
    await (await relay.client(user, pw)).quit()  # a recent connection: delete warns
    other = json.loads((await relayctl(sock, "--json", "user", "add", "--domain",
                                       "example.com"))[1])["username"]
    commands = [
        ["status"], ["domain", "add", "gone.example"], ["domain", "list"],
        ["domain", "show", "example.com"],
        ["domain", "set", "example.com", "--check-header-from", "on"],
        ["domain", "delete", "gone.example", "--confirm", "gone.example"],
        ["user", "list"], ["user", "show", user], ["user", "disable", other],
        ["user", "enable", other], ["user", "reset-password", other],
        ["user", "limits", other, "--per-day", "5"],
        ["user", "networks", "add", other, "10.9.8.0/24"], ["user", "dormant"],
        ["queue", "list"], ["queue", "show", mid], ["queue", "hold", mid],
        ["queue", "release", mid], ["queue", "delete", gone], ["queue", "retry"], ["log"],
        ["log", "--limit", "1"], ["log", "--message", mid], ["throttle", "list"],
        ["throttle", "clear"], ["queue", "purge", "--user", user],
        ["user", "delete", user, "--confirm", user],
    ]
    for cmd in commands:
        rc, out, err = await relayctl(sock, "--json", *cmd)
        assert rc == 0, (cmd, err)
        assert isinstance(json.loads(out), dict), (cmd, out)
    assert "connected within the last 24 hours" in err  # the last: user delete's warning


async def test_json_prompt_goes_to_stderr(relay: RelayHandle,
                                          account: tuple[str, str]) -> None:
    """The confirmation prompt (stdin a terminal, stdout a pipe) is on stderr: stdout is
    the answer's JSON alone."""
    user, _ = account
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control.cli", "--socket", relay.ctl.path, "--json", "user",
        "delete", user, stdin=slave, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=REPO)
    os.close(slave)
    try:
        assert proc.stderr is not None
        shown = b""
        while b"Type the username to confirm: " not in shown:
            shown += await asyncio.wait_for(proc.stderr.read(1), 20)
        os.write(master, user.encode() + b"\r")
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"username": user, "purged": 0}


async def test_closed_stdout_is_no_traceback(relay: RelayHandle,
                                             account: tuple[str, str]) -> None:
    """stdout closed before relayctl writes (``relayctl ... | head`` done early): exit 141
    like a shell pipeline, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control.cli", "--socket", relay.ctl.path, "user", "list",
            stdin=asyncio.subprocess.DEVNULL, stdout=write_end,
            stderr=asyncio.subprocess.PIPE, cwd=REPO)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, err.decode()) == (141, "")
