"""Where relayd finds its configuration: --config, $RELAYD_CONFIG, the system file, defaults.

Real ``relayd`` processes (``--check-config``, and one started daemon). The
system path is replaced by ``$RELAYD_SYSTEM_CONFIG`` in every test, so a real
/etc/relayd/relayd.toml on the machine changes nothing here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relayd import config
from tests.procs import LIVE, free_port
from tests.test_ops_support import log_lines

REPO = Path(__file__).resolve().parent.parent


def _relayd(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    """relayd with RELAYD_CONFIG unset and the system path in ``env`` (or absent)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RELAYD_CONFIG", "RELAYD_SYSTEM_CONFIG")}
    base.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run([sys.executable, "-m", "relayd.app", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env={**base, **env})


def _file(path: Path, hostname: str) -> str:
    path.write_text(f'[server]\nhostname = "{hostname}"\n')
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Three valid configuration files and a system path that does not exist."""
    return {
        "cli": _file(tmp_path / "cli.toml", "cli.test"),
        "env": _file(tmp_path / "env.toml", "env.test"),
        "system": _file(tmp_path / "system.toml", "system.test"),
        "absent": str(tmp_path / "no-such-system.toml"),
    }


def test_config_flag_wins(files: dict[str, str]) -> None:
    """--config is used even when $RELAYD_CONFIG and the system file exist."""
    r = _relayd("--config", files["cli"], "--check-config",
                RELAYD_CONFIG=files["env"], RELAYD_SYSTEM_CONFIG=files["system"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"configuration ok: {files['cli']} (--config)"


def test_environment_variable_beats_the_system_file(files: dict[str, str]) -> None:
    """Without --config, $RELAYD_CONFIG is used even when the system file exists."""
    r = _relayd("--check-config", RELAYD_CONFIG=files["env"],
                RELAYD_SYSTEM_CONFIG=files["system"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"configuration ok: {files['env']} (RELAYD_CONFIG)"


def test_system_file_is_used_when_it_exists(files: dict[str, str]) -> None:
    """Without --config or $RELAYD_CONFIG, the system file is used when it exists."""
    r = _relayd("--check-config", RELAYD_SYSTEM_CONFIG=files["system"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"configuration ok: {files['system']} (system)"


def test_built_in_defaults_when_no_file(files: dict[str, str]) -> None:
    """With no flag, no variable and no system file, the built-in defaults are checked."""
    r = _relayd("--check-config", RELAYD_SYSTEM_CONFIG=files["absent"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "configuration ok: none (built-in defaults) (built-in)"


def test_a_bad_system_file_is_an_error(tmp_path: Path) -> None:
    """A system file that exists but is wrong stops relayd (exit 2), naming the key."""
    bad = tmp_path / "relayd.toml"
    bad.write_text("[smtp]\nlissen = 1\n")
    r = _relayd("--check-config", RELAYD_SYSTEM_CONFIG=str(bad))
    assert r.returncode == 2
    assert "lissen" in r.stderr and str(bad) in r.stderr


def test_a_missing_environment_file_is_an_error(files: dict[str, str]) -> None:
    """$RELAYD_CONFIG naming no file is an error (exit 2), not a fall-back."""
    r = _relayd("--check-config", RELAYD_CONFIG=files["absent"],
                RELAYD_SYSTEM_CONFIG=files["system"])
    assert r.returncode == 2
    assert "cannot read" in r.stderr


def test_print_default_config_writes_the_documented_file(tmp_path: Path) -> None:
    """--print-default-config writes config/relayd.toml byte for byte and exits 0."""
    r = _relayd("--print-default-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (REPO / "config" / "relayd.toml").read_text()
    assert config.loads(r.stdout) == config.Config(
        server=config.ServerConfig(hostname="relay.localhost"))


def test_locate_order() -> None:
    """locate: flag, then variable (empty = unset), then an existing system file, then none."""
    assert config.locate("a", "b", "/s", True) == config.Located(path="a", source="--config")
    assert config.locate(None, "b", "/s", True) == config.Located(path="b",
                                                                  source="RELAYD_CONFIG")
    assert config.locate(None, "", "/s", True) == config.Located(path="/s", source="system")
    assert config.locate(None, None, "/s", False) == config.Located(path=None,
                                                                     source="built-in")


async def _started_and_logged(proc: asyncio.subprocess.Process, log: Path,
                              port: int) -> list[dict[str, object]]:
    """Wait until relayd greets on ``port``; return its log lines."""
    for _ in range(300):
        assert proc.returncode is None, log.read_text()[-2000:]
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            line = await asyncio.wait_for(r.readline(), 2)
            w.close()
            if line.startswith(b"220"):
                return log_lines(log)
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("relayd did not start")


@pytest.mark.parametrize("which", ["system", "built-in"])
async def test_start_logs_which_configuration_is_used(tmp_path: Path, which: str) -> None:
    """A started relayd logs the file it read; on built-in defaults a warning with ./var."""
    system = tmp_path / "system.toml"
    if which == "system":
        system.write_text(f'[server]\ndata_dir = "{tmp_path / "state"}"\n')
    port = free_port()
    log = tmp_path / "relayd.log"
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}
    env.update(RELAYD_SYSTEM_CONFIG=str(system), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd.app", "--listen", f"127.0.0.1:{port}",
            "--metrics-listen", "", cwd=tmp_path, stdout=out, stderr=out,
            stdin=asyncio.subprocess.DEVNULL, env=env)
    LIVE.add(proc)
    try:
        lines = await _started_and_logged(proc, log, port)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)
        LIVE.discard(proc)
    (line,) = [x for x in lines if x.get("event") == "config_file"]
    if which == "system":
        assert (line["path"], line["source"], line["level"]) == (str(system), "system", "info")
        assert (tmp_path / "state" / "relayd.sqlite3").exists()
        assert not (tmp_path / "var").exists()
    else:
        assert (line["path"], line["source"], line["level"]) == (None, "built-in", "warning")
        assert line["data_dir"] == "./var"
        assert (tmp_path / "var" / "relayd.sqlite3").exists()
