"""The benchmark harness's smoke tests follow the suite's rule: under CI=true a skip fails."""

from __future__ import annotations

import pytest

from tests.tools import register_ci_guard


def pytest_configure(config: pytest.Config) -> None:
    """Under CI=true a skip fails the test (tests/tools.py says which skips stay)."""
    register_ci_guard(config)
