"""docs/CLUSTER.md and config/haproxy.cfg stay true: the HAProxy example is valid, every
setting and relayctl command the guide shows exists, and the set-up it describes works.

The end-to-end test runs a real haproxy (a child of the test, on a free loopback port)
in front of two in-process relayd nodes on one throwaway PostgreSQL database, configured
as config/haproxy.cfg is (TCP mode, ``option httpchk GET /health`` on each node's
metrics listener): a message goes through it, and a node cut off from PostgreSQL (so
fenced: /health 503, AUTH 454) is taken out by HAProxy, so every client still logs in.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import re
import shlex
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest

from control import cli
from relayd import config as config_mod
from tests.cluster_support import node_config
from tests.conftest import RelayFactory, RelayHandle, Sink, message
from tests.procs import free_port
from tests.rawsmtp import Raw
from tests.tcpproxy import TcpProxy
from tests.tools import REPO, require_tool

CLUSTER_MD = REPO / "docs" / "CLUSTER.md"
HAPROXY_CFG = REPO / "config" / "haproxy.cfg"
#: relayctl's top-level commands: a backticked span starting with one is a command.
COMMANDS = ("status", "domain", "user", "queue", "log", "throttle", "node")


def _guide() -> str:
    return CLUSTER_MD.read_text("utf-8")


def _blocks(text: str, *langs: str) -> list[str]:
    """The fenced code blocks of ``text`` whose language is one of ``langs``."""
    blocks: list[str] = []
    lang: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if not line.startswith("```"):
            body.append(line)
        elif lang is None:
            lang, body = line[3:].strip(), []
        else:
            if lang in langs:
                blocks.append("\n".join(body) + "\n")
            lang = None
    return blocks


def _haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("haproxy"), "-c", "-f", str(path)],
                          capture_output=True, text=True, timeout=30, check=False)


# -- the HAProxy example ------------------------------------------------------------------
def test_haproxy_example_is_valid() -> None:
    """haproxy -c accepts config/haproxy.cfg with no warning."""
    r = _haproxy_check(HAPROXY_CFG)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Configuration file is valid" in out
    assert "[WARNING]" not in out and "[ALERT]" not in out, out


def test_haproxy_check_catches_a_broken_file(tmp_path: Path) -> None:
    """The check above can fail: a misspelt keyword is refused."""
    bad = tmp_path / "haproxy.cfg"
    bad.write_text(HAPROXY_CFG.read_text("utf-8").replace("balance leastconn",
                                                           "balance leastconns", 1))
    assert _haproxy_check(bad).returncode != 0


def test_haproxy_example_is_what_the_guide_says() -> None:
    """Three nodes per backend, each checked on /health at its metrics port; TCP mode; no
    PROXY protocol (relayd does not speak it); the guide points at the file."""
    text = HAPROXY_CFG.read_text("utf-8")
    lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
    assert "mode tcp" in lines
    assert not any("send-proxy" in ln for ln in lines)
    servers = [ln for ln in lines if ln.startswith("server ")]
    assert len(servers) == 6
    assert all(re.fullmatch(r"server relay[123] 10\.0\.0\.1[123]:\d+ check port 9101", s)
               for s in servers), servers
    assert lines.count("option httpchk GET /health") == 2
    assert lines.count("http-check expect status 200") == 2
    assert {f"bind :{p}" for p in (25, 587, 465)} <= set(lines)
    assert "config/haproxy.cfg" in _guide()


# -- settings and commands the guide shows ------------------------------------------------
def test_every_toml_example_loads() -> None:
    """Each TOML block of the guide is a valid relayd configuration (every key exists)."""
    blocks = _blocks(_guide(), "toml")
    assert blocks
    for block in blocks:
        cfg = config_mod.loads(block, "docs/CLUSTER.md")
        assert cfg.cluster.enabled


def test_every_cluster_key_shown_exists() -> None:
    """Every ``[cluster]`` key in the guide's examples and every backticked
    ``[section] key`` or ``*_seconds`` name is a field of relayd.config."""
    text = _guide()
    fields = {s: {f.name for f in msgspec.structs.fields(t)}
              for s, t in _sections().items()}
    shown: set[tuple[str, str]] = set()
    for block in _blocks(text, "toml"):
        section = ""
        for line in block.splitlines():
            if m := re.match(r"\[(\w+)\]", line):
                section = m.group(1)
            elif m := re.match(r"(\w+)\s*=", line):
                shown.add((section, m.group(1)))
    shown |= set(re.findall(r"`\[(\w+)\] (\w+)`", text))
    shown |= {("cluster", k) for k in re.findall(r"`(\w+_(?:seconds|file|env))`", text)
              if not k.startswith("relayd_")}  # metric names
    assert ("cluster", "key_file") in shown and ("cluster", "fence_seconds") in shown
    unknown = sorted(f"[{s}] {k}" for s, k in shown if k not in fields.get(s, set()))
    assert not unknown, f"docs/CLUSTER.md shows settings relayd lacks: {unknown}"


def _sections() -> dict[str, type[msgspec.Struct]]:
    return {f.name: f.type for f in msgspec.structs.fields(config_mod.Config)}


def test_every_relayctl_command_shown_exists() -> None:
    """Each relayctl line of a code block parses with relayctl's own parser; each
    backticked command (``user networks add``, ``relayctl node forget``) names real
    subcommands and options."""
    text = _guide()
    full = [shlex.split(ln.lstrip("$ "))[1:] for block in _blocks(text, "sh", "")
            for ln in block.splitlines() if ln.lstrip("$ ").startswith("relayctl ")]
    assert ["node", "list"] in full and ["node", "forget", "relay3"] in full
    parser = cli.build_parser()
    for argv in full:
        parser.parse_args(argv)  # UsageError (one line, exit 2) for an unknown one
    spans = [s.removeprefix("relayctl ").split() for s in re.findall(r"`([^`\n]+)`", text)]
    inline = [s for s in spans if s and s[0] in COMMANDS and len(s) > 1]
    assert len(inline) >= 5, inline
    bad = [" ".join(s) for s in inline if not _known(parser, s)]
    assert not bad, f"docs/CLUSTER.md shows relayctl commands that do not exist: {bad}"


def _known(parser: argparse.ArgumentParser, words: Iterable[str]) -> bool:
    """Whether ``words`` walks relayctl's subcommands and options (values are skipped)."""
    for word in words:
        if word in ("...", "NAME"):
            continue
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and word in subs[0].choices:
            parser = subs[0].choices[word]
        elif subs and not word.startswith("-"):
            return False  # not a subcommand where one is expected
        elif word.startswith("--") and word not in parser._option_string_actions:
            return False
    return True


def test_known_catches_a_made_up_command() -> None:
    """The walk above can fail: a made-up subcommand or option is caught."""
    parser = cli.build_parser()
    assert _known(parser, ["user", "networks", "add"])
    assert not _known(parser, ["user", "add", "--allow-networks"])
    assert not _known(parser, ["user", "frobnicate"])
    assert not _known(parser, ["nodes", "list"])
    assert _known(parser, ["node", "forget", "x"])


# -- the set-up working: HAProxy in front of two nodes -------------------------------------
HAPROXY_TEMPLATE = """\
global
    stats socket {stats} level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m
    timeout check 1s
    default-server inter 200ms fall 2 rise 2
frontend smtp
    bind 127.0.0.1:{port}
    default_backend relayd_smtp
backend relayd_smtp
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
{servers}
"""


class HaProxy:
    """haproxy in the foreground, a child of the test, with its stats socket."""

    def __init__(self, tmp: Path, nodes: dict[str, RelayHandle]) -> None:
        self.port = free_port()
        self.stats = tmp / "haproxy.sock"
        servers = "\n".join(
            f"    server {name} {n.host}:{n.port} check port {urlsplit(n.metrics_url).port}"
            for name, n in nodes.items())
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(HAPROXY_TEMPLATE.format(stats=self.stats, port=self.port,
                                                    servers=servers))
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert _haproxy_check(self.cfg).returncode == 0
        self.proc = await asyncio.create_subprocess_exec(
            require_tool("haproxy"), "-db", "-f", str(self.cfg),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def states(self) -> dict[str, str]:
        """Each server's status (UP, DOWN, ...) from ``show stat`` on the stats socket."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats))
        writer.write(b"show stat\n")
        await writer.drain()
        data = (await asyncio.wait_for(reader.read(), 5)).decode()
        writer.close()
        rows = csv.DictReader(io.StringIO(data.lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "relayd_smtp"
                and r["svname"] not in ("BACKEND", "FRONTEND")}

    async def until(self, want: dict[str, str], within: float = 10.0) -> None:
        """Wait until the servers' states are ``want``."""
        began = time.monotonic()
        got: dict[str, str] = {}
        while True:
            if self.stats.exists():
                try:
                    got = await self.states()
                except OSError:
                    got = {}
                if got == want:
                    return
            assert time.monotonic() - began < within, f"haproxy servers {got}, never {want}"
            await asyncio.sleep(0.1)


async def _node(relay_factory: RelayFactory, dsn: str, name: str, tmp: Path,
                address: str) -> RelayHandle:
    """A cluster node as docs/CLUSTER.md sets one up: SMTP and metrics (/health) on the
    node's own address, where HAProxy's ``check port`` looks for it."""
    data = tmp / name
    data.mkdir()
    cfg = node_config(dsn, name, tmp, address, connect_timeout_seconds=1.0)
    return await relay_factory({**cfg, "metrics": {"listen": f"{address}:0"}}, data=data)


@pytest.mark.timeout(60)
async def test_haproxy_in_front_of_two_nodes(relay_factory: RelayFactory, pg_dsn: str,
                                             tmp_path: Path, sink: Sink) -> None:
    """Mail sent to HAProxy reaches a node and is delivered, signed; a node cut off from
    PostgreSQL fences itself, HAProxy's /health check marks it DOWN, and then every
    client coming through HAProxy logs in (no 454 from the fenced node)."""
    db = urlsplit(pg_dsn)
    assert db.hostname is not None and db.port is not None
    a = await _node(relay_factory, pg_dsn, "a", tmp_path, "127.0.0.1")
    async with TcpProxy(db.hostname, db.port) as pg_link:
        b = await _node(relay_factory, pg_dsn.replace(f":{db.port}/", f":{pg_link.port}/"),
                        "b", tmp_path, "127.0.0.2")
        await a.ctl.add_domain("example.com")
        user, password = await a.ctl.add_user("example.com")
        (tmp_path / "haproxy").mkdir()
        haproxy = HaProxy(tmp_path / "haproxy", {"a": a, "b": b})
        await haproxy.start()
        try:
            await haproxy.until({"a": "UP", "b": "UP"})
            raw = await Raw.open("127.0.0.1", haproxy.port)
            assert (await raw.login(user, password)).startswith("235 ")
            assert (await raw.transaction("app@example.com", ["r@dest.test"],
                                          message("through haproxy"))).startswith("250 ")
            raw.close()
            got = await sink.wait_for(1)
            assert b"DKIM-Signature:" in got[0].data
            pg_link.cut()  # b fences itself: /health 503, AUTH 454
            await haproxy.until({"a": "UP", "b": "DOWN"})
            direct = await Raw.open(b.host, b.port)
            assert (await direct.login(user, password)).startswith("454 4.7.0 ")
            direct.close()
            for _ in range(4):
                raw = await Raw.open("127.0.0.1", haproxy.port)
                assert (await raw.login(user, password)).startswith("235 ")
                raw.close()
        finally:
            await haproxy.stop()
