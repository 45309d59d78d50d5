"""From a built wheel to a running service: build, install in a fresh venv, install-service, start.

One module-scoped fixture does the expensive part once: copies the source tree
(without .git, .venv and state) to a temporary directory, builds the wheel
there with ``pip wheel --no-deps --no-build-isolation``, creates a fresh
virtual environment whose dependencies come from the test venv (a ``.pth``
line naming its site-packages: nothing is downloaded) and installs the wheel
into it with ``--no-deps``; then runs that venv's ``relayd install-service
--root STAGE``. The tests check the wheel's package data, the installed unit
with ``systemd-analyze verify``, and start relayd with the unit's ExecStart
command line (paths moved under the staging root; run as the test's user, not
the unit's sandbox or User=relayd) on the installed configuration.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.procs import LIVE, free_port
from tests.tools import require_tool

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

#: Package data the wheel must carry, and the repository file each one is.
PACKAGE_DATA = {
    "relayd/data/relayd.toml": "config/relayd.toml",
    "relayd/data/relayd.service": "systemd/relayd.service",
    "relayd/data/relayd.sysusers.conf": "systemd/relayd.sysusers.conf",
    "relayd/data/relayd.tmpfiles.conf": "systemd/relayd.tmpfiles.conf",
    "relayd/data/grafana-dashboard.json": "config/grafana-dashboard.json",
    "relayd/data/prometheus-alerts.yml": "config/prometheus-alerts.yml",
    "relayd/data/README.md": "README.md",
    "relayd/data/OPERATIONS.md": "docs/OPERATIONS.md",
    "relayd/data/SEMANTICS.md": "docs/SEMANTICS.md",
    "relayd/data/CLUSTER.md": "docs/CLUSTER.md",
    "relayd/data/haproxy.cfg": "config/haproxy.cfg",
    "relayd/data/fail2ban-filter.conf": "config/fail2ban/filter.d/relayd.conf",
    "relayd/data/fail2ban-jail.conf": "config/fail2ban/jail.d/relayd.conf",
}

UNIT = "etc/systemd/system/relayd.service"


class Installed:
    """The wheel, the venv it is installed in, and the staging root it installed."""

    def __init__(self, wheel: Path, venv: Path, stage: Path) -> None:
        self.wheel = wheel
        self.venv = venv
        self.stage = stage
        self.relayd = venv / "bin" / "relayd"


def _run(*cmd: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          cwd=cwd, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """relayd built as a wheel, installed in a fresh venv, its service files staged."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".cache", ".*_cache",
        ".hypothesis", ".benchmarks", "out"))
    dist = tmp / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         ".", "-w", dist, cwd=src)
    (wheel,) = dist.glob("relayd-*.whl")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    site = Path(_run(venv / "bin" / "python", "-c",
                     "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    # The test venv's packages (the dependencies) after the new venv's own.
    (site / "test-venv-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
         "--quiet", "--no-deps", "--no-index", wheel)
    stage = tmp / "stage"
    _run(venv / "bin" / "relayd", "install-service", "--root", stage)
    return Installed(wheel, venv, stage)


def test_wheel_carries_the_service_files(installed: Installed) -> None:
    """The wheel holds each service file as package data, with the repository's content."""
    with zipfile.ZipFile(installed.wheel) as whl:
        for member, source in PACKAGE_DATA.items():
            assert whl.read(member) == (REPO / source).read_bytes(), member


def test_installed_relayd_runs_from_the_wheel(installed: Installed) -> None:
    """The venv's relayd imports the installed package, not the checkout."""
    where = _run(installed.venv / "bin" / "python", "-c",
                 "import relayd.app; print(relayd.app.__file__)", cwd=installed.venv)
    assert where.startswith(str(installed.venv)), where
    out = _run(installed.relayd, "--print-default-config", cwd=installed.venv)
    assert out == (REPO / "config" / "relayd.toml").read_text()


def test_installed_unit_passes_systemd_analyze_verify(installed: Installed) -> None:
    """systemd-analyze verify accepts the unit install-service wrote from the wheel."""
    analyze = require_tool("systemd-analyze")
    unit = installed.stage / UNIT
    assert f"ExecStart={installed.relayd} " in unit.read_text()
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "relayd.service" not in proc.stdout + proc.stderr


def _exec_start(installed: Installed) -> list[str]:
    """The unit's ExecStart command line with /etc, /var/lib and /run under the stage."""
    (line,) = [x for x in (installed.stage / UNIT).read_text().splitlines()
               if x.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    moved = []
    for arg in argv:
        for prefix in ("/etc/relayd/", "/var/lib/relayd", "/run/relayd/"):
            if arg.startswith(prefix):
                arg = str(installed.stage) + arg
        moved.append(arg)
    return moved


async def test_relayd_starts_under_the_units_command_line(installed: Installed) -> None:
    """The ExecStart command line with the installed configuration starts relayd: 220 greets."""
    argv = _exec_start(installed)
    assert argv[0] == str(installed.relayd)
    assert argv[argv.index("--config") + 1] == str(installed.stage / "etc/relayd/relayd.toml")
    for d in ("var/lib/relayd", "run/relayd"):  # StateDirectory=, RuntimeDirectory=
        (installed.stage / d).mkdir(parents=True, exist_ok=True, mode=0o750)
    port = free_port()
    # Free ports instead of the installed file's 2525 and 9101: other tests run alongside.
    argv += ["--listen", f"127.0.0.1:{port}", "--metrics-listen", ""]
    log = installed.stage / "relayd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYD_", "PYTHON"))}
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd="/", stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL, env=env)
    LIVE.add(proc)
    try:
        greeting = b""
        for _ in range(600):
            assert proc.returncode is None, log.read_text()[-3000:]
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                greeting = await asyncio.wait_for(r.readline(), 5)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        assert greeting.startswith(b"220 "), log.read_text()[-3000:]
        assert (installed.stage / "var/lib/relayd/relayd.sqlite3").exists()
        assert (installed.stage / "run/relayd/control.sock").exists()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        LIVE.discard(proc)
