"""The text tower under OpenVINO: agreement with torch at every length, no torch at search time, fallbacks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.encoders import EncoderSpec, built_model_folder, load_encoder
from clipsearch.encoders import openvino as ov_runtime
from clipsearch.encoders import openvino_text
from clipsearch.encoders.clip_tokenizer import PROBE_TEXTS, ClipTokenizer
from clipsearch.encoders.openvino import ir_cache_key
from tests.test_encoders import TINY
from tests.test_openvino_encoder import encode_in_a_new_process

pytestmark = pytest.mark.skipif(not ov_runtime.openvino_installed(), reason="openvino is not installed here")
pytest.importorskip("open_clip")

TEXTS = [*PROBE_TEXTS, *(" ".join(["word"] * n) for n in (0, 1, 5, 20, 74, 75, 76, 100))]


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def spec_for(cache_dir: Path, precision: str = "fp32") -> EncoderSpec:
    return EncoderSpec(TINY, "none", "cpu", precision, cache_dir, runtime="openvino")


def text_files(cache_dir: Path) -> dict[str, Path]:
    folder, key = built_model_folder(str(cache_dir)), ir_cache_key(spec_for(cache_dir))
    return {suffix: folder / f"{openvino_text.text_stem(key)}{suffix}"
            for suffix in (".xml", ".bin", ".json", ".unsupported")}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino-text-models")


@pytest.fixture(scope="module")
def ov_fp32(cache_dir):
    return load_encoder(spec_for(cache_dir))


@pytest.fixture(scope="module")
def torch_fp32(cache_dir):
    return load_encoder(replace(spec_for(cache_dir), runtime="torch"))


def test_texts_agree_with_torch_at_every_length_and_batching(ov_fp32, torch_fp32, monkeypatch):
    expected = torch_fp32.encode_texts(TEXTS)
    together = ov_fp32.encode_texts(TEXTS)
    assert together.dtype == np.float32 and together.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert min_row_cosine(together, expected) >= 0.9999
    one_by_one = np.concatenate([ov_fp32.encode_texts([text]) for text in TEXTS])  # each cut to its own length
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    monkeypatch.setattr(openvino_text, "TEXTS_PER_CALL", 4)  # label prompt ensembles come in several calls
    np.testing.assert_allclose(ov_fp32.encode_texts(TEXTS), together, atol=1e-5)
    assert ov_fp32._text_encoder is None  # torch was never needed


def test_bf16_texts_agree_with_torch_fp32(cache_dir, torch_fp32):
    bf16 = load_encoder(spec_for(cache_dir, "bf16"))
    assert min_row_cosine(bf16.encode_texts(TEXTS), torch_fp32.encode_texts(TEXTS)) >= 0.999


def test_cut_length_keeps_the_last_end_token():
    tokens = ClipTokenizer()(["a dog", "two red cars on a bridge", ""])
    length = openvino_text.cut_length(tokens, {"pool_type": "argmax", "eos_id": None})
    assert length == int((tokens != 0).sum(axis=1).max())
    eos = ClipTokenizer().eot_token_id
    assert openvino_text.cut_length(tokens, {"pool_type": "eos", "eos_id": eos}) == length


def test_the_text_tower_is_exported_with_the_image_tower_and_loads_without_torch(cache_dir, ov_fp32):
    files = text_files(cache_dir)
    assert files[".xml"].is_file() and files[".bin"].is_file() and not files[".unsupported"].exists()
    meta = json.loads(files[".json"].read_text())
    assert meta["model_id"] == ov_fp32.model_id and meta["context_length"] == 77 and meta["pool_type"] == "argmax"
    assert meta["export_agreement"] >= 0.9999 and meta["dim"] == ov_fp32.dim
    got = encode_in_a_new_process(cache_dir, "e.encode_texts(['a red car', 'a blue boat'])")
    assert got == f"OpenVinoEncoder (2, {ov_fp32.dim}) []"


def test_a_cache_made_before_text_towers_exports_it_on_the_first_text(tmp_path, torch_fp32):
    load_encoder(spec_for(tmp_path))
    files = text_files(tmp_path)
    for suffix in (".xml", ".bin", ".json"):
        files[suffix].unlink()
    encoder = load_encoder(spec_for(tmp_path))
    assert not files[".xml"].exists()  # loading for images does not touch the text tower
    assert min_row_cosine(encoder.encode_texts(TEXTS[:4]), torch_fp32.encode_texts(TEXTS[:4])) >= 0.9999
    assert files[".xml"].is_file() and encoder._openvino_text is not None


def test_a_damaged_text_tower_is_exported_again(tmp_path, torch_fp32, caplog):
    load_encoder(spec_for(tmp_path))
    files = text_files(tmp_path)
    files[".xml"].write_text("<net>truncated")
    encoder = load_encoder(spec_for(tmp_path))
    with caplog.at_level(logging.INFO, logger="clipsearch.encoders"):
        got = encoder.encode_texts(TEXTS[:4])
    assert "exporting it again" in caplog.text and files[".xml"].read_text().startswith("<?xml")
    assert min_row_cosine(got, torch_fp32.encode_texts(TEXTS[:4])) >= 0.9999 and encoder._openvino_text is not None


def test_a_text_tower_it_cannot_export_leaves_texts_on_torch_once_and_for_all(tmp_path, torch_fp32, monkeypatch):
    calls = []

    def broken(torch_encoder):
        calls.append(1)
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(openvino_text, "_convert", broken)
    encoder = load_encoder(spec_for(tmp_path))
    assert type(encoder).__name__ == "OpenVinoEncoder"  # the image tower is unaffected
    files = text_files(tmp_path)
    assert "frobnicate" in files[".unsupported"].read_text() and not files[".xml"].exists()
    np.testing.assert_allclose(encoder.encode_texts(TEXTS[:3]), torch_fp32.encode_texts(TEXTS[:3]), atol=1e-6)
    assert encoder._text_encoder is not None and encoder._openvino_text is None
    again = load_encoder(spec_for(tmp_path))
    again.encode_texts(["a dog"])
    assert calls == [1]  # the marker: no second try


def test_a_tokenizer_it_does_not_reproduce_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_text, "matches_open_clip", lambda tokenizer: "tokenizer has a reduction mask")
    encoder = load_encoder(spec_for(tmp_path))
    assert "reduction mask" in text_files(tmp_path)[".unsupported"].read_text()
    assert encoder.encode_texts(["a dog"]).shape == (1, encoder.dim) and encoder._text_encoder is not None


def test_a_failed_write_is_no_verdict_on_the_text_tower(tmp_path, monkeypatch, caplog):
    import errno

    real_save = ov_runtime.save_ir

    def no_space_for_texts(folder, stem, ov_model, meta):
        if stem.endswith("-text"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(folder, stem, ov_model, meta)

    monkeypatch.setattr(ov_runtime, "save_ir", no_space_for_texts)
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders"):
        encoder = load_encoder(spec_for(tmp_path))
    assert "No space left on device" in caplog.text
    files = text_files(tmp_path)
    assert not files[".xml"].exists() and not files[".unsupported"].exists()
    monkeypatch.setattr(ov_runtime, "save_ir", real_save)
    assert encoder.encode_texts(["a dog"]).shape == (1, encoder.dim)  # space again: exported on the first text
    assert files[".xml"].is_file() and encoder._openvino_text is not None


def test_cli_search_embeds_the_query_without_importing_torch(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(("red", "green", "blue", "yellow")):
        Image.new("RGB", (90 + i, 70), colour).save(photos / f"{colour}.jpg")
    common = ["--data-dir", str(tmp_path / "library"), "--model", TINY, "--pretrained", "none", "--device", "cpu",
              "--precision", "fp32", "--model-cache-dir", str(tmp_path / "models")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def clipsearch(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
        flags = ["-X", "importtime"] if importtime else []
        out = subprocess.run([sys.executable, *flags, "-m", "clipsearch", *args, *common], capture_output=True,
                             text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    clipsearch("index", str(photos), "--runtime", "openvino")
    searched = clipsearch("search", "a red photo", "--json", "--runtime", "openvino", importtime=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in searched.stderr.splitlines() if line.startswith("import time")}
    assert "openvino" in imported and not imported & {"torch", "open_clip", "torchvision"}
    with_openvino = {hit["path"]: hit["score"] for hit in json.loads(searched.stdout)}
    with_torch = {hit["path"]: hit["score"] for hit in
                  json.loads(clipsearch("search", "a red photo", "--json", "--runtime", "torch").stdout)}
    assert set(with_openvino) == set(with_torch) and len(with_torch) == 4
    for path, score in with_torch.items():
        assert with_openvino[path] == pytest.approx(score, abs=1e-4)


def test_the_server_loads_its_model_with_the_runtime_setting(settings):
    from clipsearch.webui.services import Services

    services = Services.create(replace(settings, runtime="openvino"))
    try:
        assert services.searcher.runtime == "openvino"
    finally:
        services.close()


@pytest.mark.parametrize(
    ("name", "text_cfg", "custom_text", "why"),
    [
        ("cs-ov-bidirectional", {"no_causal_mask": True}, False, "not causal"),  # like MobileCLIP
        ("cs-ov-last-pool", {"pool_type": "last"}, False, "pools 'last'"),
        ("cs-ov-causal-custom", {}, True, ""),  # CustomTextCLIP with open_clip's causal tower: exported
    ],
)
def test_only_causal_text_towers_are_exported(tmp_path, name, text_cfg, custom_text, why):
    from tests.test_encoder_speed_paths import _register_config

    _register_config(tmp_path, name, text_cfg, custom_text)
    spec = EncoderSpec(name, "none", "cpu", "fp32", tmp_path / "models", runtime="openvino")
    encoder, reference = load_encoder(spec), load_encoder(replace(spec, runtime="torch"))
    assert min_row_cosine(encoder.encode_texts(TEXTS), reference.encode_texts(TEXTS)) >= 0.9999
    marker = built_model_folder(str(tmp_path / "models")) / f"{openvino_text.text_stem(ir_cache_key(spec))}.unsupported"
    if why:
        assert why in marker.read_text() and encoder._openvino_text is None and encoder._text_encoder is not None
    else:
        assert not marker.exists() and encoder._openvino_text is not None and encoder._text_encoder is None


def test_a_one_query_process_embeds_on_the_cpu_where_openvino_runs(monkeypatch):
    from clipsearch.cli import one_query_settings
    from clipsearch.config import load_settings

    monkeypatch.setattr(ov_runtime.platform, "machine", lambda: "x86_64")
    settings = load_settings({"model": TINY, "pretrained": "none"}, env={})
    assert (settings.device, settings.runtime) == ("auto", "auto")
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: True)  # auto alone would load torch for the GPU
    assert one_query_settings(settings).device == "cpu"
    for kept in ({"device": "cuda"}, {"runtime": "torch"}, {"precision": "fp16"}, {"model": "hf-hub:org/model"}):
        explicit = load_settings({"model": TINY, "pretrained": "none", **kept}, env={})
        assert one_query_settings(explicit) == explicit
    monkeypatch.setattr(ov_runtime, "gpu_may_be_present", lambda: False)  # no GPU: auto already means OpenVINO
    assert one_query_settings(settings) == settings
