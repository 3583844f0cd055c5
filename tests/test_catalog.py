"""The catalog on SQLite and PostgreSQL: migrations, paths, dates, the version counter, the change log, cascades."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import delete, select, text

from clipsearch.catalog import STATUS_FAILED, STATUS_OK, Catalog, EmbeddingRow, ImageRow, RootRow, file_time, vector_to_blob
from clipsearch.catalog_sql import catalog_exists, upsert_rows
from clipsearch.errors import ConfigError, LibraryError
from clipsearch.label_tables import LabelMemberRow, LabelReviewRow, LabelRow, LabelSetRow
from clipsearch.migrate import HEAD_REVISION, alembic_config, current_revision

pytestmark = pytest.mark.both_catalogs

NOW_NS = 1_700_000_000_123_456_789  # nanosecond file times overflow 32-bit columns: PostgreSQL must keep them whole


def add_image(session, path: str, root: str = "/photos", mtime_ns: int = NOW_NS, taken_at=None, fmt="JPEG",
              status=STATUS_OK, size=5_000_000_000) -> ImageRow:
    row = ImageRow(path=path, root=root, size=size, mtime_ns=mtime_ns, content_hash=path[-8:], width=4, height=3,
                   format=fmt, taken_at=taken_at, status=status)
    session.add(row)
    session.flush()
    return row


def schema_differences(catalog: Catalog) -> list:
    """What Alembic's autogenerate would change to make the catalog's schema match the models (nothing, ideally)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from clipsearch.catalog import Base

    with catalog.engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)


def test_new_catalog_is_at_the_newest_revision_and_matches_the_models(catalog):
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION
    with catalog.engine.connect() as connection:
        assert current_revision(connection) == HEAD_REVISION
    assert schema_differences(catalog) == []


def test_reopening_an_up_to_date_catalog_keeps_its_rows(catalog_location):
    first = Catalog(catalog_location)
    with first.write() as session:
        add_image(session, "/photos/a.jpg")
    first.close()
    second = Catalog(catalog_location)
    assert second.counts()["images"] == 1
    second.close()


def test_catalog_exists_only_once_created(catalog_location):
    assert not catalog_exists(catalog_location)
    Catalog(catalog_location).close()
    assert catalog_exists(catalog_location)


def test_paths_under_a_folder_compare_bytewise(catalog):
    # Under a linguistic collation (PostgreSQL's default en_US) '/' and '-' sort by other rules than bytes and
    # the [root/, root0) range would miss or catch wrong paths.
    inside = ["/photos/b/x.jpg", "/photos/b/c/y.jpg", "/photos/b/Ärger.jpg", "/photos/b/ 1.jpg"]
    outside = ["/photos/b0/x.jpg", "/photos/b-c/x.jpg", "/photos/b.jpg", "/photos/B/x.jpg", "/photos/ba/x.jpg", "/photos/b"]
    with catalog.write() as session:
        for path in inside + outside:
            add_image(session, path)
    assert sorted(catalog.known_under(["/photos/b"])) == sorted(inside)
    assert sorted(catalog.known_under(["/photos/b/"])) == sorted(inside)
    ids = catalog.filter_ids(folder="/photos/b")
    assert sorted(catalog.images_by_id(ids.tolist())[i].path for i in ids) == sorted(inside)


def test_big_sizes_and_nanosecond_times_are_kept_exactly(catalog):
    with catalog.write() as session:
        add_image(session, "/photos/huge.tif", mtime_ns=NOW_NS, size=12_345_678_901)
    known = catalog.known_under(["/photos"])["/photos/huge.tif"]
    assert (known.size, known.mtime_ns) == (12_345_678_901, NOW_NS)


def test_dates_filters_and_sort_keys_match_a_python_reference(catalog):
    base = datetime(2021, 6, 1, 12, 0, 0)
    rows = []
    with catalog.write() as session:
        for n in range(12):
            taken = base + timedelta(days=3 * n, microseconds=250_000) if n % 3 else None
            mtime_ns = int((base + timedelta(days=2 * n, hours=5)).timestamp() * 1e9) + n  # naive base read as local
            fmt = ("JPEG", "PNG", "HEIF")[n % 3]
            row = add_image(session, f"/photos/{n:02d}.x", mtime_ns=mtime_ns, taken_at=taken, fmt=fmt,
                            status=STATUS_FAILED if n == 11 else STATUS_OK)
            rows.append((row.id, taken or file_time(mtime_ns), fmt, n != 11))
    ok = [r for r in rows if r[3]]

    def expect(low=None, high=None, formats=()):
        return sorted(i for i, date, fmt, _ in ok if (low is None or date >= low) and (high is None or date < high)
                      and (not formats or fmt in formats))

    low, high = base + timedelta(days=4), base + timedelta(days=19, hours=5)
    assert sorted(catalog.filter_ids(date_from=low).tolist()) == expect(low=low)
    assert sorted(catalog.filter_ids(date_to=high).tolist()) == expect(high=high)
    assert sorted(catalog.filter_ids(date_from=low, date_to=high, formats=["png", "heif"]).tolist()) == expect(low, high, ("PNG", "HEIF"))
    oldest, newest = catalog.date_range()
    dates = sorted(date for _, date, _, _ in ok)
    assert abs((oldest - dates[0]).total_seconds()) < 1e-3 and abs((newest - dates[-1]).total_seconds()) < 1e-3
    ids, seconds = catalog.date_keys()
    assert ids.tolist() == sorted(i for i, *_ in ok)
    reference = {i: (date - datetime(1970, 1, 1)).total_seconds() for i, date, _, _ in ok}
    np.testing.assert_allclose(seconds, [reference[i] for i in ids.tolist()], atol=1e-3)


def test_version_grows_with_writes_only(catalog):
    start = catalog.version()
    with catalog.write() as session:
        add_image(session, "/photos/a.jpg")
    assert catalog.version() == start + 1
    with catalog.write() as session:
        session.get(ImageRow, 1)  # read only: no bump, no write lock
    assert catalog.version() == start + 1
    with catalog.write() as session:
        session.execute(delete(ImageRow))
    assert catalog.version() == start + 2


def test_change_log_follows_every_vector_change_and_never_reuses_numbers(catalog):
    with catalog.write() as session:
        a, b = add_image(session, "/photos/a.jpg"), add_image(session, "/photos/b.jpg")
        session.add_all([EmbeddingRow(image_id=a.id, model="m", vector=vector_to_blob(np.ones(4))),
                         EmbeddingRow(image_id=b.id, model="m", vector=vector_to_blob(np.zeros(4)))])
    first, changed = catalog.changes_since(0)
    assert changed == {a.id, b.id} and catalog.generation() == first
    with catalog.write() as session:
        session.get(EmbeddingRow, a.id).vector = vector_to_blob(np.full(4, 2.0))
    seq, changed = catalog.changes_since(first)
    assert changed == {a.id} and seq > first
    catalog.prune_changes(seq)
    assert catalog.changes_since(0)[1] == set() and catalog.generation() == seq
    with catalog.write() as session:
        session.execute(delete(ImageRow).where(ImageRow.id == b.id))  # cascades to its vector: logged too
    newest, changed = catalog.changes_since(seq)
    assert changed == {b.id} and newest > seq
    ids, vectors = catalog.vectors("m")
    assert ids.tolist() == [a.id] and vectors.tolist() == [[2.0] * 4]


def test_vectors_round_trip_exactly(catalog):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((50, 16)).astype(np.float32)
    with catalog.write() as session:
        for n, vector in enumerate(matrix):
            row = add_image(session, f"/photos/{n}.jpg")
            session.add(EmbeddingRow(image_id=row.id, model="m", vector=vector_to_blob(vector)))
    ids, vectors = catalog.vectors("m")
    assert np.array_equal(vectors, matrix) and ids.tolist() == sorted(ids.tolist())
    assert np.array_equal(catalog.vector_of(int(ids[7]), "m"), matrix[7])
    assert catalog.vectors("m", ids[:3].tolist())[1].shape == (3, 16)


def test_deleting_images_and_labels_cascades(catalog):
    with catalog.write() as session:
        image = add_image(session, "/photos/a.jpg")
        session.add(LabelSetRow(name="kind"))
        session.flush()
        label = LabelRow(set_name="kind", name="cat")
        session.add(label)
        session.flush()
        session.add_all([EmbeddingRow(image_id=image.id, model="m", vector=vector_to_blob(np.ones(2))),
                         LabelMemberRow(image_id=image.id, label_id=label.id, probability=0.9, strength=2.0),
                         LabelReviewRow(image_id=image.id, label_id=label.id, verdict="confirm")])
    with catalog.write() as session:
        session.execute(delete(LabelSetRow))
    with catalog.read() as session:
        assert session.scalars(select(LabelMemberRow)).all() == [] and session.scalars(select(LabelReviewRow)).all() == []
        assert session.get(EmbeddingRow, image.id) is not None
    with catalog.write() as session:
        session.execute(delete(ImageRow))
    assert catalog.counts() == {"images": 0, "ok": 0, "failed": 0, "embeddings": 0}


def test_upsert_rows_inserts_and_replaces(catalog):
    with catalog.write() as session:
        image = add_image(session, "/photos/a.jpg")
        session.add(LabelSetRow(name="kind"))
        session.flush()
        labels = [LabelRow(set_name="kind", name=name) for name in ("cat", "dog")]
        session.add_all(labels)
        session.flush()
        columns = ("image_id", "label_id", "probability", "strength", "confirmed")
        upsert_rows(session.connection(), LabelMemberRow.__table__, ("image_id", "label_id"), columns,
                    [(image.id, labels[0].id, 0.5, 1.0, False), (image.id, labels[1].id, 0.4, 0.5, True)])
        upsert_rows(session.connection(), LabelMemberRow.__table__, ("image_id", "label_id"), columns,
                    [(image.id, labels[0].id, 0.6, 2.0, False), (image.id, labels[0].id, 0.7, 3.0, True)])  # last wins
    with catalog.read() as session:
        got = {(m.label_id, m.probability, m.strength, m.confirmed) for m in session.scalars(select(LabelMemberRow))}
    assert got == {(labels[0].id, 0.7, 3.0, True), (labels[1].id, 0.4, 0.5, True)}


def test_roots_folders_formats_and_failures(catalog):
    with catalog.write() as session:
        session.add(RootRow(path="/photos"))
        add_image(session, "/photos/2020/a.jpg")
        add_image(session, "/photos/2020/b.png", fmt="PNG")
        add_image(session, "/photos/broken.jpg", status=STATUS_FAILED, fmt=None)
        session.get(ImageRow, 3).error = "not an image"
    assert [r.path for r in catalog.roots()] == ["/photos"]
    assert catalog.folders(depth=1) == [("/photos", 2), ("/photos/2020", 2)]
    assert catalog.formats() == {"JPEG": 1, "PNG": 1}
    assert catalog.failures() == [("/photos/broken.jpg", "not an image")]
    assert catalog.size_bytes() > 0


def test_concurrent_opens_of_a_new_catalog_migrate_once(catalog_location):
    errors, opened = [], []

    def open_one():
        try:
            opened.append(Catalog(catalog_location))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with opened[0].read() as session:
        assert session.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD_REVISION]
    for each in opened:
        each.close()


def test_a_catalog_from_a_newer_clipsearch_is_refused(catalog_location):
    Catalog(catalog_location).close()
    catalog = Catalog(catalog_location)
    with catalog.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    catalog.close()
    with pytest.raises(LibraryError, match="newer clipsearch") as caught:
        Catalog(catalog_location)
    assert "upgrade clipsearch" in caught.value.hint


# --- catalogs written before migrations existed (SQLite files)  ------------------------------------------

LEGACY_SQLITE_SCHEMA = """
CREATE TABLE images (id INTEGER NOT NULL, path VARCHAR NOT NULL, root VARCHAR NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, content_hash VARCHAR, width INTEGER, height INTEGER, format VARCHAR, taken_at DATETIME,
    status VARCHAR NOT NULL, error VARCHAR, indexed_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    PRIMARY KEY (id), UNIQUE (path));
CREATE INDEX ix_images_root ON images (root);
CREATE INDEX ix_images_status ON images (status);
CREATE INDEX ix_images_content_hash ON images (content_hash);
CREATE TABLE roots (path VARCHAR NOT NULL, added_at DATETIME NOT NULL, last_indexed_at DATETIME, PRIMARY KEY (path));
CREATE TABLE library_meta ("key" VARCHAR NOT NULL, value VARCHAR NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE vector_changes (seq INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, image_id INTEGER NOT NULL);
CREATE TABLE embeddings (image_id INTEGER NOT NULL, model VARCHAR NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (image_id),
    FOREIGN KEY(image_id) REFERENCES images (id) ON DELETE CASCADE);
CREATE INDEX ix_embeddings_model ON embeddings (model);
CREATE TRIGGER embeddings_log_insert AFTER INSERT ON embeddings BEGIN INSERT INTO vector_changes (image_id) VALUES (NEW.image_id); END;
CREATE TRIGGER embeddings_log_update AFTER UPDATE ON embeddings BEGIN INSERT INTO vector_changes (image_id) VALUES (NEW.image_id); END;
CREATE TRIGGER embeddings_log_delete AFTER DELETE ON embeddings BEGIN INSERT INTO vector_changes (image_id) VALUES (OLD.image_id); END;
CREATE TABLE label_assignments (image_id INTEGER, label VARCHAR);
INSERT INTO images VALUES (1, '/photos/a.jpg', '/photos', 10, 1700000000000000000, 'h', 4, 3, 'JPEG', NULL, 'ok', NULL,
    '2024-01-01 00:00:00.000000', '2024-01-01 00:00:00.000000');
INSERT INTO embeddings VALUES (1, 'm', x'0000803f');
INSERT INTO library_meta VALUES ('schema_version', '1');
"""


def test_a_catalog_from_before_migrations_is_adopted_with_its_rows(tmp_path):
    path = tmp_path / "catalog.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.executescript(LEGACY_SQLITE_SCHEMA)
    catalog = Catalog(path)
    try:
        with catalog.engine.connect() as connection:
            assert current_revision(connection) == HEAD_REVISION
            tables = set(connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars())
        assert "label_assignments" not in tables and {"label_members", "label_reviews", "label_candidates"} <= tables
        assert schema_differences(catalog) == []
        assert catalog.counts() == {"images": 1, "ok": 1, "failed": 0, "embeddings": 1}
        assert catalog.vector_of(1, "m").tolist() == [1.0]
        before = catalog.generation()
        with catalog.write() as session:
            session.get(EmbeddingRow, 1).vector = vector_to_blob(np.array([2.0]))
        assert catalog.changes_since(before) == (before + 1, {1})  # one trigger per change, not two
    finally:
        catalog.close()


# --- locations and errors -----------------------------------------------------------------------------


def test_bad_catalog_urls_say_what_to_use():
    with pytest.raises(ConfigError, match="mysql"):
        Catalog("mysql://user:secret@localhost/photos")
    with pytest.raises(LibraryError) as caught:
        Catalog("postgresql://someone:s3cret-pw@127.0.0.1:1/photos")
    message = str(caught.value) + caught.value.hint
    assert "cannot reach" in message and "PostgreSQL server is running" in message
    assert "s3cret-pw" not in message and "***" in message


def test_writers_on_two_machines_sharing_a_postgresql_catalog_take_turns(postgres_url, tmp_path):
    from clipsearch.config import load_settings
    from clipsearch.errors import LibraryBusyError
    from clipsearch.library import Library

    # Two library folders (two machines) on one catalog: their file locks cannot see each other.
    here, there = (Library(load_settings({"data_dir": tmp_path / name, "db": postgres_url}, env={})) for name in ("a", "b"))
    try:
        with here.writer_lock("index"):
            with pytest.raises(LibraryBusyError, match="another machine"):
                with there.writer_lock("watch"):
                    pass
        with there.writer_lock("watch"):  # released with the first writer
            pass
    finally:
        here.close()
        there.close()


def test_a_migration_interrupted_half_way_leaves_nothing_behind(catalog_location, monkeypatch):
    from alembic import command
    from sqlalchemy import inspect

    real_upgrade = command.upgrade

    def crash_after_one_table(config, revision):
        config.attributes["connection"].exec_driver_sql("CREATE TABLE images (id INTEGER PRIMARY KEY)")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(command, "upgrade", crash_after_one_table)
    with pytest.raises(RuntimeError, match="half-way"):
        Catalog(catalog_location)
    monkeypatch.setattr(command, "upgrade", real_upgrade)
    catalog = Catalog(catalog_location)  # the next open migrates from scratch, as if nothing had happened
    try:
        with catalog.engine.connect() as connection:
            assert "id" in {c["name"] for c in inspect(connection).get_columns("images")}
            assert len(inspect(connection).get_columns("images")) > 1
        assert schema_differences(catalog) == []
    finally:
        catalog.close()


def test_postgresql_log_in_and_missing_database_errors_say_what_to_do(postgres_admin_url):
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_admin_url)
    cases = [
        (admin.set(password="not-the-password"), "refused the log-in", "user and password"),
        (admin.set(database="clipsearch_no_such_database"), "does not exist", "createdb"),
    ]
    for url, message, hint in cases:
        with pytest.raises(LibraryError, match=message) as caught:
            Catalog(url.render_as_string(hide_password=False))
        assert hint in caught.value.hint and "not-the-password" not in str(caught.value)


def test_pooled_postgresql_connections_survive_a_server_restart(postgres_url, postgres_admin_url, monkeypatch):
    import clipsearch.catalog_sql
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    catalog = Catalog(postgres_url)
    try:
        assert catalog.counts()["images"] == 0  # a pooled connection now
        admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:  # what a restart does to the pool: every session of the database ends
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                               {"name": make_url(postgres_url).database})
        admin.dispose()
        monkeypatch.setattr(clipsearch.catalog_sql, "PING_AFTER_IDLE_S", 0.0)  # the pooled connection counts as idle
        assert catalog.counts()["images"] == 0  # checked on checkout, replaced, and the read just works
        with catalog.write() as session:
            add_image(session, "/photos/after-restart.jpg")
        assert catalog.counts()["images"] == 1
    finally:
        catalog.close()
