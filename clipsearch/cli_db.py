"""`clipsearch db`: where the catalog lives, its schema revision, and moving it to another database."""

from __future__ import annotations

import json
import sys

import click

from clipsearch.cli_common import LIBRARY_SETTINGS, reports_errors, settings_options
from clipsearch.config import Settings, hide_password

DB_SETTINGS = (*LIBRARY_SETTINGS, "log_level")


@click.group("db", short_help="The catalog database: status, schema upgrade, copy to PostgreSQL.")
def db_group() -> None:
    """The catalog database: the SQLite file in the data folder, or the database that --db / CLIPSEARCH_DB names.

    Every command upgrades an older catalog's schema when it opens it; `db upgrade` does only that (for example
    before starting several servers on a new version).
    """


@db_group.command("status", short_help="Where the catalog lives and its schema revision.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@reports_errors
@settings_options(*DB_SETTINGS)
def db_status(as_json: bool, settings: Settings) -> None:
    """Show the catalog's database, its schema revision and the newest one this clipsearch knows."""
    from clipsearch.catalog_sql import catalog_exists, catalog_url, create_catalog_engine, display_url, storage_error
    from clipsearch.migrate import HEAD_REVISION, current_revision
    from sqlalchemy.exc import DBAPIError

    url = catalog_url(settings.catalog_location)
    revision = None
    if catalog_exists(url):  # status creates nothing, not even an empty SQLite file
        engine = create_catalog_engine(url)
        try:
            with engine.connect() as connection:
                revision = current_revision(connection)
        except DBAPIError as e:
            raise storage_error(e, display_url(url)) from e
        finally:
            engine.dispose()
    info = {"backend": url.get_backend_name(), "catalog": display_url(url), "revision": revision, "newest": HEAD_REVISION}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    state = "up to date" if revision == HEAD_REVISION else "no catalog yet" if revision is None else f"older: {HEAD_REVISION} on next open"
    click.echo(f"catalog:   {info['catalog']} ({info['backend']})")
    click.echo(f"schema:    {revision or '-'} ({state})")


@db_group.command("upgrade", short_help="Create or upgrade the catalog's schema, then exit.")
@reports_errors
@settings_options(*DB_SETTINGS)
def db_upgrade(settings: Settings) -> None:
    """Create the catalog, or migrate it to this version's schema (what every command does on open)."""
    from clipsearch.catalog import Catalog
    from clipsearch.migrate import HEAD_REVISION

    Catalog(settings.catalog_location).close()
    click.echo(f"catalog schema {HEAD_REVISION}: up to date")


@db_group.command("copy", short_help="Copy the catalog into another (empty) database.")
@click.option("--to", "target", required=True, metavar="URL",
              help="The database to copy into: postgresql://USER:PASSWORD@HOST/DBNAME (an empty database) or sqlite:///FILE.")
@reports_errors
@settings_options(*DB_SETTINGS)
def db_copy(target: str, settings: Settings) -> None:
    """Copy every photo, vector, label and review into another database, keeping ids: no re-indexing.

    Then use the new database with --db URL (or CLIPSEARCH_DB, or db = "URL" in clipsearch.toml) and the same
    --data-dir, whose vector index stays valid. The source catalog is left as it was.
    """
    from clipsearch.catalog import Catalog
    from clipsearch.catalog_copy import copy_catalog
    from clipsearch.catalog_sql import catalog_exists, catalog_url, display_url
    from clipsearch.errors import LibraryError

    if catalog_url(target) == catalog_url(settings.catalog_location):
        raise LibraryError("the copy's target is the library's own catalog", "give --to another database")
    if not catalog_exists(settings.catalog_location):
        raise LibraryError(f"there is no catalog at {display_url(catalog_url(settings.catalog_location))} to copy",
                           "check --data-dir / --db")
    source, destination = Catalog(settings.catalog_location), Catalog(target)
    try:
        click.echo(f"copying {source.where} -> {destination.where}", err=True)
        with _CopyProgress(enabled=sys.stderr.isatty()) as progress:
            report = copy_catalog(source, destination, progress=progress.update)
    finally:
        source.close()
        destination.close()
    tables = ", ".join(f"{name} {count}" for name, count in report.rows.items() if count)
    click.echo(f"copied {report.total} rows ({tables})")
    click.echo(f"use it with: --db '{hide_password(target)}' (with its password), same --data-dir")


class _CopyProgress:
    """Rows copied so far, per table, on a terminal (rich; nothing when stderr is not one)."""

    def __init__(self, enabled: bool):
        self._progress = None
        self._tasks: dict[str, int] = {}
        if enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} rows"),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self) -> "_CopyProgress":
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, table: str, rows: int) -> None:
        """Show `rows` copied of `table`."""
        if self._progress is None:
            return
        if table not in self._tasks:
            self._tasks[table] = self._progress.add_task(table, total=None)
        self._progress.update(self._tasks[table], completed=rows)
