"""OpenVINO runtime: preprocessing identical to open_clip's, runtime choice, export cache, agreement with torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.config import load_settings
from clipsearch.encoders import EncoderSpec, built_model_folder, load_encoder
from clipsearch.encoders import openvino as ov_runtime
from clipsearch.encoders.openvino import ExportUnsupported, choose_runtime, check_preprocess_cfg, ir_cache_key
from clipsearch.encoders.openvino import preprocess_image
from clipsearch.errors import ConfigError
from clipsearch.images import open_image
from tests.test_encoders import TINY, make_images

needs_openvino = pytest.mark.skipif(not ov_runtime.openvino_installed(), reason="openvino is not installed here")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".tif", ".tiff", ".avif")


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def open_clip_transform(cfg: dict):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def cfg_for(resize_mode: str, interpolation: str, size: int = 224) -> dict:
    return {"size": size, "mode": "RGB", "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": interpolation,
            "resize_mode": resize_mode, "fill_color": 0}


def odd_images() -> list[Image.Image]:
    """Portrait, landscape, square, exactly the model size, smaller than it, and non-RGB modes."""
    rng = np.random.default_rng(7)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
           for h, w in ((300, 200), (201, 640), (224, 224), (224, 300), (50, 37), (1, 500), (333, 333))]
    grey = Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (80, 120, 4), dtype=np.uint8), "RGBA")
    return [*rgb, *make_images(4), grey, rgba, rgb[0].convert("CMYK"), rgb[1].convert("P")]


# --- preprocessing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocess_is_identical_to_open_clip(resize_mode, interpolation):
    pytest.importorskip("open_clip")
    cfg = cfg_for(resize_mode, interpolation)
    reference = open_clip_transform(cfg)
    for image in odd_images():
        expected = reference(image.convert("RGB")).numpy()  # OpenClipEncoder.preprocess converts first, as here
        got = preprocess_image(image, cfg)
        assert got.dtype == np.float32 and got.shape == (3, 224, 224)
        np.testing.assert_array_equal(got, expected, err_msg=f"{image.mode} {image.size}")


def test_preprocess_is_identical_on_the_camera_roll(shared_datasets):
    pytest.importorskip("open_clip")
    cfg = cfg_for("shortest", "bicubic")
    reference = open_clip_transform(cfg)
    files = sorted(p for p in (shared_datasets / "camera_roll").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    compared = 0
    for path in files:
        try:
            image, _ = open_image(path.read_bytes(), max_pixels=200_000_000, target_size=224)  # as indexing decodes
        except Exception:  # the camera roll holds deliberately broken files
            continue
        np.testing.assert_array_equal(preprocess_image(image, cfg), reference(image).numpy(), err_msg=str(path))
        compared += 1
    assert compared >= 100


@pytest.mark.parametrize("cfg, why", [
    ({**cfg_for("longest", "bicubic")}, "resize mode"),
    ({**cfg_for("shortest", "bicubic"), "size": (224, 256)}, "non-square"),
    ({**cfg_for("shortest", "bicubic"), "mean": (0.5,)}, "mean/std"),
])
def test_transforms_it_cannot_reproduce_are_refused(cfg, why):
    with pytest.raises(ExportUnsupported, match=why):
        check_preprocess_cfg(cfg)
    check_preprocess_cfg(cfg_for("squash", "bilinear", size=(256, 256)))  # square as a pair is fine


# --- runtime choice -----------------------------------------------------------------------------------------


@pytest.fixture
def x86_cpu_with_openvino(monkeypatch):
    monkeypatch.setattr(ov_runtime, "openvino_installed", lambda: True)
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: False)
    monkeypatch.setattr(ov_runtime.platform, "machine", lambda: "x86_64")


@pytest.mark.parametrize("changes, expected", [
    ({}, "openvino"),
    ({"device": "cpu", "precision": "bf16"}, "openvino"),
    ({"precision": "fp32"}, "openvino"),
    ({"runtime": "torch"}, "torch"),
    ({"device": "cuda"}, "torch"),
    ({"device": "mps"}, "torch"),
    ({"precision": "fp16"}, "torch"),
    ({"model": "hf-hub:org/repo"}, "torch"),
])
def test_auto_runtime(x86_cpu_with_openvino, changes, expected):
    spec = replace(EncoderSpec(TINY, "none", runtime="auto"), **changes)
    assert choose_runtime(spec) == expected


def test_auto_runtime_leaves_gpus_arm_and_missing_openvino_to_torch(x86_cpu_with_openvino, monkeypatch):
    spec = EncoderSpec(TINY, "none", runtime="auto")
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: True)
    assert choose_runtime(spec) == "torch"
    assert choose_runtime(replace(spec, device="cpu")) == "openvino"  # a GPU may be there, but the CPU was asked for
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: False)
    monkeypatch.setattr(ov_runtime.platform, "machine", lambda: "aarch64")
    assert choose_runtime(spec) == "torch"
    monkeypatch.setattr(ov_runtime.platform, "machine", lambda: "AMD64")
    assert choose_runtime(spec) == "openvino"
    monkeypatch.setattr(ov_runtime, "openvino_installed", lambda: False)
    assert choose_runtime(spec) == "torch"


def test_spec_default_runtime_is_torch():
    assert choose_runtime(EncoderSpec(TINY, "none")) == "torch"  # searching keeps torch unless indexing asks


@pytest.mark.parametrize("changes, message", [
    ({"device": "cuda"}, "runs on the CPU"),
    ({"precision": "fp16"}, "not fp16"),
    ({"runtime": "onnx"}, "unknown runtime"),
])
def test_explicit_openvino_refuses_what_it_cannot_do(x86_cpu_with_openvino, changes, message):
    with pytest.raises(ConfigError, match=message):
        choose_runtime(replace(EncoderSpec(TINY, "none", runtime="openvino"), **changes))


def test_explicit_openvino_when_not_installed(monkeypatch):
    monkeypatch.setattr(ov_runtime, "openvino_installed", lambda: False)
    with pytest.raises(ConfigError, match="pip install openvino"):
        choose_runtime(EncoderSpec(TINY, "none", runtime="openvino"))


def test_runtime_setting_and_flag(tmp_path):
    assert load_settings({"data_dir": tmp_path}, env={}).runtime == "auto"
    assert load_settings({"data_dir": tmp_path}, env={"CLIPSEARCH_RUNTIME": "torch"}).runtime == "torch"
    from click.testing import CliRunner

    from clipsearch.cli import main

    for command in ("index", "watch"):
        assert "--runtime" in CliRunner().invoke(main, [command, "--help"]).output


def test_cache_key_follows_the_weights_file(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"one")
    spec = EncoderSpec(TINY, str(weights))
    first = ir_cache_key(spec)
    assert first == ir_cache_key(spec) and first.endswith("-openvino")
    weights.write_bytes(b"two, longer")
    assert ir_cache_key(spec) != first
    assert ir_cache_key(EncoderSpec(TINY, "none")) != ir_cache_key(EncoderSpec(TINY, "laion2b_s34b_b79k"))


# --- the encoder --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino-models")


def spec_for(cache_dir: Path, precision: str = "fp32", model: str = TINY) -> EncoderSpec:
    return EncoderSpec(model, "none", "cpu", precision, cache_dir, runtime="openvino")


@pytest.fixture(scope="module")
def ov_fp32(cache_dir):
    if not ov_runtime.openvino_installed():
        pytest.skip("openvino is not installed here")
    return load_encoder(spec_for(cache_dir))


@pytest.fixture(scope="module")
def torch_fp32(cache_dir):
    pytest.importorskip("open_clip")
    return load_encoder(replace(spec_for(cache_dir), runtime="torch"))


@needs_openvino
def test_openvino_matches_torch_fp32(ov_fp32, torch_fp32):
    assert type(ov_fp32).__name__ == "OpenVinoEncoder" and ov_fp32.runtime == "openvino"
    assert (ov_fp32.model_id, ov_fp32.dim, ov_fp32.image_size) == (torch_fp32.model_id, torch_fp32.dim,
                                                                   torch_fp32.image_size)
    images = make_images(6) + odd_images()[:3]
    ov_inputs = [ov_fp32.preprocess(im) for im in images]
    torch_inputs = [torch_fp32.preprocess(im) for im in images]
    for a, b in zip(ov_inputs, torch_inputs):
        np.testing.assert_array_equal(a, b.numpy())
    got, expected = ov_fp32.encode_images(ov_inputs), torch_fp32.encode_images(torch_inputs)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert min_row_cosine(got, expected) >= 0.9999
    np.testing.assert_allclose(ov_fp32.encode_images(ov_inputs[:1]), got[:1], atol=1e-5)  # batch size 1 works too
    assert ov_fp32.encode_images([]).shape == (0, ov_fp32.dim)


@needs_openvino
def test_openvino_bf16_agrees_with_torch_fp32(cache_dir, torch_fp32):
    bf16 = load_encoder(spec_for(cache_dir, "bf16"))
    assert bf16.precision == "bf16"
    images = make_images(8, seed=5)
    got = bf16.encode_images([bf16.preprocess(im) for im in images])
    assert min_row_cosine(got, torch_fp32.encode_images([torch_fp32.preprocess(im) for im in images])) >= 0.999


@needs_openvino
def test_texts_go_through_the_openvino_text_tower_loaded_on_first_use(cache_dir, torch_fp32):
    encoder = load_encoder(spec_for(cache_dir))
    assert encoder._openvino_text is None and encoder.text_truncation is None
    texts = ["a dog", "two red cars on a bridge", ""]
    assert min_row_cosine(encoder.encode_texts(texts), torch_fp32.encode_texts(texts)) >= 0.9999
    assert encoder._openvino_text is not None and encoder._text_encoder is None  # torch never loaded
    assert encoder.text_truncation is True
    assert encoder.encode_texts([]).shape == (0, encoder.dim)
    with pytest.raises(TypeError):
        encoder.encode_texts("one string")
    encoder.warm_up()


@needs_openvino
def test_export_is_cached_and_a_cached_load_imports_no_torch(cache_dir, ov_fp32):
    folder = built_model_folder(str(cache_dir))
    key = ir_cache_key(spec_for(cache_dir))
    assert {p.suffix for p in folder.glob(f"{key}.*")} == {".xml", ".bin", ".json"}
    meta = json.loads((folder / f"{key}.json").read_text())
    assert meta["model_id"] == ov_fp32.model_id and meta["export_agreement"] >= 0.9999
    assert meta["class_token_cut"] is True  # the exported tower runs the last block for the class token only
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no scratch folder left behind
    got = encode_in_a_new_process(cache_dir, "e.encode_images([e.preprocess(Image.new('RGB', (80, 60), 'red'))])")
    assert got == f"OpenVinoEncoder (1, {ov_fp32.dim}) []"


def encode_in_a_new_process(cache_dir: Path, encode: str) -> str:
    """'<encoder class> <shape of `encode`> <torch, open_clip, torchvision if imported>' from a fresh interpreter
    that loads the tiny model with the OpenVINO runtime from `cache_dir` (`e` is the encoder)."""
    script = (
        "import sys\n"
        "from clipsearch.encoders import EncoderSpec, load_encoder\n"
        "from PIL import Image\n"
        f"e = load_encoder(EncoderSpec({TINY!r}, 'none', 'cpu', 'fp32', {str(cache_dir)!r}, runtime='openvino'))\n"
        f"v = {encode}\n"
        "print(type(e).__name__, v.shape, sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@needs_openvino
def test_a_damaged_export_is_made_again(tmp_path, ov_fp32):
    spec = spec_for(tmp_path)
    encoder = load_encoder(spec)
    xml = built_model_folder(str(tmp_path)) / f"{ir_cache_key(spec)}.xml"
    xml.write_text("<net>truncated")
    again = load_encoder(spec)
    image = [encoder.preprocess(Image.new("RGB", (64, 64), "blue"))]
    np.testing.assert_allclose(again.encode_images(image), encoder.encode_images(image), atol=1e-6)
    assert xml.read_text().startswith("<?xml")  # exported again when the image tower was first needed
    assert again._request is not None  # and run by OpenVINO, not torch


@needs_openvino
def test_a_failed_export_falls_back_to_torch_once_and_for_all(tmp_path, monkeypatch, caplog):
    calls = []

    def broken(visual, tower, model_id, size):
        calls.append(1)
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(ov_runtime, "_convert", broken)
    auto = replace(spec_for(tmp_path), runtime="auto", device="cpu")
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: False)
    monkeypatch.setattr(ov_runtime.platform, "machine", lambda: "x86_64")
    with caplog.at_level(logging.INFO, logger="clipsearch.encoders"):
        encoder = load_encoder(auto)
    assert type(encoder).__name__ == "OpenClipEncoder" and calls == [1]
    assert "aten::frobnicate" in caplog.text
    assert type(load_encoder(auto)).__name__ == "OpenClipEncoder" and calls == [1]  # the marker: no second try
    with pytest.raises(ConfigError, match="cannot run under OpenVINO.*frobnicate"):
        load_encoder(spec_for(tmp_path))


@needs_openvino
def test_a_disagreeing_export_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ov_runtime, "EXPORT_AGREEMENT", 1.5)  # no export can reach it
    with pytest.raises(ConfigError, match="disagrees with torch"):
        load_encoder(spec_for(tmp_path))
    assert not list(built_model_folder(str(tmp_path)).glob("*.xml"))


@needs_openvino
def test_model_errors_surface_as_on_the_torch_path(tmp_path):
    from clipsearch.errors import UnknownModelError, WeightsUnavailableError

    with pytest.raises(UnknownModelError):
        load_encoder(spec_for(tmp_path, model="ViT-Q-99"))
    with pytest.raises(WeightsUnavailableError):
        load_encoder(replace(spec_for(tmp_path), pretrained=str(tmp_path / "missing.safetensors")))
    assert not list(built_model_folder(str(tmp_path)).glob("*.unsupported"))  # a user error is no export verdict


@needs_openvino
def test_indexing_with_openvino_agrees_with_torch(tmp_path, cache_dir, caplog):
    from clipsearch.indexer.run import index_folders
    from clipsearch.library import Library
    from tests.fakes import make_image

    photos = tmp_path / "photos"
    for i, colour in enumerate(("red", "green", "blue", "yellow", "white")):
        make_image(photos / f"{colour}.jpg", colour, size=(320 + 40 * i, 240), noise=i + 1)
    stored = {}
    for runtime in ("openvino", "torch"):
        settings = load_settings({"data_dir": tmp_path / runtime, "model": TINY, "pretrained": "none",
                                  "device": "cpu", "precision": "fp32", "runtime": runtime,
                                  "model_cache_dir": cache_dir, "workers": 2}, env={})
        with caplog.at_level(logging.INFO, logger="clipsearch.encoders"):
            report = index_folders(settings, [photos])
        assert report.embedded == 5 and not report.failed
        library = Library(settings)
        try:
            model_id = library.catalog.library_model()["model_id"]
            ids, vectors = library.catalog.vectors(model_id)
            paths = {row.id: Path(row.path).name for row in library.catalog.known_under([str(photos)]).values()}
            stored[runtime] = (model_id, {paths[int(i)]: v for i, v in zip(ids, vectors)})
        finally:
            library.close()
    assert "compiled the image tower of" in caplog.text
    (ov_model, ov_vectors), (torch_model, torch_vectors) = stored["openvino"], stored["torch"]
    assert ov_model == torch_model and ov_vectors.keys() == torch_vectors.keys()
    names = sorted(ov_vectors)
    assert min_row_cosine(np.stack([ov_vectors[n] for n in names]), np.stack([torch_vectors[n] for n in names])) >= 0.9999


@pytest.mark.slow
@needs_openvino
def test_vit_b_32_openvino_agrees_with_torch_fp32(tmp_path):
    pytest.importorskip("open_clip")
    ov_auto = load_encoder(EncoderSpec("ViT-B-32", "none", "cpu", "auto", tmp_path, runtime="openvino"))
    reference = load_encoder(EncoderSpec("ViT-B-32", "none", "cpu", "fp32", tmp_path))
    images = make_images(4, seed=3) + odd_images()[:2]
    got = ov_auto.encode_images([ov_auto.preprocess(im) for im in images])
    expected = reference.encode_images([reference.preprocess(im) for im in images])
    assert ov_auto.model_id == reference.model_id
    assert min_row_cosine(got, expected) >= 0.999  # bf16 where the CPU has it, else fp32
    texts = ["a dog on the beach", "", "fish &amp; chips at night", " ".join(["a long caption"] * 40)]
    assert min_row_cosine(ov_auto.encode_texts(texts), reference.encode_texts(texts)) >= 0.999
    assert ov_auto._openvino_text is not None  # the texts went through OpenVINO


@needs_openvino
def test_a_full_disk_falls_back_to_torch_without_giving_up_on_openvino(tmp_path, monkeypatch, caplog):
    import errno

    def no_space(folder, key, ov_model, meta):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save = ov_runtime.save_ir
    monkeypatch.setattr(ov_runtime, "save_ir", no_space)
    auto = replace(spec_for(tmp_path), runtime="auto")
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: False)
    monkeypatch.setattr(ov_runtime.platform, "machine", lambda: "x86_64")
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders"):
        assert type(load_encoder(auto)).__name__ == "OpenClipEncoder"
    assert "No space left on device" in caplog.text and "free space" in caplog.text
    folder = built_model_folder(str(tmp_path))
    assert not list(folder.glob("*.unsupported")) and not [p for p in folder.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(ov_runtime, "save_ir", real_save)
    assert type(load_encoder(auto)).__name__ == "OpenVinoEncoder"  # space again: the export happens


@needs_openvino
def test_openvino_failing_at_run_time_falls_back_to_torch(tmp_path, monkeypatch, caplog, torch_fp32):
    def unsupported_cpu(xml, precision):
        raise RuntimeError("CPU plugin: the CPU lacks SSE4.2")

    load_encoder(spec_for(tmp_path))  # exported while OpenVINO works
    monkeypatch.setattr(ov_runtime, "compile_ir", unsupported_cpu)
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: False)
    monkeypatch.setattr(ov_runtime.platform, "machine", lambda: "x86_64")
    encoder = load_encoder(replace(spec_for(tmp_path), runtime="auto"))
    images = make_images(3, seed=11)
    inputs = [encoder.preprocess(im) for im in images]
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders"):
        got = encoder.encode_images(inputs)
    assert "lacks SSE4.2" in caplog.text and "go through torch" in caplog.text
    np.testing.assert_allclose(got, torch_fp32.encode_images([torch_fp32.preprocess(im) for im in images]), atol=1e-5)
    texts = ["a dog", "a red car"]
    np.testing.assert_allclose(encoder.encode_texts(texts), torch_fp32.encode_texts(texts), atol=1e-5)
    with pytest.raises(ConfigError, match="OpenVINO could not run.*SSE4.2"):
        load_encoder(spec_for(tmp_path)).encode_images(inputs)  # asked for explicitly: an error, not a fallback


@needs_openvino
def test_the_image_tower_compiles_on_first_use_and_the_indexer_prepares_it(cache_dir, ov_fp32):
    from clipsearch.encoders.background import BackgroundEncoder

    encoder = load_encoder(spec_for(cache_dir))
    encoder.encode_texts(["a text search needs no image tower"])
    assert encoder._request is None
    loading = BackgroundEncoder(spec_for(cache_dir))
    assert loading.result()._request is not None  # compiled in the loading thread, while photos decode


def test_scratch_folders_of_killed_exports_are_removed_after_an_hour(tmp_path):
    import os
    import time

    from clipsearch.encoders import remove_abandoned

    old, fresh = tmp_path / ".ViT-B-32-abc-openvino-x1", tmp_path / ".ViT-B-32-abc-openvino-x2"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "model.bin").write_bytes(b"partial")
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    remove_abandoned(tmp_path, ".*-openvino-*")
    assert not old.exists() and fresh.exists()  # a fresh one may be another process's export in progress
