"""Searches with filters, date order, adaptive relevance cutoffs, paging and combined queries (fake colour encoder)."""

from __future__ import annotations

import os
from datetime import date

import numpy as np
import pytest

from clipsearch.errors import QueryError
from clipsearch.library import Library
from clipsearch.search.query import parse_query
from clipsearch.search.relevance import relevance_cutoff
from clipsearch.search.request import MAX_K, SearchFilters, SearchRequest
from clipsearch.search.searcher import Searcher

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


@pytest.fixture
def searcher(settings, fake_encoder, photo_library):
    library = Library(settings)
    yield Searcher(library, fake_encoder)
    library.close()


def names(hits):
    return [os.path.basename(hit.path) for hit in hits]


def test_relevance_order_pages_without_gaps_or_repeats(searcher):
    first = searcher.run(SearchRequest(parse_query("red"), k=5))
    second = searcher.run(SearchRequest(parse_query("red"), k=5, offset=5))
    everything = searcher.run(SearchRequest(parse_query("red"), k=20))
    assert names(first.hits) + names(second.hits) == names(everything.hits)[:10]
    assert set(names(first.hits)[:3]) == {"red1.png", "red2.jpg", "red3.jpg"}
    assert first.total == 12 and first.next_offset == 5
    assert everything.next_offset is None
    scores = [hit.score for hit in everything.hits]
    assert scores == sorted(scores, reverse=True)


def test_hits_carry_catalog_facts(searcher, photo_library):
    hit = searcher.run(SearchRequest(parse_query("red"), k=1)).hits[0]
    assert hit.width == 64 and hit.height == 48 and hit.format in ("PNG", "JPEG")
    assert hit.date is not None and hit.relevant is True
    data = hit.as_dict()
    assert {"id", "path", "score", "date", "width", "height", "format", "relevant"} <= set(data)


def test_folder_filter_keeps_only_that_folder(searcher, photo_library):
    trip = str(photo_library["trip/red3.jpg"].parent)
    result = searcher.run(SearchRequest(parse_query("red"), k=20, filters=SearchFilters(folder=trip)))
    assert names(result.hits)[0] == "red3.jpg"
    assert all(hit.path.startswith(trip + "/") for hit in result.hits)
    assert result.total == 8


def test_folder_filter_does_not_match_sibling_prefix(searcher, photo_library, tmp_path):
    home = str(photo_library["home/red1.png"].parent)
    result = searcher.run(SearchRequest(parse_query("red"), k=20, filters=SearchFilters(folder=home[:-1])))
    assert result.hits == []  # "/hom" is not a folder containing "/home/..."


def test_type_filter(searcher):
    result = searcher.run(SearchRequest(parse_query("red"), k=20, filters=SearchFilters.parse(formats="png")))
    assert result.hits and all(hit.format == "PNG" for hit in result.hits)
    assert names(result.hits)[0] == "red1.png"


def test_date_filter_uses_file_time_when_no_exif(searcher):
    # Files are dated 2020-09-13 + n days (n = position in the layout); red2.jpg is n=1, red3.jpg n=4.
    result = searcher.run(SearchRequest(parse_query("red"), k=20,
                                        filters=SearchFilters.parse(date_from="2020-09-14", date_to="2020-09-16")))
    assert sorted(names(result.hits)) == ["blue1.png", "green1.jpg", "red2.jpg"]


def test_date_order_keeps_relevant_results_only_and_sorts_them(searcher):
    newest = searcher.run(SearchRequest(parse_query("red"), k=20, sort="newest"))
    assert names(newest.hits) == ["red3.jpg", "red2.jpg", "red1.png"]
    assert newest.relevant == newest.total == 3
    oldest = searcher.run(SearchRequest(parse_query("red"), k=20, sort="oldest"))
    assert names(oldest.hits) == ["red1.png", "red2.jpg", "red3.jpg"]
    dates = [hit.date for hit in oldest.hits]
    assert dates == sorted(dates)


def test_relevance_strictness_loosens_and_tightens(searcher):
    counts = [searcher.run(SearchRequest(parse_query("red"), k=50, sort="newest", strictness=s)).relevant for s in (0.0, 3.0, 10.0)]
    assert counts[0] >= counts[1] >= counts[2]
    assert counts[0] > counts[1]  # at the median, about half the library counts


def test_cutoff_adapts_to_each_query(searcher):
    red = searcher.run(SearchRequest(parse_query("red"), k=1, sort="newest")).cutoff
    photo = searcher.run(SearchRequest(parse_query("a photo"), k=1, sort="newest")).cutoff
    assert red.threshold != photo.threshold


def test_combined_query_weights_and_negatives(searcher):
    mixed = searcher.run(SearchRequest(parse_query("red + blue"), k=5))
    assert set(names(mixed.hits)[:5]) == {"red1.png", "red2.jpg", "red3.jpg", "blue1.png", "blue2.jpg"}
    heavier_blue = searcher.run(SearchRequest(parse_query("red + 3:blue"), k=2))
    assert set(names(heavier_blue.hits)) == {"blue1.png", "blue2.jpg"}
    without_red = searcher.run(SearchRequest(parse_query("red + blue -red"), k=2))
    assert set(names(without_red.hits)) == {"blue1.png", "blue2.jpg"}


def test_like_term_excludes_the_image_itself(searcher, photo_library):
    red1 = searcher.resolve_image_id(photo_library["home/red1.png"])
    result = searcher.run(SearchRequest(parse_query(f"like:{red1}"), k=3))
    assert "red1.png" not in names(result.hits)
    assert set(names(result.hits)[:2]) == {"red2.jpg", "red3.jpg"}
    mixed = searcher.run(SearchRequest(parse_query(f"like:{red1} + 2:blue"), k=2))
    assert set(names(mixed.hits)) == {"blue1.png", "blue2.jpg"}


def test_unknown_like_id_is_a_query_error(searcher):
    with pytest.raises(QueryError, match="#99999"):
        searcher.run(SearchRequest(parse_query("like:99999"), k=3))


def test_upload_vector_combines_with_text(searcher, photo_library):
    vector = searcher.embed_image(photo_library["trip/yellow1.png"].read_bytes())
    result = searcher.run(SearchRequest(vectors=(vector,), k=1))
    assert names(result.hits) == ["yellow1.png"]
    with pytest.raises(QueryError, match="uploaded file"):
        searcher.embed_image(b"not an image at all")


@pytest.mark.parametrize("changes, message", [
    ({"k": 0}, "k must be"), ({"k": MAX_K + 1}, "k must be"), ({"offset": -1}, "offset"),
    ({"sort": "random"}, "unknown sort"), ({"strictness": 11.0}, "relevance"), ({"query": None}, "nothing to search"),
])
def test_bad_requests_are_query_errors(searcher, changes, message):
    request = SearchRequest(parse_query("red"), k=5)
    with pytest.raises(QueryError, match=message):
        searcher.run(SearchRequest(**{**request.__dict__, **changes}))


@pytest.mark.parametrize("kwargs, message", [
    ({"folder": "relative/path"}, "absolute"), ({"date_from": "yesterday"}, "not a date"),
    ({"date_from": "2024-02-01", "date_to": "2024-01-01"}, "empty"), ({"formats": "jp<eg"}, "format"),
])
def test_bad_filters(kwargs, message):
    with pytest.raises(QueryError, match=message):
        SearchFilters.parse(**kwargs)


def test_filters_parse_normalises():
    filters = SearchFilters.parse("/photos/trip/", "2024-01-01", "2024-01-31", "jpeg, png,,JPEG")
    assert filters.folder == "/photos/trip" and filters.formats == ("JPEG", "PNG")
    assert filters.date_from == date(2024, 1, 1) and filters.active
    start, end = filters.sql_range()
    assert (start.day, end.month, end.day) == (1, 2, 1)  # the end day is inclusive
    assert not SearchFilters.parse().active


def test_catalog_filter_options(settings, photo_library):
    catalog = Library(settings).catalog
    folders = dict(catalog.folders(depth=1))
    root = str(photo_library["home/red1.png"].parent.parent)
    assert folders[root] == 12 and folders[root + "/home"] == 4 and folders[root + "/trip"] == 8
    assert catalog.formats() == {"PNG": 7, "JPEG": 5}
    low, high = catalog.date_range()
    assert low.date() == date(2020, 9, 13) and (high - low).days == 11
    catalog.close()


def test_relevance_cutoff_reference():
    rng = np.random.default_rng(0)
    bulk = rng.normal(0.2, 0.02, 5000)
    scores = np.concatenate([bulk, np.full(20, 0.35)])
    cutoff = relevance_cutoff(scores, 3.0)
    # The few relevant scores barely move the robust estimates: close to the bulk's own mean and deviation.
    assert abs(cutoff.median - 0.2) < 0.003 and abs(cutoff.spread - 0.02) < 0.002
    assert 0.25 < cutoff.threshold < 0.27
    assert (scores > cutoff.threshold).sum() < 40
    assert relevance_cutoff(np.full(10, 0.5)).threshold > 0.5  # no spread: only scores above the pack count
    assert relevance_cutoff(np.array([])).threshold == float("-inf")


def test_filter_results_follow_new_photos(searcher, settings, photo_library, tmp_path):
    from clipsearch.indexer.run import index_folders
    from tests.fakes import ColorWordEncoder, make_image

    filters = SearchFilters.parse(formats="png")
    before = searcher.run(SearchRequest(parse_query("orange"), k=20, filters=filters))
    assert "orange1.png" not in names(before.hits)
    make_image(tmp_path / "photos" / "home" / "orange1.png", "orange")
    index_folders(settings, [tmp_path / "photos"], encoder=ColorWordEncoder())
    after = searcher.run(SearchRequest(parse_query("orange"), k=20, filters=filters))
    assert names(after.hits)[0] == "orange1.png" and after.total == before.total + 1


def test_folder_filter_follows_a_renamed_folder(searcher, settings, photo_library, tmp_path):
    from clipsearch.indexer.run import index_folders
    from tests.fakes import ColorWordEncoder

    trip = photo_library["trip/red3.jpg"].parent
    before = searcher.run(SearchRequest(parse_query("red"), k=20, filters=SearchFilters(folder=str(trip))))
    assert before.total == 8
    renamed = trip.with_name("holiday")
    trip.rename(renamed)
    encoder = ColorWordEncoder()
    index_folders(settings, [tmp_path / "photos"], encoder=encoder)
    assert encoder.images_embedded == 0  # moved, not re-embedded: no vector changed
    old = searcher.run(SearchRequest(parse_query("red"), k=20, filters=SearchFilters(folder=str(trip))))
    new = searcher.run(SearchRequest(parse_query("red"), k=20, filters=SearchFilters(folder=str(renamed))))
    assert old.total == 0 and new.total == 8 and names(new.hits)[0] == "red3.jpg"
    newest = searcher.run(SearchRequest(parse_query("red"), k=20, sort="newest"))
    assert names(newest.hits) == ["red3.jpg", "red2.jpg", "red1.png"]
