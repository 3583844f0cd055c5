"""The catalog: SQLite or PostgreSQL through SQLAlchemy, the source of truth for images, their metadata and vectors."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, LargeBinary, String, delete, event, func, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from clipsearch.catalog_sql import (catalog_url, create_catalog_engine, display_url, epoch_seconds, fetch_all, file_datetime,
                                    file_size, id_chunk, id_in, storage_error)
from clipsearch.errors import LibraryError

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_FAILED = "failed"


def utcnow() -> datetime:
    """The current time as a naive UTC datetime (the catalog stores no zone)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


# Paths compare byte-wise on every database: range scans over a folder's paths rely on it ('/' < '0').
PathString = String().with_variant(String(collation="C"), "postgresql")
# Byte sizes and nanosecond times outgrow 32 bits; SQLite's INTEGER is 64-bit already (and keeps old catalogs equal).
BigInt = BigInteger().with_variant(Integer(), "sqlite")


class ImageRow(Base):
    """One image file known to the library (indexed, or failed with a reason)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(PathString, unique=True)
    root: Mapped[str] = mapped_column(PathString, index=True)
    size: Mapped[int] = mapped_column(BigInt)
    mtime_ns: Mapped[int] = mapped_column(BigInt)
    content_hash: Mapped[str | None] = mapped_column(String, index=True)
    width: Mapped[int | None]
    height: Mapped[int | None]
    format: Mapped[str | None] = mapped_column(String)
    taken_at: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String, index=True)
    error: Mapped[str | None] = mapped_column(String)
    indexed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class EmbeddingRow(Base):
    """The vector of one image, tagged with the model that made it."""

    __tablename__ = "embeddings"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String, index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class RootRow(Base):
    """A folder the user asked to index."""

    __tablename__ = "roots"
    path: Mapped[str] = mapped_column(PathString, primary_key=True)
    added_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_indexed_at: Mapped[datetime | None] = mapped_column(DateTime)


class MetaRow(Base):
    """Library-wide key/value metadata (schema version, model...)."""

    __tablename__ = "library_meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class VectorChangeRow(Base):
    """Log of embedding changes, filled by triggers (see the migrations), so derived vector stores catch up incrementally."""

    __tablename__ = "vector_changes"
    __table_args__ = {"sqlite_autoincrement": True}
    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(Integer)


@dataclass(frozen=True)
class KnownImage:
    """A lightweight snapshot of one catalog row, for planning an indexing run."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str
    model: str | None  # model of its embedding, None when it has none


def _known_images():
    """SELECT of the KnownImage fields (row + model of its embedding, if any)."""
    return select(
        ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns, ImageRow.content_hash, ImageRow.status,
        EmbeddingRow.model,
    ).outerjoin(EmbeddingRow, EmbeddingRow.image_id == ImageRow.id)


VERSION_KEY = "catalog_version"
# PostgreSQL advisory lock (scoped to the catalog's database) held by the library's single writer, whatever machine.
WRITER_LOCK_KEY = 0x636C6970_7772_6974  # "clipwrit"
_BUMP_VERSION = text(
    f"INSERT INTO library_meta (key, value) VALUES ('{VERSION_KEY}', '1') "
    "ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(library_meta.value AS INTEGER) + 1 AS VARCHAR)"
)


def _note_flush(session: Session, _context) -> None:
    if session.new or session.dirty or session.deleted:
        session.info["changed"] = True


def _note_statement(state) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info["changed"] = True


def vector_to_blob(vector: np.ndarray) -> bytes:
    """Serialise one vector as little-endian float32 bytes."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class Catalog:
    """Access to one library's catalog (a SQLite file, or a database URL); every write goes through `write()`."""

    def __init__(self, location: Path | str):
        self.url = catalog_url(location)
        self.backend = self.url.get_backend_name()
        self.where = display_url(self.url)  # for messages: never the password
        self.db_path = Path(self.url.database) if self.backend == "sqlite" else None
        if self.db_path is not None:
            try:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LibraryError(f"cannot create library folder {self.db_path.parent}: {e}", "choose another --data-dir") from e
        self.engine = create_catalog_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "after_flush", _note_flush)
        event.listen(self._sessions, "do_orm_execute", _note_statement)
        # PostgreSQL reads outside transactions, as SQLite's are: no BEGIN and ROLLBACK round trips per read.
        reading = self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.backend == "postgresql" else self.engine
        self._read_sessions = sessionmaker(reading, expire_on_commit=False)
        import clipsearch.label_tables  # noqa: F401  (registers the label tables on Base; imported here: no cycle)
        from clipsearch.migrate import ensure_schema

        lock = self.db_path.with_name(self.db_path.name + ".migrate.lock") if self.db_path is not None else None
        try:
            ensure_schema(self.engine, self.where, lock)
        except DBAPIError as e:
            self.engine.dispose()
            raise storage_error(e, self.where) from e
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    @contextmanager
    def exclusive_writer(self) -> Iterator[bool]:
        """Hold the catalog-wide writer lock where the database has one (PostgreSQL); yields False if another has it.

        Writers on other machines share a PostgreSQL catalog, and the library folder's file lock need not reach
        them (network file systems): this lock does. SQLite catalogs have only the file lock (always True here).
        """
        if self.backend != "postgresql":
            yield True
            return
        # A session-level lock on a connection of its own, outside any transaction, for as long as the writer runs.
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            held = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": WRITER_LOCK_KEY}).scalar())
            try:
                yield held
            finally:
                if held:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": WRITER_LOCK_KEY})

    def size_bytes(self) -> int:
        """Disk space of the catalog: its SQLite files, or its tables and indexes in PostgreSQL."""
        if self.db_path is not None:
            return sum(file_size(self.db_path.with_name(self.db_path.name + suffix)) for suffix in ("", "-wal", "-shm"))
        names = sorted(Base.metadata.tables)
        with self.read() as session:
            query = text("SELECT COALESCE(SUM(pg_total_relation_size(to_regclass(name))), 0) FROM unnest(CAST(:names AS text[])) AS name")
            return int(session.execute(query, {"names": names}).scalar() or 0)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session; on PostgreSQL each statement sees the latest commits (no snapshot across them)."""
        with self._read_sessions() as session:
            try:
                yield session
            except OperationalError as e:  # the database went away, or its disk failed: say so, not a traceback
                raise storage_error(e, self.where) from e

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session committed as one transaction on success, rolled back on error."""
        session = self._sessions()
        try:
            yield session
            # Every committed change moves the catalog version on: readers' caches (filters, dates) key on it.
            # A session that only read commits nothing, so it never waits for SQLite's write lock.
            session.flush()
            if session.info.get("changed"):
                session.execute(_BUMP_VERSION)
            session.commit()
        except OperationalError as e:
            session.rollback()
            raise storage_error(e, self.where) from e
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def version(self) -> int:
        """A counter that grows with every committed write (any change to images, vectors or metadata)."""
        value = self.get_meta(VERSION_KEY)
        return int(value) if value else 0

    # --- metadata -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """One library metadata value, or None."""
        with self.read() as session:
            row = session.get(MetaRow, key)
            return row.value if row else None

    def set_meta(self, session: Session, key: str, value: str) -> None:
        """Set a library metadata value inside a write session."""
        session.merge(MetaRow(key=key, value=value))

    def library_model(self) -> dict[str, str] | None:
        """The model the library's vectors come from: {'model_id', 'model', 'pretrained', 'dim'}, or None."""
        with self.read() as session:
            rows = {r.key: r.value for r in session.scalars(select(MetaRow).where(MetaRow.key.like("model%")))}
        if "model_id" not in rows:
            return None
        return {
            "model_id": rows["model_id"],
            "model": rows.get("model_name", ""),
            "pretrained": rows.get("model_pretrained", ""),
            "dim": rows.get("model_dim", "0"),
        }

    def set_library_model(self, session: Session, model_id: str, model: str, pretrained: str, dim: int) -> None:
        """Record which model the library's vectors come from."""
        for key, value in (("model_id", model_id), ("model_name", model), ("model_pretrained", pretrained), ("model_dim", str(dim))):
            self.set_meta(session, key, value)

    # --- queries --------------------------------------------------------------------------------
    def known_under(self, roots: Iterable[str]) -> dict[str, KnownImage]:
        """Every catalog row whose path lies under one of the given folders, keyed by path."""
        result: dict[str, KnownImage] = {}
        with self.read() as session:
            for root in roots:
                low = root.rstrip("/") + "/"
                # '0' follows '/' in byte order: [root/, root0) is exactly the paths under root, using the index.
                high = root.rstrip("/") + "0"
                query = _known_images().where(ImageRow.path >= low, ImageRow.path < high)
                for row in session.execute(query):
                    result[row.path] = KnownImage(*row)
        return result

    def find_by_hash(self, content_hash: str) -> list[KnownImage]:
        """Rows whose file content has this hash (to recognise moved files)."""
        with self.read() as session:
            query = _known_images().where(ImageRow.content_hash == content_hash)
            return [KnownImage(*row) for row in session.execute(query)]

    def image_by_path(self, path: str) -> ImageRow | None:
        """The row of one path, or None."""
        with self.read() as session:
            return session.scalars(select(ImageRow).where(ImageRow.path == path)).first()

    def images_by_id(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        """Rows for the given ids (missing ids are left out)."""
        found: dict[int, ImageRow] = {}
        step = id_chunk(self.backend)
        with self.read() as session:
            for start in range(0, len(ids), step):
                chunk = [int(i) for i in ids[start : start + step]]
                for row in session.scalars(select(ImageRow).where(id_in(ImageRow.id, chunk, self.backend))):
                    found[row.id] = row
        return found

    def vector_of(self, image_id: int, model_id: str) -> np.ndarray | None:
        """The stored vector of one image for a model, or None."""
        with self.read() as session:
            row = session.get(EmbeddingRow, image_id)
            if row is None or row.model != model_id:
                return None
            return np.frombuffer(row.vector, dtype="<f4").astype(np.float32)

    def vectors(self, model_id: str, image_ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, d]) of every embedding of a model, or of the given images."""
        ids: list[int] = []
        blobs: list[bytes] = []
        with self.read() as session:
            if image_ids is None:
                chunks: Iterable = [None]
            else:
                all_ids, step = [int(i) for i in image_ids], id_chunk(self.backend)
                chunks = [all_ids[i : i + step] for i in range(0, len(all_ids), step)]
            for chunk in chunks:
                query = select(EmbeddingRow.image_id, EmbeddingRow.vector).where(EmbeddingRow.model == model_id)
                if chunk is not None:
                    query = query.where(id_in(EmbeddingRow.image_id, chunk, self.backend))
                for image_id, blob in fetch_all(session.connection(), query.order_by(EmbeddingRow.image_id)):
                    ids.append(image_id)
                    blobs.append(blob)
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        joined = b"".join(blobs)
        del blobs  # at a million vectors each copy is 2 GB: keep one
        # copy=False: '<f4' is float32 on little-endian hosts, so no further copy is made there.
        matrix = np.frombuffer(joined, dtype="<f4").reshape(len(ids), -1).astype(np.float32, copy=False)
        return np.asarray(ids, dtype=np.int64), matrix

    def vector_chunks(self, model_id: str, chunk: int = 100_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of a model's embeddings in id order, `chunk` rows per read (bounded memory at 1M vectors)."""
        last = -1
        while True:
            with self.read() as session:
                query = select(EmbeddingRow.image_id, EmbeddingRow.vector).where(
                    EmbeddingRow.model == model_id, EmbeddingRow.image_id > last)
                rows = fetch_all(session.connection(), query.order_by(EmbeddingRow.image_id).limit(chunk))
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
            del rows
            yield ids, matrix.astype(np.float32, copy=False)
            last = int(ids[-1])
            if len(ids) < chunk:
                return

    def log_state(self) -> tuple[int, int]:
        """(log_floor(), generation()) in one query: what every search checks, so one round trip to the database."""
        newest = select(func.max(VectorChangeRow.seq)).scalar_subquery()
        floor = select(MetaRow.value).where(MetaRow.key == "vector_log_floor").scalar_subquery()
        with self.read() as session:
            newest_seq, floor_text = session.execute(select(newest, floor)).one()
        floor_seq = int(floor_text) if floor_text else 0
        return floor_seq, max(newest_seq or 0, floor_seq)

    def generation(self) -> int:
        """A counter that grows with every vector change (the newest change-log sequence number)."""
        return self.log_state()[1]

    def log_floor(self) -> int:
        """Changes up to this sequence number were pruned from the log."""
        return self.log_state()[0]

    def changes_since(self, seq: int) -> tuple[int, set[int]]:
        """(newest sequence number, ids of images whose vectors changed after `seq`)."""
        with self.read() as session:
            rows = session.execute(select(VectorChangeRow.seq, VectorChangeRow.image_id).where(VectorChangeRow.seq > seq)).all()
        newest = max((r.seq for r in rows), default=seq)
        return newest, {r.image_id for r in rows}

    def prune_changes(self, up_to: int) -> None:
        """Forget change-log entries up to a sequence number that the saved store already includes."""
        with self.write() as session:
            session.execute(delete(VectorChangeRow).where(VectorChangeRow.seq <= up_to))
            current = session.get(MetaRow, "vector_log_floor")
            if current is None or int(current.value) < up_to:
                self.set_meta(session, "vector_log_floor", str(up_to))

    def filter_ids(self, folder: str | None = None, date_from: datetime | None = None, date_to: datetime | None = None,
                   formats: Sequence[str] = (), label_ids: Sequence[int] = ()) -> np.ndarray:
        """Ids of indexed images under a folder, dated in [date_from, date_to), of the given formats, holding every label."""
        from clipsearch.label_tables import LabelMemberRow

        query = select(ImageRow.id).where(ImageRow.status == STATUS_OK)
        if folder:
            low, high = folder.rstrip("/") + "/", folder.rstrip("/") + "0"  # the range trick of known_under
            query = query.where(ImageRow.path >= low, ImageRow.path < high)
        date = photo_date()
        if date_from is not None:
            query = query.where(date >= date_from)
        if date_to is not None:
            query = query.where(date < date_to)
        if formats:
            query = query.where(ImageRow.format.in_([f.upper() for f in formats]))
        for label_id in label_ids:
            query = query.where(ImageRow.id.in_(select(LabelMemberRow.image_id).where(LabelMemberRow.label_id == int(label_id))))
        with self.read() as session:
            return np.fromiter(session.scalars(query), dtype=np.int64)

    def date_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, photo dates as seconds) of every indexed image, for sorting results by date in bulk."""
        # Both the EXIF date and the file time read as seconds the same way (naive = UTC), so the order matches
        # photo_date(); one query instead of one lookup per result.
        seconds_of = func.coalesce(epoch_seconds(ImageRow.taken_at), ImageRow.mtime_ns / 1e9)
        query = select(ImageRow.id, seconds_of).where(ImageRow.status == STATUS_OK).order_by(ImageRow.id)
        with self.read() as session:
            rows = session.execute(query).all()
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        seconds = np.fromiter((row[1] if row[1] is not None else 0.0 for row in rows), dtype=np.float64, count=len(rows))
        return ids, seconds

    def formats(self) -> dict[str, int]:
        """Indexed images per file format (Pillow's names: JPEG, PNG, HEIF...)."""
        with self.read() as session:
            rows = session.execute(
                select(ImageRow.format, func.count()).where(ImageRow.status == STATUS_OK, ImageRow.format.is_not(None))
                .group_by(ImageRow.format).order_by(func.count().desc())
            )
            return {fmt: n for fmt, n in rows}

    def date_range(self) -> tuple[datetime, datetime] | None:
        """(oldest, newest) photo date of the indexed images, or None when there are none."""
        date = photo_date()
        with self.read() as session:
            low, high = session.execute(select(func.min(date), func.max(date)).where(ImageRow.status == STATUS_OK)).one()
        if low is None:
            return None
        return _as_datetime(low), _as_datetime(high)

    def folders(self, depth: int = 1) -> list[tuple[str, int]]:
        """(folder, indexed images under it) for each root and its subfolders down to `depth` levels."""
        counts: dict[str, int] = {}
        with self._sessions() as session:  # a transaction: streaming (yield_per) needs a server-side cursor in one
            rows = session.execute(
                select(ImageRow.root, ImageRow.path).where(ImageRow.status == STATUS_OK).execution_options(yield_per=5000)
            )
            for root, path in rows:
                counts[root] = counts.get(root, 0) + 1
                parts = path[len(root.rstrip("/")) + 1 :].split("/")[:-1]
                for level in range(1, min(depth, len(parts)) + 1):
                    folder = root.rstrip("/") + "/" + "/".join(parts[:level])
                    counts[folder] = counts.get(folder, 0) + 1
        return sorted(counts.items())

    def counts(self) -> dict[str, int]:
        """Image counts by status and the number of stored embeddings."""
        with self.read() as session:
            by_status = dict(session.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
            embeddings = session.scalar(select(func.count()).select_from(EmbeddingRow)) or 0
        return {
            "images": sum(by_status.values()),
            "ok": by_status.get(STATUS_OK, 0),
            "failed": by_status.get(STATUS_FAILED, 0),
            "embeddings": embeddings,
        }

    def failures(self, limit: int | None = None) -> list[tuple[str, str]]:
        """(path, reason) of files that could not be indexed."""
        with self.read() as session:
            query = select(ImageRow.path, ImageRow.error).where(ImageRow.status == STATUS_FAILED).order_by(ImageRow.path)
            if limit:
                query = query.limit(limit)
            return [(p, e or "") for p, e in session.execute(query)]

    def roots(self) -> list[RootRow]:
        """The folders the user has indexed."""
        with self.read() as session:
            return list(session.scalars(select(RootRow).order_by(RootRow.path)))


def file_time(mtime_ns: int) -> datetime:
    """A file's modification time as a naive UTC datetime (how photo dates without EXIF are kept)."""
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).replace(tzinfo=None)


def photo_date():
    """SQL expression of an image's date: its EXIF date taken, else its file time (a naive UTC datetime)."""
    return func.coalesce(ImageRow.taken_at, file_datetime(ImageRow.mtime_ns), type_=DateTime())


def _as_datetime(value) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace(" ", "T")[:26])


def delete_embeddings(session: Session, model_id: str | None = None) -> None:
    """Drop every embedding (of one model, or all) inside a write session."""
    query = delete(EmbeddingRow)
    if model_id is not None:
        query = query.where(EmbeddingRow.model == model_id)
    session.execute(query)


def touch_images(session: Session, changes: Iterable[tuple[int, dict]]) -> None:
    """Update columns of existing rows by id."""
    for image_id, values in changes:
        session.execute(update(ImageRow).where(ImageRow.id == image_id).values(**values, updated_at=utcnow()))


