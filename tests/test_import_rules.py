"""The import rules of docs/ARCHITECTURE.md, checked from the source (an ast walk).

Every ``import`` and ``from ... import`` counts wherever it stands: at module
level, inside a function, or under ``if TYPE_CHECKING:`` (a dependency hidden
in a function is still a dependency). Nothing is imported or run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relayd", "control")

#: Each third-party library (by the top-level names it is imported as) and the one
#: module allowed to import it: its adapter. sqlite3 and aiosqlite are one library
#: here (aiosqlite is no longer used; listed so that it cannot come back elsewhere).
ADAPTERS: dict[str, tuple[frozenset[str], str]] = {
    "sqlite": (frozenset({"sqlite3", "aiosqlite"}), "relayd.store.db"),
    "aiohttp": (frozenset({"aiohttp"}), "relayd.controlplane.server"),
    "dnspython": (frozenset({"dns"}), "relayd.delivery.mx"),
    "prometheus_client": (frozenset({"prometheus_client"}), "relayd.observe.metrics"),
    "structlog": (frozenset({"structlog"}), "relayd.observe.logs"),
    "cryptography": (frozenset({"cryptography"}), "relayd.dkim.signature"),
    "asyncpg": (frozenset({"asyncpg"}), "relayd.store.pg"),
}

#: Libraries that relayd and control/ never import (test and bench dependencies only):
#: aiosmtpd is the tests' sink and the bench's stock peer; relayd's SMTP server is
#: its own (relayd.smtp.session, relayd.smtp.server). aiosmtplib is the tests' client;
#: relayd's SMTP client is its own (relayd.delivery.connection).
NOT_IMPORTED: frozenset[str] = frozenset({"aiosmtpd", "aiosmtplib"})

#: Import cycles allowed to exist (each entry one strongly connected component of
#: the module graph). Empty: there is none, and a new one fails the suite.
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset()


def _modules() -> dict[str, Path]:
    """Every module of the checked packages, by dotted name."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports; ``from a import b`` gives
    ``a.b`` when that is a module of ours, else ``a``."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = module.split(".")
                drop = node.level - 1 if is_pkg else node.level
                parent = parent[: len(parent) - drop]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node.lineno


IMPORTS: dict[str, list[tuple[str, int]]] = {m: list(_imported(m, p)) for m, p in MODULES.items()}


def _graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours each imports (a package counts as a node)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, names in IMPORTS.items():
        for name, _line in names:
            if name in MODULES and name != module:
                graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.add(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_each_library_is_imported_by_its_adapter_only() -> None:
    """Each third-party library is imported by exactly its one adapter module."""
    wrong = []
    for library, (tops, adapter) in ADAPTERS.items():
        importers = sorted({m for m, names in IMPORTS.items()
                            for name, _line in names if name.split(".")[0] in tops})
        if importers != [adapter]:
            where = [f"{m}:{line}" for m, names in IMPORTS.items()
                     for name, line in names if name.split(".")[0] in tops and m != adapter]
            wrong.append(f"{library}: imported by {importers} (expected only {adapter};"
                         f" move the use behind {adapter}: {where})")
    assert not wrong, "\n".join(wrong)


def test_test_only_libraries_are_never_imported() -> None:
    """aiosmtpd is not imported anywhere in relayd/ or control/ (not even in a function)."""
    bad = [f"{m}:{line} imports {name}" for m, names in IMPORTS.items()
           for name, line in names if name.split(".")[0] in NOT_IMPORTED]
    assert not bad, bad


def test_control_never_imports_relayd() -> None:
    """No module of control/ imports relayd (the CLI runs without the daemon's code)."""
    bad = [f"{m}:{line} imports {name}" for m, names in IMPORTS.items() if m.startswith("control")
           for name, line in names if name.split(".")[0] == "relayd"]
    assert not bad, bad


def test_relayd_imports_only_the_shared_control_modules() -> None:
    """relayd imports of control/ only the schemas, and the OpenAPI document in control_server."""
    allowed = {"control", "control.schemas"}
    bad = [f"{m}:{line} imports {name}" for m, names in IMPORTS.items() if m.startswith("relayd")
           for name, line in names if name.split(".")[0] == "control"
           and name not in allowed
           and (m, name) != ("relayd.controlplane.server", "control.openapi")]
    assert not bad, bad


def test_no_import_cycle_beyond_the_known_ones() -> None:
    """The module graph of relayd/ and control/ has no cycle other than KNOWN_CYCLES."""
    new = [sorted(c) for c in _cycles(_graph()) if c not in KNOWN_CYCLES]
    assert not new, f"new import cycles: {new}"


def test_known_cycles_still_exist() -> None:
    """Every KNOWN_CYCLES entry is still a cycle: a removed one leaves the allowlist."""
    gone = [sorted(c) for c in KNOWN_CYCLES - _cycles(_graph())]
    assert not gone, f"no longer cycles, remove them from KNOWN_CYCLES: {gone}"


def test_the_walk_sees_function_local_and_type_checking_imports(tmp_path: Path) -> None:
    """The walk counts an import inside a function and under TYPE_CHECKING."""
    src = tmp_path / "probe.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from relayd.delivery import client\n"
                   "def f() -> None:\n    from relayd.delivery.agents import AgentPool\n",
                   encoding="utf-8")
    names = {name for name, _line in _imported("relayd.probe", src)}
    assert {"relayd.delivery.client", "relayd.delivery.agents"} <= names
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


#: A string constant that is (the start of) an SQL statement: a leading keyword
#: (any case, after any whitespace) followed by what makes it a statement, so that
#: English like "Delete a domain" is not taken for SQL.
SQL_RE = re.compile(
    r"^\s*(SELECT\b.*\bFROM\b|SELECT\s+(COUNT|MIN|MAX|COALESCE|1)\b|INSERT\s+(OR\s+\w+\s+)?INTO\b"
    r"|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b|CREATE\s+(TABLE|(UNIQUE\s+)?INDEX|VIEW|TRIGGER)\b"
    r"|DROP\s+(TABLE|INDEX|VIEW|TRIGGER)\b|ALTER\s+TABLE\b|PRAGMA\s+\w+"
    r"|BEGIN(\s+(IMMEDIATE|EXCLUSIVE|DEFERRED|TRANSACTION))?\s*;?\s*$|WITH\s+\w+\s+AS\b)",
    re.IGNORECASE | re.DOTALL)

def _sql_strings(path: Path) -> Iterator[tuple[str, int, str]]:
    """(qualified name of the enclosing function or class, line, text) of each string
    constant of ``path`` that looks like SQL; docstrings are not counted."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}

    def visit(node: ast.AST, scope: list[str]) -> Iterator[tuple[str, int, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, [*scope, child.name])
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) \
                    and id(child) not in docstrings and SQL_RE.match(child.value):
                yield ".".join(scope), child.lineno, child.value
            else:
                yield from visit(child, scope)

    yield from visit(tree, [])


def _sql_outside_the_store(modules: dict[str, Path]) -> list[str]:
    return [f"{m}:{where or '<module>'} line {line}: {text.strip()[:60]!r}"
            for m, path in modules.items() if not m.startswith("relayd.store")
            for where, line, text in _sql_strings(path)]


def test_sql_appears_only_under_relayd_store() -> None:
    """No string constant that looks like SQL outside relayd/store (callers use named
    methods); no exception."""
    bad = _sql_outside_the_store(MODULES)
    assert not bad, "SQL outside relayd/store:\n" + "\n".join(bad)


def test_the_sql_check_sees_statements_and_spares_prose(tmp_path: Path) -> None:
    """The check finds SQL in plain strings, f-strings and nested functions, in any case
    and after whitespace; it passes prose and docstrings."""
    src = tmp_path / "m.py"
    src.write_text(
        'def f(x):\n'
        '    """Delete a domain; select the accounts; update the cache."""\n'
        '    a = "  select id FROM t"\n'
        '    b = f"UPDATE t SET a={x}"\n'
        '    def g():\n'
        '        return "\\n  PRAGMA user_version"\n'
        '    return "Delete a domain", "begin the day", "with care", "insert a row"\n',
        encoding="utf-8")
    found = [(where, line) for where, line, _text in _sql_strings(src)]
    assert found == [("f", 3), ("f", 4), ("f.g", 6)]


def test_the_store_writer_callback_is_used_only_inside_the_store() -> None:
    """``Spool._transact`` (a function run with the connection) is called only by
    relayd/store modules: callers outside get named methods."""
    bad = [f"{m}:{node.lineno}" for m, path in MODULES.items() if not m.startswith("relayd.store")
           for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
           if isinstance(node, ast.Attribute) and node.attr in ("_transact", "write")
           and isinstance(node.value, ast.Attribute) and node.value.attr == "spool"]
    assert not bad, bad
