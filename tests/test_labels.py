"""Zero-shot labels (issue 6): sets, cached classifiers, assignment from stored vectors, presets, CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from clipsearch.cli import main
from clipsearch.errors import ConfigError, EmptyLibraryError, QueryError

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


@pytest.fixture
def catalog(photo_library, settings):
    from clipsearch.library import Library

    library = Library(settings)
    yield library.catalog
    library.close()


def names_of(catalog, set_name, label):
    from clipsearch.search.label_sets import label_photos

    return sorted(p["path"].rsplit("/", 1)[-1].split(".")[0] for p in label_photos(catalog, set_name, label, k=None))


def test_a_red_label_collects_the_red_images(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_set

    add_label(catalog, "colours", "red")
    add_label(catalog, "colours", "blue")
    report = apply_set(catalog, "colours", fake_encoder)
    assert names_of(catalog, "colours", "red") == ["red1", "red2", "red3"]
    assert names_of(catalog, "colours", "blue") == ["blue1", "blue2"]
    assert report.images == 12 and report.assigned == {"red": 3, "blue": 2}


def test_a_set_leaves_unrelated_photos_with_no_label(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label, labels_of
    from clipsearch.search.labels import apply_set

    for colour in ("red", "blue", "green"):
        add_label(catalog, "rgb", colour)
    report = apply_set(catalog, "rgb", fake_encoder)
    assert names_of(catalog, "rgb", "green") == ["green1"]
    assert report.unlabelled == 12 - 6
    by_path = {row.path.rsplit("/", 1)[-1].split(".")[0]: row.id for row in _images(catalog)}
    for name in ("yellow1", "grey1", "white1", "black1", "purple1", "cyan1"):
        assert labels_of(catalog, by_path[name]) == [], name  # "none of these"
    (only,) = labels_of(catalog, by_path["red1"])
    assert only["label"] == "red" and only["set"] == "rgb" and 0.5 <= only["probability"] <= 1.0


def _images(catalog):
    from sqlalchemy import select

    from clipsearch.catalog import ImageRow

    with catalog.read() as session:
        return list(session.scalars(select(ImageRow)))


def test_photos_can_hold_labels_of_several_sets(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_all

    add_label(catalog, "warm", "red")
    add_label(catalog, "bright", "red", prompts=["red things"])
    add_label(catalog, "bright", "yellow")
    apply_all(catalog, fake_encoder)
    assert names_of(catalog, "warm", "red") == names_of(catalog, "bright", "red") == ["red1", "red2", "red3"]
    assert names_of(catalog, "bright", "yellow") == ["yellow1"]


def test_prompts_override_the_name(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_set

    add_label(catalog, "s", "warm colour", prompts=["a red photo", "something red"])
    add_label(catalog, "s", "sky", prompts=["a blue photo"])
    apply_set(catalog, "s", fake_encoder)
    assert names_of(catalog, "s", "warm colour") == ["red1", "red2", "red3"]
    assert names_of(catalog, "s", "sky") == ["blue1", "blue2"]


def test_prompt_with_braces_takes_the_name(catalog, fake_encoder):
    from clipsearch.search.label_sets import LabelSpec
    from clipsearch.search.labels import label_texts

    assert label_texts(LabelSpec("red", ["a {} car", "plain"]), None) == ["a red car", "plain"]
    assert label_texts(LabelSpec("red"), ["x {} y"]) == ["x red y"]
    assert len(label_texts(LabelSpec("red"), None)) > 5  # the default CLIP templates


def test_classifier_cache_hits_and_invalidates(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_set

    add_label(catalog, "s", "red")
    add_label(catalog, "s", "blue", prompts=["a blue thing"])
    first = apply_set(catalog, "s", fake_encoder)
    assert first.encoded_labels == 2
    encoded = fake_encoder.texts_encoded
    again = apply_set(catalog, "s", lambda: pytest.fail("no encoder should be loaded on a cache hit"))
    assert again.encoded_labels == 0 and fake_encoder.texts_encoded == encoded
    add_label(catalog, "s", "blue", prompts=["a blue thing", "blue"])  # prompt change: only blue recomputed
    assert apply_set(catalog, "s", fake_encoder).encoded_labels == 1
    assert fake_encoder.texts_encoded == encoded + 2
    add_label(catalog, "s", "red", templates=["a {} photo."])  # template change: red (no prompts) recomputed
    assert apply_set(catalog, "s", fake_encoder).encoded_labels == 1
    add_label(catalog, "s", "red", threshold=0.6)  # threshold change: nothing to encode
    assert apply_set(catalog, "s", fake_encoder).encoded_labels == 0


def test_classifier_is_recomputed_for_another_model(catalog, fake_encoder):
    from clipsearch.search.label_sets import LabelSet, add_label, label_sets
    from clipsearch.search.labels import set_classifier

    add_label(catalog, "s", "red")
    (label_set,) = label_sets(catalog, "s")
    set_classifier(catalog, label_set, "test-colors/v1", fake_encoder)
    fake_encoder.model_id = "test-colors/v2"
    assert set_classifier(catalog, label_set, "test-colors/v2", fake_encoder).encoded == 1
    assert set_classifier(catalog, label_set, "test-colors/v1", None).encoded == 0
    with pytest.raises(ConfigError):
        set_classifier(catalog, LabelSet("empty"), "test-colors/v1", fake_encoder)


def test_reapplying_replaces_old_assignments(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label, remove
    from clipsearch.search.labels import apply_set

    add_label(catalog, "s", "red")
    add_label(catalog, "s", "blue")
    apply_set(catalog, "s", fake_encoder)
    add_label(catalog, "s", "red", prompts=["a green photo"])  # red now means green
    apply_set(catalog, "s", fake_encoder)
    assert names_of(catalog, "s", "red") == ["green1"]
    remove(catalog, "s", "blue")
    with pytest.raises(QueryError):
        names_of(catalog, "s", "blue")
    remove(catalog, "s")
    with pytest.raises(QueryError):
        names_of(catalog, "s", "red")


def test_thresholds_allow_several_labels_of_a_set_or_none(catalog, fake_encoder):
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_set

    # Two labels meaning the same thing split a red photo's probability about evenly.
    add_label(catalog, "s", "red", threshold=0.4)
    add_label(catalog, "s", "scarlet", prompts=["a red photo"], threshold=0.4)
    add_label(catalog, "s", "blue")
    apply_set(catalog, "s", fake_encoder)
    assert names_of(catalog, "s", "red") == names_of(catalog, "s", "scarlet") == ["red1", "red2", "red3"]
    add_label(catalog, "s", "red", threshold=0.6)
    add_label(catalog, "s", "scarlet", threshold=0.6)
    apply_set(catalog, "s", fake_encoder)
    assert names_of(catalog, "s", "red") == names_of(catalog, "s", "scarlet") == []
    assert names_of(catalog, "s", "blue") == ["blue1", "blue2"]
    with pytest.raises(ConfigError):
        add_label(catalog, "s", "red", threshold=1.5)


def test_deleted_images_drop_their_assignments(catalog, fake_encoder, photo_library, settings):
    from clipsearch.indexer.run import index_folders
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_set

    add_label(catalog, "s", "red")
    add_label(catalog, "s", "blue")
    apply_set(catalog, "s", fake_encoder)
    photo_library["home/red1.png"].unlink()
    index_folders(settings, [photo_library["home/red1.png"].parents[1]], encoder=fake_encoder)
    assert names_of(catalog, "s", "red") == ["red2", "red3"]


def test_apply_new_labels_new_photos_with_cached_classifiers(catalog, fake_encoder, photo_library, settings, tmp_path):
    from clipsearch.indexer.run import index_folders
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_new, apply_set
    from tests.fakes import make_image

    add_label(catalog, "s", "red")
    add_label(catalog, "s", "blue")
    before = {row.id for row in _images(catalog)}
    assert apply_new(catalog, sorted(before)) == {}  # never applied: waits for a full apply
    apply_set(catalog, "s", fake_encoder)
    make_image(tmp_path / "photos" / "home" / "red9.png", "red", noise=99)
    make_image(tmp_path / "photos" / "home" / "green9.png", "green", noise=98)
    index_folders(settings, [tmp_path / "photos"], encoder=fake_encoder)
    # The indexer labels what it embeds: no `labels apply` needed for new photos.
    assert names_of(catalog, "s", "red") == ["red1", "red2", "red3", "red9"]
    assert "green9" not in names_of(catalog, "s", "blue")
    new = sorted({row.id for row in _images(catalog)} - before)
    assert apply_new(catalog, new) == {"s": 1}  # idempotent: replaces the same assignments
    assert names_of(catalog, "s", "red") == ["red1", "red2", "red3", "red9"]


def test_empty_library_and_unknown_names(settings, fake_encoder):
    from clipsearch.library import Library
    from clipsearch.search.label_sets import add_label, label_photos, label_sets
    from clipsearch.search.labels import apply_set

    library = Library(settings)
    try:
        catalog = library.catalog
        add_label(catalog, "s", "red")
        with pytest.raises(EmptyLibraryError):
            apply_set(catalog, "s", fake_encoder)
        with pytest.raises(QueryError):
            label_sets(catalog, "nope")
        with pytest.raises(QueryError):
            label_photos(catalog, "s", "nope")
        with pytest.raises(ConfigError):
            add_label(catalog, "s", "  ")
    finally:
        library.close()


def test_presets_load_and_install(catalog):
    from clipsearch.search.label_sets import install_preset, label_sets, presets

    shipped = presets()
    assert {"scenes", "objects", "documents", "pets"} <= set(shipped)
    for set_name, preset in shipped.items():
        names = [label["name"] for label in preset["labels"]]
        assert names and all(n.strip() for n in names) and len(set(names)) == len(names), set_name
        for label in preset["labels"]:
            assert all(p.strip() for p in label.get("prompts", [])), label
    assert install_preset(catalog, "pets")["pets"] == len(shipped["pets"]["labels"])
    assert install_preset(catalog, "all")["pets"] == 0  # idempotent: labels already there (maybe edited) are kept
    assert {s.name for s in label_sets(catalog)} == set(shipped)
    with pytest.raises(ConfigError):
        install_preset(catalog, "nope")


def test_logit_scale_of_models():
    import math

    from clipsearch.search.labels import DEFAULT_LOGIT_SCALE, logit_scale_of

    class Raw:
        logit_scale = math.log(50.0)

    class Model:
        model = Raw()

    assert logit_scale_of(object()) == DEFAULT_LOGIT_SCALE
    assert abs(logit_scale_of(Model()) - 50.0) < 1e-6
    assert logit_scale_of(type("E", (), {"logit_scale": 1e9})()) == DEFAULT_LOGIT_SCALE


def labels_cli(settings):
    """run(*args, code=0): `clipsearch labels ARGS` on the test library with the fake encoder; asserts the exit code."""
    from tests.fakes import register_fake_encoder

    register_fake_encoder()
    env = {"CLIPSEARCH_DATA_DIR": str(settings.data_dir), "CLIPSEARCH_MODEL": "test-colors", "CLIPSEARCH_PRETRAINED": "v1",
           "CLIPSEARCH_DB": settings.db}  # None leaves it unset
    runner = CliRunner()

    def run(*args, code=0):
        result = runner.invoke(main, ["labels", *args], env=env)
        assert result.exit_code == code, result.output
        return result.output

    return run


def test_cli_round_trip(photo_library, settings):
    run = labels_cli(settings)
    run("add", "colours", "red")
    run("add", "colours", "blue", "--prompt", "a blue photo", "--threshold", "0.4")
    run("add", "--preset", "pets")
    assert "give a SET and a LABEL" in run("add", "colours", code=2)
    out = run("apply", "colours")
    assert "colours" in out and "red 3" in out
    listing = json.loads(run("list", "--json"))
    colours = next(s for s in listing if s["name"] == "colours")
    assert {l["name"]: l["photos"] for l in colours["labels"]} == {"red": 3, "blue": 2}
    assert any(s["name"] == "pets" for s in listing)
    shown = json.loads(run("show", "colours", "red", "--json", "-k", "2"))
    assert len(shown) == 2 and all("red" in hit["path"] for hit in shown)
    assert "red1" in run("show", "colours", "red")
    assert "blue" in run("show", "colours")
    assert "no label set" in run("show", "nope", code=2)
    run("remove", "colours", "blue")
    assert "blue" not in run("show", "colours")
    run("remove", "pets")
    assert "pets" not in run("list")


def test_cli_apply_on_empty_library(settings):
    run = labels_cli(settings)
    run("add", "s", "red")
    assert "no images" in run("apply", code=1)


def test_labels_help_does_not_import_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from clipsearch.cli import main\n"
        "for args in (['labels', '--help'], ['labels', 'apply', '--help'], ['labels', 'add', '--help']):\n"
        "    try:\n"
        "        main(args=args, prog_name='clipsearch')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'faiss', 'sqlalchemy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_reembedding_relabels_the_library_with_the_new_model(catalog, fake_encoder, photo_library, settings):
    from clipsearch.encoders import EncoderSpec
    from clipsearch.indexer.run import index_folders
    from clipsearch.label_tables import LabelCalibrationRow
    from clipsearch.search.label_sets import add_label
    from clipsearch.search.labels import apply_set
    from tests.fakes import ColorWordEncoder

    add_label(catalog, "s", "red")
    add_label(catalog, "s", "blue")
    apply_set(catalog, "s", fake_encoder)
    new_model = ColorWordEncoder(EncoderSpec("test-colors", "v2"))
    index_folders(settings, [photo_library["home/red1.png"].parents[1]], reembed=True, encoder=new_model)
    assert catalog.library_model()["model_id"] == "test-colors/v2"
    with catalog.read() as session:
        models = set(session.scalars(select(LabelCalibrationRow.model)))
    assert "test-colors/v2" in models
    assert names_of(catalog, "s", "red") == ["red1", "red2", "red3"]
    assert names_of(catalog, "s", "blue") == ["blue1", "blue2"]


def test_indexing_applies_sets_never_applied(catalog, fake_encoder, photo_library, settings):
    from clipsearch.indexer.run import index_folders
    from clipsearch.search.label_sets import add_label

    add_label(catalog, "s", "red")
    add_label(catalog, "s", "blue")
    assert names_of(catalog, "s", "red") == []
    index_folders(settings, [photo_library["home/red1.png"].parents[1]], encoder=fake_encoder)
    assert names_of(catalog, "s", "red") == ["red1", "red2", "red3"]
