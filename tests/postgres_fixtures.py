"""PostgreSQL fixtures for the catalog tests: a fresh database per test on the server tests/install-postgres.sh sets up.

Load them from tests/conftest.py with `pytest_plugins = ["tests.postgres_fixtures"]` or by importing the fixtures.
CLIPSEARCH_TEST_POSTGRES may name another server: the SQLAlchemy URL of a maintenance database whose user may
CREATE DATABASE. Without a reachable server the tests that use these fixtures are skipped, except under CI=true,
where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

POSTGRES_URL_VARIABLE = "CLIPSEARCH_TEST_POSTGRES"
DEFAULT_ADMIN_URL = "postgresql+psycopg://clipsearch_test:clipsearch_test@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT_S = 3
# Test databases need no durability: without waiting for the WAL flush at every commit the tests run faster.
SESSION_OPTIONS = "-c synchronous_commit=off"
DATABASE_PREFIX = "clipsearch_test_"


def _skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI=true, where the PostgreSQL tests must never be silently skipped."""
    message = (
        f"PostgreSQL catalog tests need a server: {reason}. "
        f"Run tests/install-postgres.sh or set {POSTGRES_URL_VARIABLE}"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_admin_engine():
    """A session-wide AUTOCOMMIT engine on the maintenance database (skips, or fails under CI, when unreachable)."""
    try:
        import sqlalchemy as sa
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
    except ImportError as e:
        _skip_or_fail(f"SQLAlchemy is not installed ({e})")

    # Read when the session fixture is first set up, which pytest does before the function-scoped autouse fixture
    # in tests/conftest.py (isolated_environment) removes every CLIPSEARCH_* variable for the test.
    configured = os.environ.get(POSTGRES_URL_VARIABLE) or DEFAULT_ADMIN_URL
    try:
        url = make_url(configured)
    except ArgumentError as e:
        pytest.fail(f"{POSTGRES_URL_VARIABLE} is not a SQLAlchemy URL: {e}", pytrace=False)
    if url.get_backend_name() != "postgresql":
        pytest.fail(f"{POSTGRES_URL_VARIABLE} must name a postgresql:// database, not {url.drivername}", pytrace=False)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # SQLAlchemy's default would be psycopg2, not installed

    # CREATE and DROP DATABASE cannot run inside a transaction; NullPool leaves no idle admin connection behind.
    engine = sa.create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )
    try:
        with engine.connect() as connection:
            version = connection.execute(sa.text("SHOW server_version_num")).scalar_one()
    except sa.exc.SQLAlchemyError as e:
        engine.dispose()
        # pytest caches this outcome for the session: an unreachable server costs one timeout, not one per test.
        cause = getattr(e, "orig", None) or e  # the driver's own error says why (refused, timeout, password)
        detail = " ".join(str(cause).split())  # libpq's message spans lines; a skip reason reads best on one
        _skip_or_fail(f"cannot connect to {url.render_as_string()} ({type(cause).__name__}: {detail})")
    if int(version) < 130000:
        engine.dispose()
        _skip_or_fail(f"{url.render_as_string()} runs PostgreSQL {version}; the tests need 13 or newer")
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_admin_url(postgres_admin_engine) -> str:
    """SQLAlchemy URL of the maintenance database test databases are created from (password included)."""
    return postgres_admin_engine.url.render_as_string(hide_password=False)


@pytest.fixture
def postgres_url(postgres_admin_engine) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database for this test only, dropped afterwards (open connections too)."""
    import sqlalchemy as sa

    name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
    with postgres_admin_engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin_url = postgres_admin_engine.url
    options = " ".join(filter(None, [admin_url.query.get("options"), SESSION_OPTIONS]))
    # psycopg hands the options query parameter to libpq, which applies it to every session on this database.
    url = admin_url.set(database=name).update_query_dict({"options": options})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        _drop_database(postgres_admin_engine, name)


def _drop_database(engine, name: str, attempts: int = 20) -> None:
    """DROP DATABASE, ending the connections a test (or a pool it did not dispose) left open.

    FORCE cannot end an autovacuum worker busy in the database (it runs as another role: InsufficientPrivilege)
    while a plain DROP cancels autovacuum itself but refuses open sessions: try one, then the other, a few times.
    """
    import time

    import sqlalchemy as sa

    for attempt in range(attempts):
        statement = f'DROP DATABASE IF EXISTS "{name}"' + (" WITH (FORCE)" if attempt % 2 == 0 else "")
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(statement))
            return
        except sa.exc.DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.25)
