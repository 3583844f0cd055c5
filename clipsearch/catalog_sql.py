"""What differs between the catalog's databases (SQLite, PostgreSQL): engines, URLs, date SQL, upserts, errors."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from sqlalchemy import DateTime, Float, Table, create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from clipsearch.errors import ConfigError, LibraryError

log = logging.getLogger(__name__)

SUPPORTED = ("sqlite", "postgresql")


def catalog_url(location: Path | str) -> URL:
    """The SQLAlchemy URL of a catalog given as a SQLite file path or a database URL (postgresql:// uses psycopg 3)."""
    if isinstance(location, Path) or "://" not in str(location):
        return URL.create("sqlite", database=str(Path(location).expanduser().absolute()))
    try:
        url = make_url(str(location))
    except ArgumentError as e:
        raise ConfigError(f"the catalog URL {location!r} is not a database URL", "use postgresql://USER:PASSWORD@HOST/DB or sqlite:///FILE") from e
    backend, _, driver = url.drivername.partition("+")
    if backend == "postgres":  # Heroku-style and libpq-style spelling of the same thing
        backend = "postgresql"
    if backend not in SUPPORTED:
        raise ConfigError(f"the catalog cannot live in {backend} ({display_url(url)})", "use a postgresql:// or sqlite:/// URL")
    if backend == "postgresql" and driver in ("", "psycopg2"):
        driver = "psycopg"  # the driver clipsearch installs; psycopg2 URLs name the same server
    return url.set(drivername=f"{backend}+{driver}" if driver else backend)


def display_url(url: URL | str) -> str:
    """A URL safe to print: its password hidden."""
    url = make_url(url) if isinstance(url, str) else url
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def create_catalog_engine(url: URL) -> Engine:
    """An engine tuned for the catalog: WAL SQLite with foreign keys, or a pre-pinged PostgreSQL pool."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        engine = create_engine(
            url, pool_size=4, max_overflow=8, connect_args={"connect_timeout": 10, "application_name": "clipsearch"},
        )
    except ModuleNotFoundError as e:
        raise ConfigError(f"no PostgreSQL driver for {display_url(url)}: {e}", "pip install 'psycopg[binary]'") from e
    event.listen(engine.pool, "checkin", _note_checkin)
    event.listen(engine.pool, "checkout", _ping_if_idle)
    return engine


PING_AFTER_IDLE_S = 10.0


def _note_checkin(_dbapi_connection, record) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
    """Check a pooled PostgreSQL connection that sat idle before handing it out (the server may have restarted).

    SQLAlchemy's pool_pre_ping checks every checkout: a round trip per read, a quarter of a busy server's search
    time. Connections in steady use are known to be alive; a dead one is replaced here, transparently.
    """
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        dbapi_connection.rollback()
    except Exception as e:  # noqa: BLE001 (any failure means: do not use this connection)
        raise DisconnectionError(f"catalog connection idle for {time.monotonic() - idle_since:.0f} s is gone: {e}") from e


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    # NORMAL is safe against process crashes (kill -9) in WAL mode; only power loss can drop the last commits.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# --- dates ----------------------------------------------------------------------------------------
# SQLAlchemy keeps naive UTC datetimes: SQLite as 'YYYY-MM-DD HH:MM:SS.ffffff' text (text order is time order),
# PostgreSQL as TIMESTAMP WITHOUT TIME ZONE. These constructs compile to each database's own spelling.


class file_datetime(FunctionElement):
    """SQL: a file time in nanoseconds since the epoch as the catalog's naive UTC datetime."""

    type = DateTime()
    inherit_cache = True


@compiles(file_datetime, "sqlite")
def _file_datetime_sqlite(element, compiler, **kw):
    (value,) = element.clauses
    return f"strftime('%Y-%m-%d %H:%M:%f000', {compiler.process(value, **kw)} / 1000000000.0, 'unixepoch')"


@compiles(file_datetime, "postgresql")
def _file_datetime_postgresql(element, compiler, **kw):
    (value,) = element.clauses
    return f"(to_timestamp({compiler.process(value, **kw)} / 1e9) AT TIME ZONE 'UTC')"


class epoch_seconds(FunctionElement):
    """SQL: a naive UTC datetime column as seconds since the epoch (a float)."""

    type = Float()
    inherit_cache = True


@compiles(epoch_seconds, "sqlite")
def _epoch_seconds_sqlite(element, compiler, **kw):
    (value,) = element.clauses
    return f"CAST(strftime('%s', {compiler.process(value, **kw)}) AS REAL)"


@compiles(epoch_seconds, "postgresql")
def _epoch_seconds_postgresql(element, compiler, **kw):
    (value,) = element.clauses
    return f"EXTRACT(EPOCH FROM {compiler.process(value, **kw)})::float8"


# --- bulk writes ----------------------------------------------------------------------------------


def upsert_rows(connection: Connection, table: Table, keys: Sequence[str], columns: Sequence[str], rows: list[tuple]) -> None:
    """INSERT rows (tuples in `columns` order), replacing those with the same key; a later duplicate key wins.

    Both databases speak `INSERT ... ON CONFLICT (...) DO UPDATE`. SQLite: the driver's executemany (an ORM or Core
    insert of a million dicts costs several times more). PostgreSQL: one statement over unnest()ed column arrays,
    as a row-by-row executemany costs a round trip's worth of work per row there (about 6x slower).
    """
    if not rows:
        return
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys) or f"{keys[0]} = excluded.{keys[0]}"
    conflict = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    if connection.dialect.name != "postgresql":
        marker = "?" if connection.dialect.paramstyle == "qmark" else "%s"
        connection.exec_driver_sql(
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join([marker] * len(columns))}) {conflict}", rows)
        return
    key_at = [columns.index(k) for k in keys]
    # One statement may not update a row twice: keep each key's last row, as executemany would leave it.
    rows = list({tuple(row[i] for i in key_at): row for row in rows}.values())
    arrays = tuple(list(column) for column in zip(*rows))
    casts = ", ".join(f"%s::{table.c[c].type.compile(dialect=connection.dialect)}[]" for c in columns)
    connection.exec_driver_sql(f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT * FROM unnest({casts}) {conflict}", arrays)


def id_in(column, ids: Sequence[int], dialect_name: str):
    """SQL: column is one of ids. PostgreSQL: `= ANY(array)`, one parameter however many ids (an IN list of
    thousands of parameters costs more to build and parse than to run); SQLite: IN (...), at most ID_CHUNK ids."""
    if dialect_name == "postgresql":
        from sqlalchemy import Integer, any_, bindparam
        from sqlalchemy.dialects.postgresql import ARRAY

        return column == any_(bindparam(None, list(ids), type_=ARRAY(Integer())))
    return column.in_(list(ids))


def id_chunk(dialect_name: str) -> int:
    """How many ids one id_in() should hold (SQLite caps a statement's parameters)."""
    return 100_000 if dialect_name == "postgresql" else 500


def fetch_all(connection: Connection, query) -> list[tuple]:
    """Rows of a SELECT; on PostgreSQL through a binary cursor, where bytea arrives as bytes rather than hex text
    (vectors load about 2.5x faster)."""
    if connection.dialect.name != "postgresql":
        return [tuple(row) for row in connection.execute(query)]
    compiled = query.compile(dialect=connection.dialect, compile_kwargs={"render_postcompile": True})
    with connection.connection.driver_connection.cursor(binary=True) as cursor:
        cursor.execute(compiled.string, compiled.params)
        return cursor.fetchall()


def set_sequences(connection: Connection, columns: Sequence[tuple[str, str]]) -> None:
    """After rows were copied in with their ids, move PostgreSQL's id sequences past them (no-op on SQLite)."""
    if connection.dialect.name != "postgresql":
        return
    for table, column in columns:
        connection.exec_driver_sql(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
            f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
        )


# --- errors ---------------------------------------------------------------------------------------


def storage_error(error: SQLAlchemyError | OSError, where: str) -> LibraryError:
    """A database failure as a LibraryError that says what to do next."""
    text = str(getattr(error, "orig", None) or error).strip()
    lowered = text.lower()
    if "full" in lowered or "no space" in lowered:
        return LibraryError(f"the disk holding the catalog {where} is full ({text})", "free some space and run the command again; nothing was lost")
    if "locked" in lowered or "busy" in lowered:
        return LibraryError(f"the catalog {where} stayed locked by another process ({text})", "wait for the other clipsearch command to finish")
    if "readonly" in lowered or "unable to open" in lowered:
        return LibraryError(f"cannot write the catalog {where} ({text})", "check the folder's permissions or choose another --data-dir")
    if "password authentication failed" in lowered or ("role" in lowered and "does not exist" in lowered):
        return LibraryError(f"the catalog database {where} refused the log-in ({_first_line(text)})", "check the user and password in the --db URL")
    if "database" in lowered and "does not exist" in lowered:
        return LibraryError(f"the catalog database {where} does not exist ({_first_line(text)})", "create it first (createdb NAME) or fix the --db URL")
    if "connection refused" in lowered or "could not connect" in lowered or "connection failed" in lowered or "timeout expired" in lowered:
        return LibraryError(f"cannot reach the catalog database {where} ({_first_line(text)})", "check that the PostgreSQL server is running and the --db URL (host, port)")
    if "permission denied" in lowered:
        return LibraryError(f"the catalog database {where} refused an operation ({_first_line(text)})", "make the --db user the database's owner (createdb -O USER NAME, or ALTER DATABASE NAME OWNER TO USER): it creates and alters the catalog's tables")
    return LibraryError(f"catalog error in {where}: {_first_line(text)}", "if the catalog is damaged, move it aside and re-index")


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else text



def file_size(path: Path) -> int:
    """A file's size in bytes, 0 when it is not there."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def catalog_exists(location: Path | str | URL) -> bool:
    """Whether a catalog is there already (without creating one): the SQLite file, or its tables in the database."""
    url = location if isinstance(location, URL) else catalog_url(location)
    if url.get_backend_name() == "sqlite":
        return Path(url.database).is_file()
    from sqlalchemy import inspect

    engine = create_catalog_engine(url)
    try:
        with engine.connect() as connection:
            return inspect(connection).has_table("images")
    except DBAPIError as e:
        raise storage_error(e, display_url(url)) from e
    finally:
        engine.dispose()
