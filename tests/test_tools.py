"""The suite's rule for outside tools: missing is a failure, and in CI no skip hides a check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import CI_ALLOWED_SKIPS, REPO, UNPACKED, require_tool

CONFTEST = """
from tests.tools import register_ci_guard

def pytest_configure(config):
    register_ci_guard(config)
"""


def _pytest(tmp_path: Path, body: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    """Run pytest on one test file holding ``body`` with the suite's guard, CI set or not."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_it.py").write_text("import pytest\n\n" + body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the guard alone, quickly
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_missing_tool_fails_naming_the_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool found nowhere fails the test (not a skip) and says to run make debs."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match=r"relayd-no-such-tool is missing.*make debs"):
        require_tool("relayd-no-such-tool")


def test_variable_naming_no_program_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """PROMTOOL pointing nowhere fails with the path and the variable, instead of searching on."""
    monkeypatch.setenv("PROMTOOL", "/nonexistent/promtool")
    with pytest.raises(pytest.fail.Exception, match=r"/nonexistent/promtool \(\$PROMTOOL\)"):
        require_tool("promtool")


def test_promtool_is_found_where_the_setup_unpacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PROMTOOL and off PATH, promtool is found in .cache, where install-debs.sh puts it."""
    monkeypatch.delenv("PROMTOOL", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert require_tool("promtool") == str(UNPACKED["promtool"])


def test_skip_fails_under_ci(tmp_path: Path) -> None:
    """Under CI=true a test that skips is reported as a failure with its reason."""
    r = _pytest(tmp_path, "def test_x():\n    pytest.skip('frobnicator not installed')\n", "true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "skipped under CI=true: frobnicator not installed" in r.stdout
    assert "1 failed" in r.stdout


def test_skipif_and_module_skip_fail_under_ci(tmp_path: Path) -> None:
    """A skipif mark and a module-level skip also fail under CI=true."""
    body = ("@pytest.mark.skipif(True, reason='no frobnicator')\ndef test_x():\n    pass\n")
    r = _pytest(tmp_path, body, "true")
    assert r.returncode == 1 and "skipped under CI=true: no frobnicator" in r.stdout, r.stdout
    module = "pytest.skip('no frobnicator at all', allow_module_level=True)\n"
    r = _pytest(tmp_path, module, "true")
    assert r.returncode != 0 and "skipped under CI=true: no frobnicator at all" in r.stdout, \
        r.stdout


def test_skip_stays_a_skip_outside_ci(tmp_path: Path) -> None:
    """Without CI a skip is still a skip (a developer without root is not failed)."""
    r = _pytest(tmp_path, "def test_x():\n    pytest.skip('needs root')\n", None)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout


def test_allowed_skip_stays_a_skip_under_ci(tmp_path: Path) -> None:
    """A reason listed in CI_ALLOWED_SKIPS stays a skip under CI=true; xfail is untouched."""
    reason = next(iter(CI_ALLOWED_SKIPS))
    body = (f"def test_x():\n    pytest.skip({reason!r})\n\n"
            "@pytest.mark.xfail(reason='known')\ndef test_y():\n    assert False\n")
    r = _pytest(tmp_path, body, "true")
    assert r.returncode == 0 and "1 skipped, 1 xfailed" in r.stdout, r.stdout
