"""The size rules of docs/ARCHITECTURE.md, checked from the source (an ast walk).

No class in ``relayd/`` over :data:`CLASS_MAX` lines and no function over
:data:`FUNCTION_MAX` lines, unless its docstring states why, in a paragraph
that starts with ``Size:`` (for example a flat table of metric definitions, or
a hand-written parser on the hot path whose branches read better in one
place). A reason is a sentence a reviewer can disagree with, so it is kept
next to the code it excuses.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASS_MAX = 350
FUNCTION_MAX = 60


def _oversized(root: Path) -> list[str]:
    """``path:line kind name (N lines)`` of every oversized class or function without a reason."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                kind, limit = "class", CLASS_MAX
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind, limit = "function", FUNCTION_MAX
            else:
                continue
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length <= limit:
                continue
            doc = ast.get_docstring(node) or ""
            if any(par.lstrip().startswith("Size:") for par in doc.split("\n\n")):
                continue
            rel = path.relative_to(root.parent)
            found.append(f"{rel}:{node.lineno} {kind} {node.name} ({length} lines)")
    return found


def test_no_oversized_class_or_function_without_a_stated_reason() -> None:
    assert _oversized(ROOT / "relayd") == []


def test_the_check_finds_an_oversized_function_and_reads_its_reason(tmp_path: Path) -> None:
    """The walk itself works: a 70-line function is found, and excused by a Size: paragraph."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_MAX + 10))
    (pkg / "m.py").write_text(f'def long():\n    """Does it."""\n{body}\n')
    assert _oversized(pkg) == ["pkg/m.py:1 function long (72 lines)"]
    doc = '"""Does it.\n\n    Size: one table.\n    """'
    (pkg / "m.py").write_text(f"def long():\n    {doc}\n{body}\n")
    assert _oversized(pkg) == []
