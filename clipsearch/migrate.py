"""Bring a catalog to the newest schema with Alembic, once, safely when several processes open it together."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from clipsearch.errors import LibraryError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The newest revision in migrations/versions (a test keeps them equal): opening an up-to-date catalog then costs
# one query, not an Alembic import.
HEAD_REVISION = "0001"
VERSION_TABLE = "alembic_version"
# Any fixed 64-bit number: the PostgreSQL advisory lock that serialises migrations across servers.
POSTGRESQL_LOCK_KEY = 0x636C6970_7365_6172  # "clipsear"


def current_revision(connection: Connection) -> str | None:
    """The catalog's schema revision, or None for a new (or pre-migration) catalog."""
    from sqlalchemy import inspect

    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def alembic_config(connection: Connection | None = None):
    """An Alembic Config for the catalog migrations, sharing `connection` with env.py when given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def known_revisions() -> set[str]:
    """Every revision this version of clipsearch knows."""
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def ensure_schema(engine: Engine, where: str, lock_path: Path | None = None) -> None:
    """Migrate the catalog to HEAD_REVISION if it is behind; refuse one written by a newer clipsearch.

    lock_path: for SQLite, a file to flock while migrating (PostgreSQL uses an advisory lock instead).
    """
    # SQLite: the first look too goes under the file lock. Connections opening a new file together race while one
    # of them turns it to WAL ("database is locked" at once, no busy wait); one at a time, the rest find it done.
    with _migration_lock(engine, lock_path):
        with engine.connect() as connection:
            found = current_revision(connection)
        if found == HEAD_REVISION:
            return
        if found is not None and found not in known_revisions():
            raise LibraryError(
                f"the catalog {where} was written by a newer clipsearch (schema revision {found})",
                "upgrade clipsearch (pip install -U clipsearch) or use another library",
            )
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRESQL_LOCK_KEY})
            else:
                # Python's sqlite3 runs DDL outside transactions unless one is open: open it, so that a migration
                # interrupted half-way (kill -9, full disk) leaves the catalog as it was.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            before = current_revision(connection)  # another process may have migrated while this one waited
            if before == HEAD_REVISION:
                return
            from alembic import command

            log.info("migrating the catalog %s from schema %s to %s", where, before or "(none)", HEAD_REVISION)
            command.upgrade(alembic_config(connection), "head")


@contextmanager
def _migration_lock(engine: Engine, lock_path: Path | None) -> Iterator[None]:
    """Serialise migrations of one SQLite file across processes (PostgreSQL: the advisory lock in ensure_schema)."""
    try:
        import fcntl
    except ImportError:  # Windows: SQLite's own locking, and a baseline that only creates what is missing
        fcntl = None
    if engine.dialect.name != "sqlite" or lock_path is None or fcntl is None:
        yield
        return
    try:
        handle = open(lock_path, "a")
    except OSError:
        yield  # a read-only library folder: nothing can migrate it anyway, and the migration will say so
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
