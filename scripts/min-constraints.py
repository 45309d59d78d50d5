#!/usr/bin/env python3
"""Pip constraints pinning every runtime dependency at its declared floor.

Reads ``[project] dependencies`` from pyproject.toml and writes one
``name==floor`` line per dependency (its ``>=`` or ``==`` version, environment
marker kept), so ``make test-min`` installs exactly the versions the
pyproject promises to work with and cannot drift from them. A dependency
without a floor is an error: every one must have one.

    python3 scripts/min-constraints.py [--pyproject PATH] > constraints.txt
    python3 scripts/min-constraints.py --check   # run by the venv's python:
        # exit 1 unless every runtime dependency is installed at its floor
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")
_FLOOR = re.compile(r"^(?:>=|==)\s*([0-9][A-Za-z0-9.+!-]*)$")


def floors(pyproject: Path) -> list[tuple[str, str, str]]:
    """(name, floor version, environment marker or "") per runtime dependency."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        req, _, marker = dep.partition(";")
        m = _NAME.match(req)
        if m is None:
            raise SystemExit(f"min-constraints: cannot parse dependency {dep!r}")
        name, spec = m.group(1), m.group(2).strip()
        found = [f.group(1) for part in spec.split(",")
                 if (f := _FLOOR.match(part.strip())) is not None]
        if len(found) != 1:
            raise SystemExit(f"min-constraints: {dep!r} needs exactly one >= or == floor")
        out.append((name, found[0], marker.strip()))
    return out


def _same(a: str, b: str) -> bool:
    """Equal as pip's ``==`` compares releases: 0.19 is 0.19.0."""
    return re.sub(r"(\.0+)+$", "", a.lower()) == re.sub(r"(\.0+)+$", "", b.lower())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", type=Path,
                    default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    ap.add_argument("--check", action="store_true",
                    help="verify the running interpreter has every floor installed")
    args = ap.parse_args()
    deps = floors(args.pyproject)
    if not args.check:
        for name, version, marker in deps:
            print(f"{name}=={version}" + (f" ; {marker}" if marker else ""))
        return 0
    bad = 0
    for name, version, marker in deps:
        if marker:
            from packaging.markers import Marker  # a test dependency (pytest's)
            if not Marker(marker).evaluate():
                continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "missing"
        ok = _same(have, version)
        print(f"{'ok ' if ok else 'BAD'} {name}: floor {version}, installed {have}")
        bad += not ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
