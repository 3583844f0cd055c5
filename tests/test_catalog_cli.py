"""`clipsearch db` and the `db` setting: status, upgrade, copying a SQLite library into PostgreSQL, URLs in output."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from clipsearch.catalog import Base, Catalog, VectorChangeRow
from clipsearch.cli import main
from clipsearch.config import load_settings
from clipsearch.indexer.run import index_folders
from clipsearch.library import Library
from clipsearch.migrate import HEAD_REVISION
from clipsearch.search import label_sets, labels
from clipsearch.search.searcher import Searcher
from tests.fakes import make_image


@pytest.fixture
def runner():
    return CliRunner()


def library_flags(settings) -> list[str]:
    return ["--data-dir", str(settings.data_dir)] + (["--db", settings.db] if settings.db else [])


@pytest.mark.both_catalogs
def test_db_status_and_upgrade(runner, settings):
    result = runner.invoke(main, ["db", "status", "--json", *library_flags(settings)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["revision"] is None
    result = runner.invoke(main, ["db", "upgrade", *library_flags(settings)])
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    result = runner.invoke(main, ["db", "status", "--json", *library_flags(settings)])
    info = json.loads(result.output)
    assert info["revision"] == info["newest"] == HEAD_REVISION
    assert info["backend"] == ("postgresql" if settings.db else "sqlite")


def table_rows(catalog: Catalog) -> dict[str, list[tuple]]:
    """Every row of every catalog table, in one order whatever the database's collation.

    Left out: the change log and its floor, which number the source's own history (a copy starts its own).
    """
    rows = {}
    with catalog.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name != VectorChangeRow.__tablename__:
                found = [tuple(r) for r in connection.execute(select(table)) if r[0] != "vector_log_floor"]
                rows[table.name] = sorted(found, key=repr)
    return rows


def test_copy_moves_a_sqlite_library_into_postgresql_without_reindexing(runner, photo_library, settings, fake_encoder,
                                                                         postgres_url, tmp_path):
    source = Library(settings)
    label_sets.add_label(source.catalog, "colours", "red")
    label_sets.add_label(source.catalog, "colours", "blue")
    labels.apply_all(source.catalog, fake_encoder)
    before = table_rows(source.catalog)
    hits_before = [h.path for h in Searcher(source, fake_encoder).search_text("a red photo", k=5)]
    source.close()

    result = runner.invoke(main, ["db", "copy", "--to", postgres_url, "--data-dir", str(settings.data_dir)])
    assert result.exit_code == 0, result.output
    assert "copied" in result.output and "clipsearch_test" in result.output

    moved = replace(settings, db=postgres_url)
    target = Library(moved)
    assert table_rows(target.catalog) == before  # ids, vectors, labels, reviews: all as they were
    assert [h.path for h in Searcher(target, fake_encoder).search_text("a red photo", k=5)] == hits_before
    target.close()

    # The PostgreSQL catalog carries on: new photos get new ids (its sequences moved past the copied ones).
    newcomer = make_image(tmp_path / "more" / "red-new.png", "red", noise=99)
    report = index_folders(moved, [newcomer.parent], encoder=fake_encoder)
    assert report.added == 1
    target = Library(moved)
    try:
        assert newcomer.as_posix() in [h.path for h in Searcher(target, fake_encoder).search_text("a red photo", k=20)]
        ids, _ = target.catalog.vectors(target.catalog.library_model()["model_id"])
        assert len(ids) == len(set(ids.tolist())) == len(before["embeddings"]) + 1
    finally:
        target.close()

    again = runner.invoke(main, ["db", "copy", "--to", postgres_url, "--data-dir", str(settings.data_dir)])
    assert again.exit_code != 0 and "already holds photos" in again.output

    # And back: a PostgreSQL catalog copied into a SQLite file (a backup, or leaving the server) keeps every row.
    backup = tmp_path / "backup" / "catalog.sqlite3"
    result = runner.invoke(main, ["db", "copy", "--to", f"sqlite:///{backup}", "--data-dir", str(settings.data_dir),
                                  "--db", postgres_url])
    assert result.exit_code == 0, result.output
    served, copied = Catalog(postgres_url), Catalog(backup)
    try:
        assert table_rows(copied) == table_rows(served)
    finally:
        served.close()
        copied.close()


def test_copy_refuses_a_missing_source_and_itself(runner, tmp_path):
    result = runner.invoke(main, ["db", "copy", "--to", f"sqlite:///{tmp_path}/other.sqlite3", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code != 0 and "no catalog" in result.output
    own = tmp_path / "lib" / "catalog.sqlite3"
    Catalog(own).close()
    result = runner.invoke(main, ["db", "copy", "--to", f"sqlite:///{own}", "--data-dir", str(own.parent)])
    assert result.exit_code != 0 and "own catalog" in result.output


def test_db_setting_comes_from_env_and_flag_and_never_shows_its_password(runner, tmp_path):
    url = "postgresql://photos:hunter22@db.example:5432/library"
    settings = load_settings({}, env={"CLIPSEARCH_DB": url})
    assert settings.db == url and settings.catalog_location == url
    assert load_settings({"db": "sqlite:///x.db"}, env={"CLIPSEARCH_DB": url}).db == "sqlite:///x.db"
    assert load_settings({}, env={}).catalog_location == load_settings({}, env={}).data_dir / "catalog.sqlite3"
    result = runner.invoke(main, ["config"], env={"CLIPSEARCH_DB": url})
    assert result.exit_code == 0, result.output
    assert "db.example" in result.output and "hunter22" not in result.output


@pytest.mark.both_catalogs
def test_status_names_the_catalog(runner, photo_library, settings):
    result = runner.invoke(main, ["status", "--json", *library_flags(settings)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["exists"] and info["counts"]["ok"] == len(photo_library) and info["catalog_bytes"] > 0
    if settings.db:
        assert info["catalog"].startswith("postgresql+psycopg://clipsearch_test:***@127.0.0.1")
    else:
        assert info["catalog"] == str(settings.catalog_path)
    assert np.isfinite(info["catalog_bytes"])
