"""The outside tools the suite runs, and the rule that a missing one is a failure.

scripts/install-debs.sh (``make debs``, which ``make test`` runs) installs or unpacks every
command-line tool a test calls: systemd's systemd-analyze, systemd-sysusers and
systemd-tmpfiles, promtool, fail2ban, sqlite3, Postfix's smtp-sink and smtp-source, chattr,
haproxy, and the PostgreSQL server (initdb, pg_ctl, psql: ``postgres_bindir``, for
tests/pgserver.py).
A test that needs one calls ``require_tool`` (or ``postgres_bindir``), which answers its
path or fails the test with a message naming ``make debs``; it never skips, so a check
cannot turn into a green "s" on a machine where the set-up did not run.

The skips left are for what the set-up cannot give (root, a kernel feature). Under
``CI=true`` the conftest hooks (``ci_guard``) turn any skip into a failure, except the
few in ``CI_ALLOWED_SKIPS``, each with the reason it is honest even in CI.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
SETUP = "run `make debs` (sh scripts/install-debs.sh), as `make test` does"

#: Tools install-debs.sh unpacks into .cache instead of installing (no service set up).
UNPACKED = {
    "promtool": CACHE / "prometheus" / "usr" / "bin" / "promtool",
}
#: Where Debian puts tools that are not on a non-root user's PATH (smtp-sink, chattr).
SBIN = "/usr/sbin:/sbin"

#: Skip reasons (a substring) that stay skips under CI=true, and why that is honest.
CI_ALLOWED_SKIPS: dict[str, str] = {
    "a relayd is installed at the shipped unit's path":
        "the machine has relayd installed as a package, so the shipped unit's program exists "
        "and the negative check has nothing to show; the positive verify tests still run",
}


def missing(name: str, detail: str = "") -> NoReturn:
    """Fail the running test: ``name`` belongs to the test set-up and is not there."""
    pytest.fail(f"{name} is missing{detail}: the test set-up installs it; {SETUP}",
                pytrace=False)


def require_tool(name: str, path: str | os.PathLike[str] | None = None) -> str:
    """The path of the command-line tool ``name``, or fail the test (never skip).

    Looked up in order: ``path`` when given; the environment variable named after the
    tool (``PROMTOOL``, ``SYSTEMD_ANALYZE``, ``FAIL2BAN_REGEX``, ...); PATH, then
    /usr/sbin and /sbin; where install-debs.sh unpacks it. An explicit path or variable
    that names no executable fails rather than falling back, so a typo is noticed.
    """
    variable = name.upper().replace("-", "_")
    explicit = str(path) if path is not None else os.environ.get(variable)
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        missing(name, f" at {explicit}" + ("" if path is not None else f" (${variable})"))
    found = shutil.which(name) or shutil.which(name, path=SBIN)
    if found:
        return found
    unpacked = UNPACKED.get(name)
    if unpacked is not None and os.access(unpacked, os.X_OK):
        return str(unpacked)
    missing(name)


#: Where Debian installs each PostgreSQL version's server programs (not on PATH).
POSTGRES_BINDIRS = "/usr/lib/postgresql/*/bin"
#: The PostgreSQL programs tests/pgserver.py runs.
POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "psql")


def _version_key(bindir: Path) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin: versions compare as numbers, not text."""
    return tuple(int(n) for n in re.findall(r"\d+", bindir.parent.name))


def postgres_bindir() -> Path:
    """The directory of the PostgreSQL server programs, or fail the test (never skip).

    ``$PG_BINDIR`` when set (it must hold initdb, pg_ctl and psql, else the test fails
    rather than falling back); else the highest version under /usr/lib/postgresql that
    has them all, as Debian's postgresql package installs them.
    """
    def complete(bindir: Path) -> bool:
        return all(os.access(bindir / name, os.X_OK) for name in POSTGRES_PROGRAMS)

    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        if complete(Path(explicit)):
            return Path(explicit)
        missing("PostgreSQL (initdb, pg_ctl, psql)", f" in {explicit} ($PG_BINDIR)")
    found = sorted((p for p in Path("/").glob(POSTGRES_BINDIRS.lstrip("/")) if complete(p)),
                   key=_version_key)
    if not found:
        missing("PostgreSQL (initdb, pg_ctl, psql)", f" in {POSTGRES_BINDIRS}")
    return found[-1]


def in_ci() -> bool:
    """Whether the suite runs in CI (``CI`` set to true, as CI services do)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _skip_reason(longrepr: Any) -> str:
    """The reason of a skip report (pytest keeps it as (file, line, reason))."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI=true, turn a skip that is not allowed into a failure naming its reason."""
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    reason = _skip_reason(report.longrepr)
    if any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true: {reason}\n"
                       "A skip in CI hides a check. Install what the test needs in "
                       "scripts/install-debs.sh, or add the reason to "
                       "tests/tools.py CI_ALLOWED_SKIPS with why it is honest.")


class CIGuard:
    """The conftest plugin: skips fail under CI=true (tests/ and bench/ register it)."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        _fail_skip(report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
            self) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        report = yield
        _fail_skip(report)
        return report


def register_ci_guard(config: pytest.Config) -> None:
    """Register ``CIGuard`` once (tests/conftest.py and bench/conftest.py both call this)."""
    if not config.pluginmanager.has_plugin("relayd-ci-guard"):
        config.pluginmanager.register(CIGuard(), "relayd-ci-guard")
