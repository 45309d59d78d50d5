"""A throwaway PostgreSQL server for tests: its own cluster in a temporary directory.

``PgServer.start()`` runs ``initdb`` (trust authentication, superuser ``postgres``) and
``pg_ctl start`` on a free TCP port of 127.0.0.1, by default with durability off
(``fsync``, ``synchronous_commit``, ``full_page_writes``): a crash of the test machine
loses nothing a test cares about (the benchmarks pass ``DURABLE_SETTINGS``).
``stop()`` stops it (fast mode) and removes the directory; ``restart()`` stops and
starts it on the same port and data, as an operator restarting PostgreSQL under load
would. ``create_database()`` gives each test its own database.

The programs come from Debian's postgresql package (``tests.tools.postgres_bindir``; a
missing server fails the test naming ``make debs``). PostgreSQL refuses to run as root:
as root every server program runs under ``runuser -u postgres`` and the directory belongs
to postgres. Every program call is bounded in time; a server that does not come up
within ``START_TIMEOUT`` seconds is an error carrying pg_ctl's log.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from tests.tools import missing, postgres_bindir

#: Seconds pg_ctl waits for the server to come up or go down.
START_TIMEOUT = 30
#: Seconds any other program (initdb, psql) may take.
PROGRAM_TIMEOUT = 60.0
#: Server settings: loopback only, no durability (tests), room for three nodes' pools.
SETTINGS = ("listen_addresses=127.0.0.1", "fsync=off", "synchronous_commit=off",
            "full_page_writes=off", "max_connections=200")
#: The same with PostgreSQL's durable defaults (the benchmarks: commits pay for fsync).
DURABLE_SETTINGS = ("listen_addresses=127.0.0.1", "max_connections=200")
#: Tries at start when another process took the free port first.
PORT_TRIES = 3


class PgServerError(RuntimeError):
    """A PostgreSQL program failed or timed out (the message carries its output)."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def database_name(dsn: str) -> str:
    """The database a ``postgresql://`` DSN names."""
    return urlsplit(dsn).path.lstrip("/")


def _environment() -> dict[str, str]:
    """This process's environment without libpq's PG* settings, messages in English."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PgServer:
    """One PostgreSQL cluster of a test session; ``start()`` before use, ``stop()`` after."""

    def __init__(self, bindir: Path | None = None,
                 settings: tuple[str, ...] = SETTINGS) -> None:
        self.bindir = bindir if bindir is not None else postgres_bindir()
        self.settings = settings
        self.root: Path | None = None
        self.port = 0
        self.running = False
        self._as_postgres = os.geteuid() == 0

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        if self.root is None:
            raise PgServerError("the server was never started")
        return self.root / "data"

    @property
    def log(self) -> Path:
        """The server's log file (pg_ctl -l)."""
        return self.data.parent / "server.log"

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def dsn(self, database: str = "postgres") -> str:
        """The URL asyncpg (or libpq) connects to ``database`` with."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str, timeout: float = PROGRAM_TIMEOUT,
             server: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one PostgreSQL program, as postgres when this is root and it is a server one."""
        argv = [str(self.bindir / program), *args]
        if server and self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env=_environment(), cwd=self.root, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PgServerError(f"{program} did not finish within {timeout} s: "
                                f"{exc.stdout!r} {exc.stderr!r}") from exc
        return done

    def _check(self, program: str, *args: str, timeout: float = PROGRAM_TIMEOUT,
               server: bool = True) -> str:
        """Run one program; its stdout, or PgServerError with its output and the log."""
        done = self._run(program, *args, timeout=timeout, server=server)
        if done.returncode != 0:
            raise PgServerError(f"{program} {' '.join(args)} exited {done.returncode}\n"
                                f"{done.stdout}{done.stderr}{self._log_tail()}")
        return done.stdout

    def _log_tail(self) -> str:
        """The end of the server log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except (OSError, PgServerError):
            return ""
        return f"--- {self.log} ---\n{text[-4000:]}"

    def _make_root(self) -> None:
        """The temporary directory, owned by postgres when this is root."""
        self.root = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
        if self._as_postgres:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                missing("the postgres user (Debian's postgresql package creates it)")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def start(self) -> None:
        """Create the cluster and start the server on a free port (a few tries if the
        port is taken meanwhile). On failure nothing is left running or on disk."""
        if self.running:
            return
        try:
            if self.root is None:
                self._make_root()
                self._check("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
            for attempt in range(PORT_TRIES):
                self.port = free_port()
                try:
                    self._pg_ctl_start()
                    break
                except PgServerError as exc:
                    if attempt + 1 == PORT_TRIES or "could not bind" not in str(exc):
                        raise
        except BaseException:
            self._remove()
            raise
        atexit.register(self.stop)

    def _pg_ctl_start(self) -> None:
        """``pg_ctl start`` on ``self.port``, waiting until the server accepts connections."""
        assert self.root is not None
        options = ["-p", str(self.port), "-k", str(self.root)]
        for setting in self.settings:
            options += ["-c", setting]
        self._check("pg_ctl", "-D", str(self.data), "-l", str(self.log),
                    "-o", shlex.join(options), "-w", "-t", str(START_TIMEOUT), "start",
                    timeout=START_TIMEOUT + 10)
        self.running = True

    def _pg_ctl_stop(self, mode: str) -> None:
        """``pg_ctl stop -m mode``, waiting until the server is gone."""
        self._check("pg_ctl", "-D", str(self.data), "-m", mode, "-w",
                    "-t", str(START_TIMEOUT), "stop", timeout=START_TIMEOUT + 10)
        self.running = False

    def restart(self) -> None:
        """Stop (fast: sessions are cut) and start again on the same port and data."""
        self._pg_ctl_stop("fast")
        self._pg_ctl_start()

    def stop(self) -> None:
        """Stop the server (fast, else immediate) and remove its directory. Idempotent."""
        atexit.unregister(self.stop)
        try:
            if self.running:
                try:
                    self._pg_ctl_stop("fast")
                except PgServerError:
                    self._pg_ctl_stop("immediate")
        finally:
            self._remove()

    def _remove(self) -> None:
        """Remove the temporary directory (a server still running there is stopped first)."""
        if self.root is not None and (self.root / "data" / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                      timeout=START_TIMEOUT)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        self.running = False

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql over TCP (no ~/.psqlrc, stop at the first error)."""
        conninfo = (f"host=127.0.0.1 port={self.port} user=postgres dbname={database} "
                    "connect_timeout=10")
        return self._check("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                           "-d", conninfo, "-c", sql, server=False)

    def create_database(self) -> str:
        """Create a fresh, uniquely named database; its DSN."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing any session still connected to it."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
