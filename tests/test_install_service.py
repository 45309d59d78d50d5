"""``relayd install-service``: the service files land where systemd looks, under a staging root.

Runs the real command (``python -m relayd.app install-service --root TMP``):
nothing outside the temporary directory is touched. ``systemd-analyze
verify`` checks the installed unit (systemd-analyze comes with the test
set-up, scripts/install-debs.sh; missing, the test fails). The wheel's
content and a start from an installed wheel are in tests/test_install_wheel.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relayd import install
from tests.tools import require_tool

REPO = Path(__file__).resolve().parent.parent
SHIPPED_UNIT = REPO / "systemd" / "relayd.service"

#: Installed path (under the root) -> the repository file it is a copy of.
FILES = {
    "etc/systemd/system/relayd.service": None,  # rewritten: compared separately
    "usr/lib/sysusers.d/relayd.conf": "systemd/relayd.sysusers.conf",
    "usr/lib/tmpfiles.d/relayd.conf": "systemd/relayd.tmpfiles.conf",
    "etc/relayd/relayd.toml": "config/relayd.toml",
    "usr/share/relayd/grafana-dashboard.json": "config/grafana-dashboard.json",
    "usr/share/relayd/prometheus-alerts.yml": "config/prometheus-alerts.yml",
    "usr/share/relayd/fail2ban/filter.d/relayd.conf": "config/fail2ban/filter.d/relayd.conf",
    "usr/share/relayd/fail2ban/jail.d/relayd.conf": "config/fail2ban/jail.d/relayd.conf",
    "usr/share/doc/relayd/README.md": "README.md",
    "usr/share/doc/relayd/OPERATIONS.md": "docs/OPERATIONS.md",
    "usr/share/doc/relayd/SEMANTICS.md": "docs/SEMANTICS.md",
    "usr/share/doc/relayd/CLUSTER.md": "docs/CLUSTER.md",
    "usr/share/relayd/haproxy.cfg": "config/haproxy.cfg",
}


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd.app", "install-service", "--root", str(root), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


def _exec_start(unit: Path) -> str:
    (line,) = [x for x in unit.read_text().splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = require_tool("systemd-analyze")
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_installs_every_file_under_the_root(tmp_path: Path) -> None:
    """Each packaged file is installed at its systemd/FHS path with the repository's content."""
    r = _install(tmp_path)
    assert r.returncode == 0, r.stderr
    for dest, source in FILES.items():
        assert (tmp_path / dest).is_file(), dest
        if source is not None:
            assert (tmp_path / dest).read_bytes() == (REPO / source).read_bytes(), dest


def test_modes_keep_the_configuration_private(tmp_path: Path) -> None:
    """The configuration is 0640 in a 0750 directory; the other files are 0644."""
    assert _install(tmp_path).returncode == 0
    for dest in FILES:
        mode = (tmp_path / dest).stat().st_mode & 0o7777
        assert mode == (0o640 if dest.endswith(".toml") else 0o644), dest
    assert (tmp_path / "etc" / "relayd").stat().st_mode & 0o7777 == 0o750


def test_exec_start_names_the_installed_relayd(tmp_path: Path) -> None:
    """ExecStart runs this installation's relayd program; the rest of the unit is unchanged."""
    assert _install(tmp_path).returncode == 0
    unit = tmp_path / "etc" / "systemd" / "system" / "relayd.service"
    program, *flags = _exec_start(unit).split()
    assert os.path.isabs(program) and os.access(program, os.X_OK)
    assert Path(program).parent == Path(sys.executable).parent
    assert flags == _exec_start(SHIPPED_UNIT).split()[1:]
    shipped = [x for x in SHIPPED_UNIT.read_text().splitlines() if not x.startswith("ExecStart=")]
    assert [x for x in unit.read_text().splitlines() if not x.startswith("ExecStart=")] == shipped


def test_existing_configuration_is_never_replaced(tmp_path: Path) -> None:
    """A second install keeps the administrator's relayd.toml and says so."""
    conf = tmp_path / "etc" / "relayd" / "relayd.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text('[server]\nhostname = "mine.example"\n')
    r = _install(tmp_path)
    assert r.returncode == 0, r.stderr
    assert conf.read_text() == '[server]\nhostname = "mine.example"\n'
    assert "kept" in r.stdout and str(conf) in r.stdout


def test_reinstall_replaces_an_old_unit(tmp_path: Path) -> None:
    """An upgrade replaces a changed unit file (the configuration stays)."""
    unit = tmp_path / "etc" / "systemd" / "system" / "relayd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/old/relayd\n")
    r = _install(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "WatchdogSec=" in unit.read_text()
    assert f"replace   {unit}" in r.stdout


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    """--dry-run lists what it would install and creates no file."""
    r = _install(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    assert r.stdout.count("install   ") == len(FILES)


def test_prefix_and_unit_dir_for_packagers(tmp_path: Path) -> None:
    """--prefix moves the snippets and share files; --unit-dir the unit; Documentation= follows."""
    r = _install(tmp_path, "--prefix", "/usr/local", "--unit-dir", "/usr/lib/systemd/system")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "usr/local/lib/sysusers.d/relayd.conf").is_file()
    assert (tmp_path / "usr/local/share/relayd/prometheus-alerts.yml").is_file()
    unit = (tmp_path / "usr/lib/systemd/system/relayd.service").read_text()
    assert "Documentation=file:/usr/local/share/doc/relayd/README.md" in unit


def test_a_read_only_target_is_a_clear_error(tmp_path: Path) -> None:
    """A root that cannot be written gives exit 1 and one line naming the path."""
    blocker = tmp_path / "root"
    blocker.write_text("a file, not a directory")
    r = _install(blocker)
    assert r.returncode == 1
    assert "cannot write" in r.stderr and "Traceback" not in r.stderr


def test_systemd_analyze_verify_passes_on_the_installed_unit(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the installed unit as it is (no stubbed program)."""
    assert _install(tmp_path).returncode == 0
    r = _verify(tmp_path / "etc" / "systemd" / "system" / "relayd.service")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "relayd.service" not in r.stdout + r.stderr


def test_systemd_analyze_verify_fails_on_the_shipped_unit(tmp_path: Path) -> None:
    """The check above is meaningful: the shipped unit's /usr/bin/relayd does not exist here."""
    if os.path.exists(_exec_start(SHIPPED_UNIT).split()[0]):
        pytest.skip("a relayd is installed at the shipped unit's path")
    copy = tmp_path / "relayd.service"
    shutil.copy(SHIPPED_UNIT, copy)
    r = _verify(copy)
    assert r.returncode != 0
    assert "/usr/bin/relayd is not executable" in r.stdout + r.stderr


@pytest.mark.parametrize(("path", "word"), [
    ("/opt/relayd/bin/relayd", "/opt/relayd/bin/relayd"),
    ("/opt/my relayd/bin/relayd", '"/opt/my relayd/bin/relayd"'),
    ("/opt/100%/bin/relayd", "/opt/100%%/bin/relayd"),
    ("/opt/$HOME/relayd", "/opt/$$HOME/relayd"),
])
def test_unit_quote(path: str, word: str) -> None:
    """A program path becomes one ExecStart word: spaces quoted, % and $ escaped."""
    assert install.unit_quote(path) == word


def test_unit_text_refuses_a_relative_program() -> None:
    """ExecStart needs an absolute path; a relative one is refused."""
    with pytest.raises(ValueError, match="absolute"):
        install.unit_text(SHIPPED_UNIT.read_text(), "bin/relayd")


def test_relayd_candidates_prefer_the_running_script() -> None:
    """The console script that runs comes first, then the scripts and interpreter directories."""
    assert install.relayd_candidates("/v/bin/relayd", "/v/bin/python3", "/v/bin") == [
        "/v/bin/relayd"]
    assert install.relayd_candidates("/x/app.py", "/v/bin/python3", "/s") == [
        "/s/relayd", "/v/bin/relayd"]
