"""Label arithmetic against direct numpy computations, and reviews (confirm/reject) teaching a label."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipsearch.errors import QueryError
from clipsearch.search import label_calibration as calib

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


# --- arithmetic -----------------------------------------------------------------------------------------
def test_softmax_within_set_matches_numpy():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-0.3, 0.5, (7, 4)).astype(np.float32)
    expected = np.exp(73.0 * sims.astype(np.float64))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.allclose(calib.softmax_within_set(sims, 73.0), expected, atol=1e-6)


def test_robust_stats_are_median_and_scaled_mad():
    rng = np.random.default_rng(1)
    sample = np.column_stack([rng.normal(0.2, 0.03, 501), np.full(501, 0.4)])
    median, spread = calib.robust_stats(sample)
    assert np.allclose(median, np.median(sample, axis=0))
    assert spread[0] == pytest.approx(1.4826 * np.median(np.abs(sample[:, 0] - np.median(sample[:, 0]))))
    assert spread[1] == calib.MIN_SPREAD  # a constant column keeps a floor, not a division by zero


def test_strengths_blend_standardised_text_and_prototype_parts():
    text = np.array([[0.30, 0.10], [0.20, 0.25]])
    proto = np.array([[0.0, 0.9], [0.0, 0.5]])
    z = calib.strengths(text, np.array([0.2, 0.1]), np.array([0.05, 0.02]), proto, np.array([0.0, 0.6]),
                        np.array([1.0, 0.1]), np.array([0.0, 0.25]))
    assert z[0, 0] == pytest.approx((0.30 - 0.2) / 0.05)  # weight 0: text only, prototype ignored
    assert z[0, 1] == pytest.approx(0.75 * (0.10 - 0.1) / 0.02 + 0.25 * (0.9 - 0.6) / 0.1)
    assert z[1, 1] == pytest.approx(0.75 * (0.25 - 0.1) / 0.02 + 0.25 * (0.5 - 0.6) / 0.1, rel=1e-5)


def test_prototype_and_its_weight():
    vectors = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    assert np.allclose(calib.prototype(vectors), [2 ** -0.5, 2 ** -0.5, 0])
    assert calib.prototype(np.zeros((0, 3))) is None
    weights = [calib.prototype_weight(n) for n in (0, 1, 4, 100)]
    assert weights[0] == 0 and weights[1] == pytest.approx(1 / 5) and weights[2] == pytest.approx(0.5)
    assert weights[3] == calib.MAX_PROTOTYPE_WEIGHT


def test_tune_cutoff_hand_computed_cases():
    assert calib.tune_cutoff([], []) == calib.DEFAULT_CUTOFF
    assert calib.tune_cutoff([5, 6], [1, 2]) == 3.0  # the default already separates them
    assert calib.tune_cutoff([], [4.0]) == pytest.approx((4.25 + 3 * 3.0) / 4)  # one rejection: a quarter of the way
    assert calib.tune_cutoff([1.0], []) == pytest.approx((0.75 + 3 * 3.0) / 4)
    # Both kinds: every cutoff in (1.0, 2.0] is right; the one nearest the default is 2.0 - margin.
    assert calib.tune_cutoff([2.0, 2.2], [1.0]) == pytest.approx((3 * 1.95 + 3 * 3.0) / 6)
    # Inseparable (a confirmed photo weaker than a rejected one): one mistake whatever; the default stays.
    assert calib.tune_cutoff([1.0], [2.0]) == pytest.approx(3.0)


def test_precision_estimate_is_a_wilson_interval():
    assert calib.precision_estimate(0, 0) is None
    estimate = calib.precision_estimate(4, 1)
    assert estimate["precision"] == 0.8 and estimate["reviewed"] == 5
    assert estimate["low"] == pytest.approx(0.3755, abs=1e-4) and estimate["high"] == pytest.approx(0.9638, abs=1e-4)
    assert calib.precision_estimate(3, 0)["high"] == 1.0


# --- reviews on a library ---------------------------------------------------------------------------------
@pytest.fixture
def catalog(photo_library, settings):
    from clipsearch.library import Library

    library = Library(settings)
    yield library.catalog
    library.close()


def _members(catalog, label="red"):
    from clipsearch.search.label_sets import label_photos

    return {p["path"].rsplit("/", 1)[-1].split(".")[0]: p for p in label_photos(catalog, "s", label, k=None)}


def _id_of(catalog, stem):
    from clipsearch.catalog import ImageRow

    with catalog.read() as session:
        return next(row.id for row in session.query(ImageRow) if row.path.rsplit("/", 1)[-1].startswith(stem + "."))


@pytest.fixture
def colours(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_set

    add_label(catalog, "s", "red")
    add_label(catalog, "s", "blue")
    apply_set(catalog, "s", fake_encoder)
    return catalog


def test_rejecting_a_member_drops_it_and_raises_the_cutoff(colours):
    from clipsearch.search.label_feedback import label_quality, review, reviewed_photos

    before = _members(colours)
    assert sorted(before) == ["red1", "red2", "red3"]
    weakest = min(before, key=lambda name: before[name]["strength"])
    strongest = max(before, key=lambda name: before[name]["strength"])
    review(colours, "s", "red", before[weakest]["id"], "reject")
    after = _members(colours)
    assert weakest not in after and strongest in after
    quality = label_quality(colours, "s", "red")
    assert quality["cutoff"] > calib.DEFAULT_CUTOFF
    assert quality["precision"]["precision"] == 0.0 and quality["rejected"] == 1
    assert [p["id"] for p in reviewed_photos(colours, "s", "red", "reject")] == [before[weakest]["id"]]
    review(colours, "s", "red", before[weakest]["id"], None)  # withdrawn: back to the zero-shot labels
    assert sorted(_members(colours)) == ["red1", "red2", "red3"]
    assert label_quality(colours, "s", "red")["cutoff"] == calib.DEFAULT_CUTOFF


def test_confirming_a_photo_pins_it_and_blends_its_prototype_in(colours):
    from clipsearch.search.label_feedback import label_quality, review

    purple = _id_of(colours, "purple1")
    assert "purple1" not in _members(colours)
    review(colours, "s", "red", purple, "confirm")
    members = _members(colours)
    assert members["purple1"]["confirmed"] and members["purple1"]["verdict"] == "confirm"
    assert {"red1", "red2", "red3"} <= set(members)
    quality = label_quality(colours, "s", "red")
    assert quality["prototype_weight"] == pytest.approx(calib.prototype_weight(1))
    assert quality["precision"]["precision"] == 1.0
    # The confirmed photo's neighbours gain strength through the prototype; unrelated labels are untouched.
    assert sorted(_members(colours, "blue")) == ["blue1", "blue2"]


def test_reviews_move_the_label_and_the_estimate_together(colours):
    from clipsearch.search.label_feedback import label_quality, review

    members = _members(colours)
    review(colours, "s", "red", members["red1"]["id"], "confirm")
    review(colours, "s", "red", members["red3"]["id"], "confirm")
    assert label_quality(colours, "s", "red")["precision"]["precision"] == 1.0
    review(colours, "s", "red", members["red2"]["id"], "reject")
    quality = label_quality(colours, "s", "red")
    assert quality["precision"]["precision"] == pytest.approx(2 / 3, abs=1e-3)
    assert quality["confirmed"] == 2 and quality["rejected"] == 1
    assert sorted(_members(colours)) == ["red1", "red3"]


def test_new_photos_are_scored_with_the_reviewed_calibration(colours, settings, tmp_path, fake_encoder):
    from clipsearch.indexer.run import index_folders
    from clipsearch.search.label_feedback import review
    from tests.fakes import make_image

    members = _members(colours)
    review(colours, "s", "red", members["red1"]["id"], "confirm")
    make_image(tmp_path / "photos" / "home" / "red9.png", "red", noise=99)
    index_folders(settings, [tmp_path / "photos"], encoder=fake_encoder)
    assert "red9" in _members(colours)


def test_review_errors(colours):
    from clipsearch.search.label_feedback import review

    with pytest.raises(QueryError):
        review(colours, "s", "red", 1, "maybe")
    with pytest.raises(QueryError):
        review(colours, "s", "nope", 1, "confirm")
    with pytest.raises(QueryError):
        review(colours, "s", "red", 999_999, "confirm")


def test_cli_review(photo_library, settings):
    from tests.test_labels import labels_cli

    run = labels_cli(settings)
    run("add", "s", "red")
    run("add", "s", "blue")
    run("apply", "s")
    top = json.loads(run("show", "s", "red", "--json"))
    assert "precision about 100%" in run("review", "s", "red", str(top[0]["id"]), "--confirm")
    quality = json.loads(run("review", "s", "red", str(top[1]["id"]), "--reject", "--json"))
    assert quality["precision"]["precision"] == 0.5
    assert "give --confirm" in run("review", "s", "red", str(top[0]["id"]), code=2)
    assert "(confirmed)" in run("show", "s", "red")


def test_a_review_rescoring_one_label_equals_a_full_apply(colours):
    """The review fast path (candidates only) gives exactly what re-applying the whole set gives."""
    from clipsearch.label_tables import LabelCalibrationRow
    from clipsearch.search.label_feedback import review
    from clipsearch.search.labels import apply_set

    def state():
        members = {name: (p["id"], p["confirmed"], round(p["strength"], 3)) for name, p in _members(colours).items()}
        with colours.read() as session:
            rows = session.query(LabelCalibrationRow).order_by(LabelCalibrationRow.label_id).all()
            calibration = [(r.label_id, round(r.cutoff, 5), round(r.proto_weight, 5), round(r.proto_median, 5),
                            round(r.proto_spread, 5), r.prototype) for r in rows]
        return members, _members(colours, "blue"), calibration

    members = _members(colours)
    review(colours, "s", "red", members["red1"]["id"], "confirm")
    review(colours, "s", "red", _id_of(colours, "purple1"), "confirm")
    review(colours, "s", "red", members["red2"]["id"], "reject")
    fast = state()
    apply_set(colours, "s")
    assert state() == fast
