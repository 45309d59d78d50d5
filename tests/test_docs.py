"""The project's own documents stay true: every SEMANTICS.md section cited exists, every
SMTP reply is in its §6 table, nothing points outside the repository, and the package
carries its licence."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from relayd.smtp import replies
from tests.procs import REPO

SEMANTICS = REPO / "docs" / "SEMANTICS.md"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

# "SEMANTICS.md §4.1", "SEMANTICS §3, §6", "SEMANTICS.md §2-§4": every § after the name.
_CITATION = re.compile(r"SEMANTICS(?:\.md)?((?:(?:\s|,|-|\u2013|and)*§\d+(?:\.\d+)*)+)")
_SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
# A bare "§N" inside a document is its own section, unless it is an RFC's or SEMANTICS'.
_ARCH_CITATION = re.compile(r"ARCHITECTURE(?:\.md)? §(\d+(?:\.\d+)*)")
_BARE = re.compile(r"(?<!RFC )(?<!SEMANTICS )(?<!SEMANTICS\.md )(?<!\d )§(\d+(?:\.\d+)*)")


# Written so that this file does not match itself (nor a grep for the folder name).
_OUTSIDE = re.compile(r"\.\./shared\b|shared[/]SEMANTICS")


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()
    return [REPO / p for p in out.split("\0") if p]


def _text(path: Path) -> str | None:
    try:
        return path.read_text("utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None


def _headings(path: Path) -> set[str]:
    """Section numbers of a document's headings ("## 4. ...", "### 4.1 ...")."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", path.read_text("utf-8"), re.M))


def _section(text: str, number: str) -> str:
    """The text of "## <number>." up to the next "## " heading."""
    m = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no section {number}"
    return m.group(0)


def test_every_semantics_citation_has_its_section() -> None:
    """Every "SEMANTICS.md §N" in a tracked file names a section docs/SEMANTICS.md has."""
    have = _headings(SEMANTICS)
    missing = []
    cited = 0
    for path in _tracked_files():
        text = _text(path)
        if text is None:
            continue
        for m in _CITATION.finditer(text):
            for number in _SECTION.findall(m.group(1)):
                cited += 1
                if number not in have:
                    line = text.count("\n", 0, m.start()) + 1
                    missing.append(f"{path.relative_to(REPO)}:{line}: §{number}")
    assert cited > 20  # the pattern still finds the citations
    assert not missing, f"sections cited but not in docs/SEMANTICS.md: {missing}"


def test_every_architecture_citation_has_its_section() -> None:
    """Every "ARCHITECTURE.md §N" in a tracked file names a section docs/ARCHITECTURE.md has."""
    have = _headings(ARCHITECTURE)
    missing = [f"{p.relative_to(REPO)}: §{n}" for p in _tracked_files()
               if (t := _text(p)) is not None for n in _ARCH_CITATION.findall(t)
               if n not in have]
    assert not missing, f"sections cited but not in docs/ARCHITECTURE.md: {missing}"


def test_architecture_is_a_map() -> None:
    """docs/ARCHITECTURE.md stays a map (about 250 lines); measurements go to bench/NOTES.md."""
    lines = ARCHITECTURE.read_text("utf-8").splitlines()
    assert len(lines) <= 260, len(lines)
    assert "bench/NOTES.md" in "\n".join(lines)
    assert (REPO / "bench" / "NOTES.md").is_file()


@pytest.mark.parametrize("doc", [SEMANTICS, OPERATIONS, ARCHITECTURE], ids=lambda p: p.name)
def test_internal_section_references_exist(doc: Path) -> None:
    """A bare "§N" inside one of the three docs/ documents names one of its own sections."""
    text = doc.read_text("utf-8")
    have = _headings(doc)
    dangling = sorted({n for n in _BARE.findall(text) if n not in have})
    assert not dangling, f"{doc.name} refers to sections it lacks: {dangling}"


def test_no_tracked_file_points_outside_the_repository() -> None:
    """No tracked file refers to the spec's old place outside the project (a sibling folder)."""
    offenders = [str(p.relative_to(REPO)) for p in _tracked_files()
                 if (t := _text(p)) is not None and _OUTSIDE.search(t)]
    assert not offenders


def _documented_replies() -> set[str]:
    return set(re.findall(r"`([^`]+)`", _section(SEMANTICS.read_text("utf-8"), "6")))


def test_every_reply_is_in_the_semantics_table() -> None:
    """Each reply text of relayd/smtp/replies.py is in SEMANTICS.md §6 (add it there with it)."""
    documented = _documented_replies()
    texts = {name: r.text for name, r in vars(replies).items() if isinstance(r, replies.Reply)}
    for name, fn in vars(replies).items():
        if inspect.isfunction(fn) and fn.__module__ == replies.__name__:
            params = inspect.signature(fn).parameters
            made = fn(*(f"<{p}>" for p in params))
            if isinstance(made, replies.Reply):
                texts[f"{name}()"] = made.text
    assert len(texts) > 50
    missing = {name: text for name, text in texts.items() if text not in documented}
    assert not missing, f"replies missing from SEMANTICS.md §6: {missing}"


def test_every_rejection_reason_is_in_the_semantics_table() -> None:
    """Each ``reason`` label of relayd_smtp_rejections_total appears in SEMANTICS.md §6."""
    documented = _documented_replies()
    missing = [r for r in replies.REJECTION_REASONS if r not in documented]
    assert not missing, f"rejection reasons missing from SEMANTICS.md §6: {missing}"


def test_readme_links_the_documents() -> None:
    """The README points at the spec, the architecture and the production guide."""
    readme = (REPO / "README.md").read_text("utf-8")
    for doc in ("docs/SEMANTICS.md", "docs/ARCHITECTURE.md", "docs/OPERATIONS.md", "LICENSE"):
        assert doc in readme
        assert (REPO / doc).is_file()


def test_operations_names_every_alert() -> None:
    """docs/OPERATIONS.md says what each alert of config/prometheus-alerts.yml means."""
    import yaml  # type: ignore[import-untyped,unused-ignore]

    rules = yaml.safe_load((REPO / "config" / "prometheus-alerts.yml").read_text("utf-8"))
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    monitoring = _section(OPERATIONS.read_text("utf-8"), "6")
    assert alerts
    assert not [a for a in alerts if f"`{a}`" not in monitoring]


def test_licence_in_the_project_metadata() -> None:
    """pyproject declares Apache-2.0 (PEP 639) with the LICENSE file, which is the full text."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    assert meta["project"]["license"] == "Apache-2.0"
    assert meta["project"]["license-files"] == ["LICENSE"]
    # PEP 639 metadata needs setuptools 77 or later to build.
    floor = re.search(r"setuptools>=(\d+)", " ".join(meta["build-system"]["requires"]))
    assert floor and int(floor.group(1)) >= 77
    text = (REPO / "LICENSE").read_text("utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 the relayd authors" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_built_wheel_carries_the_licence(tmp_path: Path) -> None:
    """A wheel built from the tree names Apache-2.0 in METADATA and contains LICENSE."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, timeout=280,
                   capture_output=True)
    (wheel,) = tmp_path.glob("relayd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = z.read(metadata).decode()
        licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licence, names
        assert b"Apache License" in z.read(licence[0])
    assert "License-Expression: Apache-2.0" in text.splitlines()
    assert "License-File: LICENSE" in text.splitlines()
