"""``relayd install-service``: put the packaged service files where systemd and the admin look.

Owns: the list of files an installed relayd needs outside its Python
package, where each goes, and writing them. The files are package data
(``relayd/data/``: links to config/, systemd/, docs/ and README.md in the
repository, real files in the wheel), so an installed wheel carries them:

====================================  =============================================
``/etc/systemd/system/relayd.service``  the unit, ``ExecStart`` naming this
                                        installation's ``relayd`` (``--unit-dir``
                                        ``/usr/lib/systemd/system`` when packaging)
``PREFIX/lib/sysusers.d/relayd.conf``   the relayd user and group
``PREFIX/lib/tmpfiles.d/relayd.conf``   ``/etc/relayd`` and the config's mode
``/etc/relayd/relayd.toml``             the example configuration; an existing
                                        one is never replaced
``PREFIX/share/relayd/``                Grafana dashboard, Prometheus alert rules,
                                        fail2ban filter and jail, HAProxy example
``PREFIX/share/doc/relayd/``            README.md, OPERATIONS.md (the unit's
                                        ``Documentation=``), SEMANTICS.md, CLUSTER.md
====================================  =============================================

``PREFIX`` is ``/usr`` unless ``--prefix`` says otherwise (``/usr/local``
works too: systemd searches its ``lib/`` directories). ``--root DIR`` writes
everything under ``DIR`` instead of ``/`` (a staging root for packages and
tests); the paths inside the files stay the final ones. ``--dry-run`` only
says what would be done. Files are replaced atomically (a temporary file
renamed over the old one), so an upgrade never leaves half a unit.

Decisions (:func:`plan`, :func:`unit_text`, :func:`relayd_candidates`) are
pure; :func:`apply` does the writing. Untrusted input: none (the
administrator's command line). Settings read: none.

Exit codes: 0 done (or dry run), 1 a file could not be written or the
``relayd`` program was not found, 2 bad usage.

See also: systemd/relayd.service, Makefile ``install``, README "Install as a service".
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import msgspec

#: The configuration path the unit's ExecStart names (relayd.config.SYSTEM_CONFIG).
CONFIG_PATH = "/etc/relayd/relayd.toml"


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One file to install: package data ``resource`` to ``dest`` with ``mode``."""

    resource: str  # a file name in relayd/data
    dest: str  # the absolute path on the target system
    mode: int
    keep_existing: bool = False  # the administrator's file: never replaced
    dir_mode: int = 0o755  # for directories this step creates


def plan(prefix: str = "/usr", unit_dir: str = "/etc/systemd/system") -> list[Step]:
    """Every file ``install-service`` writes, in order."""
    p = prefix.rstrip("/") or ""
    return [
        Step(resource="relayd.sysusers.conf", dest=f"{p}/lib/sysusers.d/relayd.conf",
             mode=0o644),
        Step(resource="relayd.tmpfiles.conf", dest=f"{p}/lib/tmpfiles.d/relayd.conf",
             mode=0o644),
        # May hold a smarthost password: relayd's group reads it once tmpfiles has run.
        Step(resource="relayd.toml", dest=CONFIG_PATH, mode=0o640, keep_existing=True,
             dir_mode=0o750),
        Step(resource="grafana-dashboard.json", dest=f"{p}/share/relayd/grafana-dashboard.json",
             mode=0o644),
        Step(resource="prometheus-alerts.yml", dest=f"{p}/share/relayd/prometheus-alerts.yml",
             mode=0o644),
        Step(resource="fail2ban-filter.conf",
             dest=f"{p}/share/relayd/fail2ban/filter.d/relayd.conf", mode=0o644),
        Step(resource="fail2ban-jail.conf",
             dest=f"{p}/share/relayd/fail2ban/jail.d/relayd.conf", mode=0o644),
        Step(resource="README.md", dest=f"{p}/share/doc/relayd/README.md", mode=0o644),
        Step(resource="OPERATIONS.md", dest=f"{p}/share/doc/relayd/OPERATIONS.md", mode=0o644),
        Step(resource="SEMANTICS.md", dest=f"{p}/share/doc/relayd/SEMANTICS.md", mode=0o644),
        Step(resource="CLUSTER.md", dest=f"{p}/share/doc/relayd/CLUSTER.md", mode=0o644),
        Step(resource="haproxy.cfg", dest=f"{p}/share/relayd/haproxy.cfg", mode=0o644),
        Step(resource="relayd.service", dest=f"{unit_dir.rstrip('/')}/relayd.service",
             mode=0o644),
    ]


def unit_quote(path: str) -> str:
    """``path`` as one word of a unit file command line (specifiers and variables escaped)."""
    word = path.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def unit_text(shipped: str, relayd: str, prefix: str = "/usr") -> str:
    """The unit as installed: ``ExecStart`` runs ``relayd`` (an absolute path), and
    ``Documentation=`` names the README where ``prefix`` puts it."""
    if not os.path.isabs(relayd):
        raise ValueError(f"relayd program must be an absolute path, not {relayd!r}")
    text, n = re.subn(r"(?m)^(ExecStart=[-@:+!|]*)\S*/relayd(?=\s|$)",
                      lambda m: m.group(1) + unit_quote(relayd), shipped)
    if n != 1:
        raise ValueError("the shipped unit has no ExecStart running relayd")
    doc = f"{prefix.rstrip('/')}/share/doc/relayd/"
    return text.replace("file:/usr/share/doc/relayd/", f"file:{doc}")


def relayd_candidates(argv0: str, executable: str, scripts_dir: str | None) -> list[str]:
    """Where this installation's ``relayd`` program may be, most likely first.

    The console script that is running (``argv0``), the scripts directory of
    this Python (a venv's ``bin``), and the directory of the interpreter.
    """
    found: list[str] = []
    if os.path.basename(argv0) == "relayd":
        found.append(os.path.abspath(argv0))
    for directory in (scripts_dir, os.path.dirname(executable)):
        if directory:
            found.append(os.path.join(os.path.abspath(directory), "relayd"))
    return list(dict.fromkeys(found))


def _on_root(root: str, dest: str) -> Path:
    return Path(root) / dest.lstrip("/")


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` in one rename (no half-written file is ever seen)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data``; fail if it exists (it is never replaced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # whatever the umask


def apply(steps: list[Step], contents: Callable[[Step], bytes], root: str, *,
          dry_run: bool, say: Callable[[str], None]) -> None:
    """Install each step's file under ``root``; say what was done. OSError on failure."""
    for step in steps:
        path = _on_root(root, step.dest)
        exists = path.exists()
        if step.keep_existing and exists:
            say(f"kept      {path} (exists; never replaced)")
            continue
        data = contents(step)
        if exists and path.read_bytes() == data and (path.stat().st_mode & 0o7777) == step.mode:
            say(f"unchanged {path}")
            continue
        say(f"{'replace' if exists else 'install'}   {path} ({step.mode:04o})")
        if dry_run:
            continue
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(step.dir_mode)
        (_write_new if step.keep_existing else _write_atomically)(path, data, step.mode)


def build_parser() -> argparse.ArgumentParser:
    """The ``relayd install-service`` command line."""
    p = argparse.ArgumentParser(
        prog="relayd install-service",
        description="Install relayd's systemd unit, sysusers and tmpfiles snippets, example"
        f" configuration ({CONFIG_PATH}, never replaced), dashboard and alert rules.")
    p.add_argument("--root", default="/",
                   help="install under this directory instead of / (staging; default /)")
    p.add_argument("--prefix", default="/usr",
                   help="PREFIX/lib/sysusers.d, PREFIX/lib/tmpfiles.d, PREFIX/share (default /usr)")
    p.add_argument("--unit-dir", default="/etc/systemd/system",
                   help="where the unit goes (default /etc/systemd/system; packages:"
                   " /usr/lib/systemd/system)")
    p.add_argument("--relayd", default=None,
                   help="the relayd program ExecStart runs (default: this installation's)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``relayd install-service``."""
    args = build_parser().parse_args(argv)
    if args.relayd:
        relayd = os.path.abspath(args.relayd)
    else:
        candidates = relayd_candidates(sys.argv[0], sys.executable,
                                       sysconfig.get_path("scripts"))
        found = [c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)]
        if not found:
            print("relayd install-service: cannot find the relayd program (looked at "
                  f"{', '.join(candidates)}); name it with --relayd PATH", file=sys.stderr)
            return 1
        relayd = found[0]
    data = resources.files("relayd").joinpath("data")

    def contents(step: Step) -> bytes:
        raw = data.joinpath(step.resource).read_bytes()
        if step.resource == "relayd.service":
            return unit_text(raw.decode("utf-8"), relayd, args.prefix).encode("utf-8")
        return raw

    root = os.path.abspath(args.root)
    print(f"{'would install' if args.dry_run else 'installing'} relayd service files"
          f" (ExecStart: {relayd}){'' if root == '/' else f' under {root}'}")
    try:
        apply(plan(args.prefix, args.unit_dir), contents, root, dry_run=args.dry_run,
              say=lambda line: print("  " + line))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"relayd install-service: cannot write{where}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    if not args.dry_run and root == "/":
        print("next: systemd-sysusers && systemd-tmpfiles --create relayd.conf &&"
              " systemctl daemon-reload && systemctl enable --now relayd"
              f"  (edit {CONFIG_PATH} first; on an upgrade: systemctl restart relayd)")
    return 0
