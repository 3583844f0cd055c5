"""Indexing while the model loads: walk and decode go ahead, nothing-to-do runs never wait, errors still surface."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from clipsearch.encoders import EncoderSpec
from clipsearch.encoders.background import BackgroundEncoder, image_size_hint
from clipsearch.errors import WeightsUnavailableError
from clipsearch.images import open_image
from clipsearch.indexer import run as indexer_run
from clipsearch.indexer.run import LOAD_AHEAD_IMAGES, index_folders
from clipsearch.library import Library
from tests.fakes import ColorWordEncoder, make_image

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "cyan", "magenta")


def photos_in(folder: Path, names=COLOURS) -> Path:
    for name in names:
        make_image(folder / f"{name}.jpg", name, size=(320, 240))
    return folder


def stored_vectors(settings) -> dict[str, np.ndarray]:
    library = Library(settings)
    try:
        catalog = library.catalog
        ids = {row.id: Path(row.path).name for row in catalog.known_under([str(r.path) for r in catalog.roots()]).values()}
        vectors = {}
        for chunk_ids, chunk in catalog.vector_chunks(catalog.library_model()["model_id"], 1000):
            vectors.update({ids[int(i)]: v for i, v in zip(chunk_ids, chunk)})
        return vectors
    finally:
        library.close()


def held_loader(release: threading.Event, loaded: list, error: Exception | None = None, timeout: float = 30.0):
    """A loader that returns the fake encoder only once `release` is set (or fails with `error`)."""

    def load():
        if not release.wait(timeout):
            raise AssertionError("the loader was never released")
        if error is not None:
            raise error
        encoder = ColorWordEncoder()
        loaded.append(encoder)
        return encoder

    return load


def loading(load, hint: int | None = 32) -> BackgroundEncoder:
    source = BackgroundEncoder(None, load, model_id="test-colors/v1")
    source.image_size_hint = hint
    return source


def test_photos_are_decoded_while_the_model_loads(tmp_path, settings, monkeypatch):
    photos = photos_in(tmp_path / "photos")
    decoded, release, loaded = [], threading.Event(), []
    real_prepare = indexer_run.prepare

    def counting_prepare(candidate, preprocess, **kwargs):
        outcome = real_prepare(candidate, preprocess, **kwargs)
        decoded.append(preprocess is None)  # True: decoded before the model was there
        if len(decoded) == len(COLOURS):
            release.set()  # every photo decoded: now let the model arrive
        return outcome

    monkeypatch.setattr(indexer_run, "prepare", counting_prepare)
    assert len(COLOURS) <= LOAD_AHEAD_IMAGES
    report = index_folders(settings, [photos], encoder=loading(held_loader(release, loaded)))
    assert report.embedded == len(COLOURS) and all(decoded)
    assert loaded[0].images_embedded == len(COLOURS)
    assert report.vectors == len(COLOURS)


@pytest.mark.parametrize("hint", [32, 8])  # 8 < the model's 32: photos decoded that small are decoded again at 32
def test_vectors_equal_those_of_a_loaded_model_even_when_the_size_guess_is_too_small(tmp_path, settings, hint):
    photos = photos_in(tmp_path / "photos")
    reference = ColorWordEncoder()  # what a run with the model already loaded embeds (prepare's decode at 32)
    expected = {
        path.name: reference.encode_images([reference.preprocess(
            open_image(path, max_pixels=settings.max_image_pixels, target_size=reference.image_size)[0])])[0]
        for path in sorted(photos.iterdir())
    }
    release, loaded = threading.Event(), []
    release.set()
    report = index_folders(settings, [photos], encoder=loading(held_loader(release, loaded), hint=hint))
    assert report.embedded == len(COLOURS)
    got = stored_vectors(settings)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6)


def test_a_run_with_nothing_to_embed_never_waits_for_the_model(tmp_path, settings, fake_encoder):
    photos = photos_in(tmp_path / "photos")
    index_folders(settings, [photos], encoder=fake_encoder)
    make_image(photos / "broken.jpg", "red").write_bytes(b"not a jpeg")  # new, but fails without the model
    release, loaded = threading.Event(), []  # never released: waiting would time out and fail the test
    report = index_folders(settings, [photos], encoder=loading(held_loader(release, loaded, timeout=10)))
    assert (report.embedded, report.unchanged, len(report.failed)) == (0, len(COLOURS), 1)
    assert loaded == []
    release.set()


def test_a_new_library_records_its_model_even_without_photos(tmp_path, settings):
    empty = tmp_path / "empty"
    empty.mkdir()
    release, loaded = threading.Event(), []
    threading.Timer(0.2, release.set).start()
    index_folders(settings, [empty], encoder=loading(held_loader(release, loaded)))
    library = Library(settings)
    try:
        assert library.catalog.library_model()["model_id"] == "test-colors/v1"
    finally:
        library.close()


def test_a_model_that_cannot_load_fails_the_run_with_its_own_message(tmp_path, settings):
    photos = photos_in(tmp_path / "photos")
    release, loaded = threading.Event(), []
    release.set()
    error = WeightsUnavailableError("cannot get the weights", "download them")
    with pytest.raises(WeightsUnavailableError, match="cannot get the weights"):
        index_folders(settings, [photos], encoder=loading(held_loader(release, loaded, error=error)))


def test_stop_while_waiting_for_the_model_ends_the_run_as_interrupted(tmp_path, settings):
    photos = photos_in(tmp_path / "photos", COLOURS * 1)
    release, loaded, stop = threading.Event(), [], threading.Event()
    threading.Timer(0.3, stop.set).start()
    report = index_folders(settings, [photos], encoder=loading(held_loader(release, loaded, timeout=20), hint=None),
                           stop=stop)
    assert report.interrupted and report.embedded == 0
    release.set()


def test_the_model_id_a_loader_gives_must_match(tmp_path, settings):
    photos = photos_in(tmp_path / "photos")
    source = BackgroundEncoder(None, lambda: ColorWordEncoder(EncoderSpec("test-colors", "v2")), model_id="test-colors/v1")
    source.image_size_hint = 32
    with pytest.raises(Exception, match="calls itself test-colors/v2"):
        index_folders(settings, [photos], encoder=source)


# --- the image size known before loading -----------------------------------------------------------------
def test_image_size_hint_reads_configs_without_importing_open_clip(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"vision_cfg": {"image_size": 256}}, "preprocess_cfg": {"size": [240, 320]}}))
    code = (
        "import json, sys; from clipsearch.encoders import EncoderSpec; "
        "from clipsearch.encoders.background import image_size_hint as h; "
        f"print(json.dumps([h(EncoderSpec('ViT-B-32', 'laion2b_s34b_b79k')), h(EncoderSpec('ViT-L-14-336', 'openai')), "
        f"h(EncoderSpec('clipsearch-tiny', 'none')), h(EncoderSpec('local-dir:{folder}', '')), "
        f"h(EncoderSpec('ViT-B-32', '{folder}')), h(EncoderSpec('hf-hub:org/repo', '')), "
        "h(EncoderSpec('no-such-model', 'none')), 'open_clip' in sys.modules, 'torch' in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tiny = json.loads((Path(__file__).resolve().parents[1] / "clipsearch/model_configs/clipsearch-tiny.json").read_text())
    assert json.loads(result.stdout) == [224, 336, tiny["vision_cfg"]["image_size"], 320, 320, None, None, False, False]


def test_image_size_hint_matches_the_loaded_model(tmp_path):
    from clipsearch.encoders import load_encoder

    spec = EncoderSpec("clipsearch-tiny", "none", "cpu", "fp32", tmp_path)
    assert image_size_hint(spec) == load_encoder(spec).image_size


@pytest.mark.parametrize("device, expected", [("cpu", 8), ("cuda", 32), ("cuda:1", 32)])
def test_decoding_pool_grows_when_a_gpu_runs_the_model(tmp_path, settings, monkeypatch, device, expected):
    from dataclasses import replace

    from clipsearch import config

    sizes = []
    real_pool = indexer_run.ThreadPoolExecutor

    def recording_pool(max_workers, **kwargs):
        sizes.append(max_workers)
        return real_pool(max_workers=2, **kwargs)

    monkeypatch.setattr(indexer_run, "ThreadPoolExecutor", recording_pool)
    monkeypatch.setattr(config.os, "cpu_count", lambda: 48)
    encoder = ColorWordEncoder()
    encoder.device = device
    report = index_folders(replace(settings, workers=0), [photos_in(tmp_path / "photos", COLOURS[:3])], encoder=encoder)
    assert report.embedded == 3 and sizes == [expected]


def test_a_loading_model_is_expected_on_the_gpu_it_will_use(tmp_path, settings, monkeypatch):
    from clipsearch.encoders import openvino as ov_runtime

    spec = EncoderSpec("ViT-B-32", "none", device="auto", runtime="auto")
    held = threading.Event()
    source = BackgroundEncoder(spec, loader=lambda: held.wait(30) and ColorWordEncoder())
    indexer = indexer_run.Indexer(Library(settings), source)
    try:
        monkeypatch.setattr(indexer_run, "model_may_run_on_gpu", lambda device: device in ("auto", "cuda"))
        monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: True)
        assert indexer._model_on_gpu() is True  # auto with a GPU here: torch, on the GPU
        source.spec = EncoderSpec("ViT-B-32", "none", device="cpu", runtime="auto")
        assert indexer._model_on_gpu() is False
        source.spec = EncoderSpec("ViT-B-32", "none", device="cuda", runtime="openvino")
        assert indexer._model_on_gpu() is False  # a refused runtime is reported by the load, not here
    finally:
        held.set()
        indexer.library.close()
