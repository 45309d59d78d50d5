"""relayd as a system under test, started through its command-line contract.

    relayd --config PATH --listen 127.0.0.1:PORT --data-dir DIR \
           --control-socket DIR/control.sock --metrics-listen 127.0.0.1:PORT \
           --smarthost 127.0.0.1:SINKPORT

The bench config is the repo's config/relayd.toml (if present) with a few keys
overridden (see ``bench_overrides``); then ``relayctl`` adds the domain
bench.example and an IP-bound user (127.0.0.0/8), whose username/password the
S3 load generator uses for AUTH PLAIN.  smtp-source sends as
sender@bench.example without AUTH (allowed by the IP binding).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from bench.systems import REPO, System
from bench.util import free_port, stop_process, wait_smtp_ready

VENV_BIN = REPO / ".venv" / "bin"
DOMAIN = "bench.example"


def relayd_available() -> bool:
    return (REPO / "relayd" / "app.py").exists()


def _cmd(script: str, module: str) -> list[str]:
    exe = VENV_BIN / script
    if exe.exists() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", module]


def relayd_cmd() -> list[str]:
    return _cmd("relayd", "relayd.app")


def relayctl_cmd() -> list[str] | None:
    """How to run relayctl, or None while control/cli.py does not exist yet."""
    exe = VENV_BIN / "relayctl"
    if not (exe.exists() or (REPO / "control" / "cli.py").exists()):
        return None
    return _cmd("relayctl", "control.cli")


# -- a small TOML writer (strings, numbers, booleans, arrays, nested tables) --------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for section, body in data.items():
        if not isinstance(body, dict):
            continue
        lines.append("")
        lines.append(f"[{section}]")
        for k, v in body.items():
            lines.append(f"{json.dumps(k) if not re.fullmatch(r'[A-Za-z0-9_-]+', k) else k} = "
                         f"{_toml_value(v)}")
    return "\n".join(lines) + "\n"


def bench_config(workdir: Path, dkim: bool, log_level: str | None = None) -> dict[str, Any]:
    base_path = REPO / "config" / "relayd.toml"
    cfg: dict[str, Any] = {}
    if base_path.exists():
        with open(base_path, "rb") as f:
            cfg = tomllib.load(f)
    for k, v in bench_overrides(workdir, dkim).items():
        cfg.setdefault(k, {}).update(v)
    if log_level:
        cfg.setdefault("server", {})["log_level"] = log_level
    return cfg


def bench_overrides(workdir: Path, dkim: bool) -> dict[str, dict[str, Any]]:
    return {
        "server": {"hostname": "relayd.bench.local", "data_dir": str(workdir / "data"),
                   "shutdown_grace_seconds": 5.0},
        # S5 holds 1000 connections from 127.0.0.1; Postfix's per-client limit is off too
        "smtp": {"max_connections": 5000, "max_connections_per_ip": 5000,
                 "max_message_size_bytes": 64 * 1024 * 1024},
        "dkim": {"enabled": dkim},
        # S3-cold makes a fresh account per connection (--cold-logins, 200 by default)
        "limits": {"max_accounts": 100_000,
                   # the IP-bound user is 127.0.0.0/8, as Postfix's mynetworks
                   "max_network_prefix_v4": 8},
    }


class RelaydRelay(System):
    name = "relayd"
    dkim = False
    cold_auth = True

    def start(self) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        data = self.base / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.sock = data / "control.sock"
        self.config_path = self.base / "relayd.toml"
        self.config_path.write_text(dump_toml(self.config()))
        self.cmd = [*relayd_cmd(), "--config", str(self.config_path), "--listen", self.target,
                    "--data-dir", str(data), "--control-socket", str(self.sock),
                    "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                    "--smarthost", self.sink.addr, *self.extra_args()]
        self.logpath = self.base / "relayd.log"
        self.log = open(self.logpath, "wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(self.cmd, cwd=str(REPO), stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env)
        self.env = env
        try:
            wait_smtp_ready("127.0.0.1", self.port, timeout=60, proc=self.proc)
            deadline = time.monotonic() + 30
            while not self.sock.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no control socket at {self.sock}")
                time.sleep(0.1)
            self.relayctl("domain", "add", DOMAIN)
            user = self.relayctl("user", "add", "--domain", DOMAIN,
                                 "--allow-network", "127.0.0.0/8")
            self.auth_user = str(user["username"])
            self.auth_password = str(user["password"])
            self.mail_from = f"sender@{DOMAIN}"
        except Exception as e:
            raise RuntimeError(f"{e}\n--- relayd.log tail ---\n{self.log_tail()}") from e

    def config(self) -> dict[str, Any]:
        """The configuration file's content."""
        return bench_config(self.base, self.dkim)

    def extra_args(self) -> list[str]:
        """Command-line flags after the common ones."""
        return []

    def relayctl(self, *args: str) -> Any:
        base = relayctl_cmd()
        if base is None:
            return self._control_api(*args)
        cmd = [*base, "--socket", str(self.sock), "--json", *args]
        p = subprocess.run(cmd, cwd=str(REPO), capture_output=True, timeout=60, env=self.env,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"relayctl {' '.join(args)} failed rc={p.returncode}: "
                               f"{p.stderr.decode(errors='replace')[-800:]}"
                               f"{p.stdout.decode(errors='replace')[-400:]}")
        out = p.stdout.decode().strip()
        return json.loads(out) if out else None

    def _control_api(self, *args: str) -> Any:
        """Fallback while relayctl does not exist: the same calls through control.client."""
        import msgspec

        from control import schemas
        from control.client import Client

        note = "relayctl (control/cli.py) missing: set up through control.client instead"
        if note not in self.notes:
            self.notes.append(note)
        c = Client(str(self.sock))
        info: msgspec.Struct
        if args[:2] == ("domain", "add"):
            info = c.call("POST", "/v1/domains", schemas.DomainInfo,
                          schemas.DomainAdd(name=args[2]))
        elif args[:2] == ("user", "add"):
            info = c.call("POST", "/v1/users", schemas.Credentials,
                          schemas.UserAdd(domain=args[args.index("--domain") + 1],
                                          allow_networks=[args[args.index("--allow-network") + 1]]))
        else:
            raise RuntimeError(f"no fallback for relayctl {args}")
        return msgspec.to_builtins(info)

    def fresh_accounts(self, n: int) -> list[tuple[str, str]]:
        """``n`` SMTP accounts made through the control socket, a few calls at a time
        (each hashes its password with argon2 in relayd's hashing threads)."""
        from concurrent.futures import ThreadPoolExecutor

        from control import schemas
        from control.client import Client

        def one(_: int) -> tuple[str, str]:
            info = Client(str(self.sock)).call("POST", "/v1/users", schemas.Credentials,
                                               schemas.UserAdd(domain=DOMAIN))
            return info.username, info.password

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, range(n)))

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []

    def problems(self) -> list[str]:
        try:
            text = self.logpath.read_text(errors="replace")
        except OSError:
            return []
        bad = [ln[:300] for ln in text.splitlines()
               if re.search(r'Traceback|"level":\s*"(error|critical)"|\b(ERROR|CRITICAL)\b|'
                            r"level=(error|critical)", ln)]
        out = bad[:5]
        if len(bad) > 5:
            out.append(f"... {len(bad)} error lines in relayd.log in total")
        return out

    def stop(self) -> None:
        t = time.monotonic()
        rc = stop_process(self.proc, timeout=20)
        took = time.monotonic() - t
        if rc not in (0, None, -15):
            self.notes.append(f"relayd exited with {rc} on SIGTERM after {took:.1f}s")
        elif took > 10:
            self.notes.append(f"relayd took {took:.1f}s to stop on SIGTERM")
        self.log.close()


class RelaydDkim(RelaydRelay):
    name = "relayd-dkim"
    dkim = True


class RelaydCluster(RelaydRelay):
    """relayd exactly as ``relayd``, but one node (``bench-a``) of a cluster whose directory
    is on a throwaway PostgreSQL server of its own, durable (bench/pgcluster.py).

    The server's processes count in the measured tree (CPU, RSS, PSS): they are what
    cluster mode adds."""

    name = "relayd-cluster"
    node_name = "bench-a"

    def start(self) -> None:
        from bench.pgcluster import durable_server

        self.pg = durable_server()
        try:
            self.dsn = self.pg.create_database()
            super().start()
        except BaseException:
            self.pg.stop()
            raise

    def config(self) -> dict[str, Any]:
        from bench.pgcluster import cluster_settings

        cfg = super().config()
        cfg.setdefault("cluster", {}).update(cluster_settings(self.base))
        return cfg

    def extra_args(self) -> list[str]:
        from bench.pgcluster import node_flags

        return node_flags(self.dsn, self.node_name)

    def roots(self) -> list[int]:
        from bench.pgcluster import postmaster_pid

        pid = postmaster_pid(self.pg)
        return super().roots() + ([pid] if pid is not None else [])

    def stop(self) -> None:
        try:
            if hasattr(self, "proc"):
                super().stop()
        finally:
            if hasattr(self, "pg"):
                self.pg.stop()
