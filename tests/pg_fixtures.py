"""pytest fixtures for PostgreSQL (registered by tests/conftest.py's ``pytest_plugins``).

- ``pg_server``: one throwaway server (``tests.pgserver.PgServer``) for the whole session,
  started on first use (about 1.5 s), stopped and removed at the end. Plain and sync, so
  it serves tests on any event loop.
- ``pg_dsn``: a fresh database on it for one test, dropped after (sessions still
  connected to it are closed); the DSN asyncpg connects with.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgserver import PgServer, database_name


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (fails, naming ``make debs``, when not installed)."""
    server = PgServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A database of this test's own on the session's server."""
    dsn = pg_server.create_database()
    yield dsn
    if pg_server.running:
        pg_server.drop_database(database_name(dsn))
