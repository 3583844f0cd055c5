"""Alembic environment of the catalog: runs on the connection clipsearch.migrate passes in, or on $CLIPSEARCH_DB."""

from __future__ import annotations

import os

from alembic import context
from clipsearch.catalog import Base
from clipsearch.catalog_sql import catalog_url, create_catalog_engine

import clipsearch.label_tables  # noqa: F401  (registers the label tables on Base, for autogenerate)

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    # Batch mode lets later revisions ALTER tables on SQLite (copy-and-move, as SQLite cannot alter columns).
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kwargs)


def run_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL for a database administrator instead of running it."""
    _configure(url=catalog_url(os.environ.get("CLIPSEARCH_DB", "sqlite:///catalog.sqlite3")), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate the shared connection (clipsearch.migrate) or, from the alembic command line, $CLIPSEARCH_DB."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = os.environ.get("CLIPSEARCH_DB")
    if not url:
        raise SystemExit("set CLIPSEARCH_DB to the catalog's URL (e.g. sqlite:////path/to/catalog.sqlite3)")
    engine = create_catalog_engine(catalog_url(url))
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
