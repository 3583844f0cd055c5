"""End-to-end search semantics with the fake colour encoder: index generated images, query, rank."""

from __future__ import annotations

import pytest

from clipsearch.errors import EmptyLibraryError, QueryError
from clipsearch.indexer.run import index_folders
from clipsearch.library import Library
from clipsearch.search.searcher import Searcher
from tests.fakes import COLOR_NAMES, make_image

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


@pytest.fixture
def indexed(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    paths = {name: make_image(photos / f"{name}.jpg", name) for name in COLOR_NAMES}
    index_folders(settings, [photos], encoder=fake_encoder)
    library = Library(settings)
    yield Searcher(library, fake_encoder), paths
    library.close()


@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow", "black", "purple"])
def test_text_query_ranks_matching_colour_first(indexed, colour):
    searcher, paths = indexed
    hits = searcher.search_text(f"a {colour} photo", k=3)
    assert hits[0].path == str(paths[colour])
    assert len(hits) == 3 and hits[0].score > hits[1].score >= hits[2].score


def test_scores_are_cosine_similarities(indexed):
    searcher, _ = indexed
    hits = searcher.search_text("red", k=len(COLOR_NAMES))
    assert len(hits) == len(COLOR_NAMES)
    assert all(-1.0001 <= h.score <= 1.0001 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_image_query_and_more_like_this(indexed, tmp_path):
    searcher, paths = indexed
    query = make_image(tmp_path / "query.png", (225, 25, 30), size=(20, 20))
    assert searcher.search_image(query, k=1)[0].path == str(paths["red"])
    assert searcher.search_image(query.read_bytes(), k=1)[0].path == str(paths["red"])
    like = searcher.search_like(paths["orange"], k=3)
    assert str(paths["orange"]) not in [h.path for h in like]  # never itself
    assert like[0].path in (str(paths["red"]), str(paths["yellow"]))
    by_id = searcher.search_like(searcher.resolve_image_id(paths["orange"]), k=3)
    assert [h.id for h in by_id] == [h.id for h in like]


def test_bad_queries_are_clear(indexed, tmp_path):
    searcher, _ = indexed
    with pytest.raises(QueryError, match="empty"):
        searcher.search_text("   ", k=5)
    with pytest.raises(QueryError, match="not in the library"):
        searcher.search_like(tmp_path / "nowhere.jpg", k=5)
    with pytest.raises(QueryError, match="no image with id"):
        searcher.search_like(99999, k=5)
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(QueryError, match="not an image"):
        searcher.search_image(tmp_path / "bad.jpg", k=5)
    with pytest.raises(QueryError, match="k must be positive"):
        searcher.search_text("red", k=0)


def test_empty_library(settings, fake_encoder):
    library = Library(settings)
    with pytest.raises(EmptyLibraryError, match="clipsearch index"):
        Searcher(library, fake_encoder).search_text("red", k=5)
    library.close()


def test_searcher_sees_changes_made_by_another_indexer(tmp_path, settings, fake_encoder, indexed):
    searcher, paths = indexed
    assert searcher.search_text("red", k=1)[0].path == str(paths["red"])
    paths["red"].unlink()
    index_folders(settings, [tmp_path / "photos"], encoder=fake_encoder)
    assert str(paths["red"]) not in [h.path for h in searcher.search_text("red", k=20)]


def test_searcher_follows_a_reembed_by_another_process(tmp_path, settings, fake_encoder, indexed):
    from dataclasses import replace

    from clipsearch.config import with_overrides

    _, paths = indexed
    library = Library(replace(settings, explicit=frozenset({"data_dir"})))  # a server started without --model
    searcher = Searcher(library)
    assert searcher.search_text("green", k=1)[0].path == str(paths["green"])
    assert searcher.encoder.model_id == "test-colors/v1"
    index_folders(with_overrides(settings, pretrained="v2"), [tmp_path / "photos"], reembed=True)
    assert searcher.search_text("green", k=1)[0].path == str(paths["green"])
    assert searcher.encoder.model_id == "test-colors/v2"
    library.close()


def test_injected_encoder_of_another_model_is_refused(settings, indexed):
    from clipsearch.errors import ModelMismatchError
    from tests.fakes import ColorWordEncoder, EncoderSpec

    searcher, _ = indexed
    other = ColorWordEncoder(EncoderSpec("test-colors", "v7"))
    with pytest.raises(ModelMismatchError):
        Searcher(searcher.library, other).search_text("red", k=1)


def test_searches_reuse_the_open_catalog(indexed, monkeypatch):
    import clipsearch.catalog_sql

    searcher, _ = indexed
    searcher.search_text("a red photo", k=1)
    opened = []
    monkeypatch.setattr(clipsearch.catalog_sql, "create_catalog_engine", lambda url: opened.append(url))
    for _ in range(3):  # a new engine per search costs a PostgreSQL log-in each time (4x slower searches under load)
        searcher.search_text("a red photo", k=1)
    assert opened == []
