"""Encoders: the real tiny open_clip model (random weights), weights files, local-dir, errors, registry."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.encoders import (
    Encoder,
    EncoderSpec,
    encoder_spec_from_settings,
    load_encoder,
    model_id_for,
    register_encoder,
    resolve_device,
    unregister_encoder,
)
from clipsearch.errors import ConfigError, UnknownModelError, WeightsUnavailableError

torch = pytest.importorskip("torch")
TINY = "clipsearch-tiny"
TINY_CONFIG = Path(__file__).resolve().parents[1] / "clipsearch" / "model_configs" / "clipsearch-tiny.json"


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Distinct RGB images of varied sizes (so resize/crop are exercised)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (48 + 9 * i, 90 - 7 * i, 3), dtype=np.uint8), "RGB") for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny():
    # fp32 explicitly: precision auto is bf16 on CPUs with native bf16, and these tests compare at 1e-6.
    return load_encoder(EncoderSpec(TINY, "none", device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def images():
    return make_images(5)


@pytest.fixture(scope="module")
def reference(tiny, images):
    """Embeddings of the fixture images and two texts by the tiny encoder."""
    return tiny.encode_images([tiny.preprocess(im) for im in images]), tiny.encode_texts(["a red car", "a dog"])


def assert_unit_rows(x: np.ndarray, n: int, dim: int = 64):
    assert x.shape == (n, dim) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_tiny_encoder_shape_and_identity(tiny):
    assert isinstance(tiny, Encoder)
    assert (tiny.dim, tiny.image_size, tiny.device) == (64, 64, "cpu")
    assert tiny.model_id == f"{TINY}/random"


def test_encode_images_and_texts(tiny, images, reference):
    image_vecs, text_vecs = reference
    assert_unit_rows(tiny.encode_images([tiny.preprocess(im) for im in images[:3]]), 3)
    assert_unit_rows(image_vecs, 5)
    assert_unit_rows(text_vecs, 2)
    assert not np.allclose(text_vecs[0], text_vecs[1])
    assert tiny.encode_images([]).shape == (0, 64)
    assert tiny.encode_texts([]).shape == (0, 64)


def test_batch_invariance(tiny, images, reference):
    alone = tiny.encode_images([tiny.preprocess(images[2])])
    np.testing.assert_allclose(alone[0], reference[0][2], atol=1e-5)


def test_random_weights_deterministic_across_loads(tiny, images, reference, caplog):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders"):
        other = load_encoder(EncoderSpec(TINY, "Random", device="cpu", precision="fp32"))
    assert torch.equal(state, torch.random.get_rng_state()), "loading must not disturb the global RNG"
    assert any("meaningless" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(other.encode_images([other.preprocess(im) for im in images]), reference[0], atol=1e-6)
    np.testing.assert_allclose(other.encode_texts(["a red car", "a dog"]), reference[1], atol=1e-6)


def test_random_weights_agree_across_processes(tiny, reference):
    code = (
        "import sys, numpy as np; from clipsearch.encoders import EncoderSpec, load_encoder; "
        "e = load_encoder(EncoderSpec('clipsearch-tiny', 'none', device='cpu', precision='fp32')); "
        "sys.stdout.write(repr(e.encode_texts(['a red car', 'a dog']).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    np.testing.assert_allclose(np.array(eval(out.stdout), dtype=np.float32), reference[1], atol=1e-6)


def test_preprocess_is_thread_safe(tiny, images):
    tensor = tiny.preprocess(images[0].convert("L"))  # non-RGB input is converted
    assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (3, 64, 64) and tensor.device.type == "cpu"
    serial = [tiny.preprocess(im) for im in images]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(tiny.preprocess, images * 4))
    for i, t in enumerate(parallel):
        assert torch.equal(t, serial[i % len(images)])


def test_bf16_precision_close_to_fp32(images, reference):
    enc = load_encoder(EncoderSpec(TINY, "none", device="cpu", precision="bf16"))
    assert enc.precision == "bf16"
    out = enc.encode_images([enc.preprocess(im) for im in images])
    assert_unit_rows(out, 5)
    assert np.abs(out - reference[0]).max() < 0.05


@pytest.fixture(scope="module")
def saved_weights(tiny, tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")
    state = {k: v.detach().clone().contiguous() for k, v in tiny.model.state_dict().items()}
    torch.save(state, folder / "tiny.pt")
    save_file(state, str(folder / "tiny.safetensors"))
    return folder


@pytest.mark.parametrize("name", ["tiny.pt", "tiny.safetensors"])
def test_local_weights_file(saved_weights, images, reference, name):
    path = saved_weights / name
    enc = load_encoder(EncoderSpec(TINY, str(path), device="cpu", precision="fp32"))
    assert enc.model_id == f"{TINY}/file:{path.resolve()}"
    np.testing.assert_allclose(enc.encode_images([enc.preprocess(im) for im in images]), reference[0], atol=1e-6)
    np.testing.assert_allclose(enc.encode_texts(["a red car", "a dog"]), reference[1], atol=1e-6)


def _local_dir(saved_weights: Path, folder: Path) -> Path:
    folder.mkdir()
    config = {"model_cfg": json.loads(TINY_CONFIG.read_text()), "preprocess_cfg": {"interpolation": "bicubic"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    (folder / "open_clip_model.safetensors").write_bytes((saved_weights / "tiny.safetensors").read_bytes())
    return folder


def test_local_dir_model(saved_weights, images, reference, tmp_path):
    folder = _local_dir(saved_weights, tmp_path / "tiny-model")
    for model, pretrained in ((f"local-dir:{folder}", "ignored"), ("ViT-B-32", str(folder)), ("ViT-B-32", f"local-dir:{folder}")):
        enc = load_encoder(EncoderSpec(model, pretrained, device="cpu", precision="fp32"))
        assert enc.model_id == f"local-dir:{folder.resolve()}"
        assert (enc.dim, enc.image_size) == (64, 64)
        np.testing.assert_allclose(enc.encode_images([enc.preprocess(im) for im in images]), reference[0], atol=1e-6)
        np.testing.assert_allclose(enc.encode_texts(["a red car", "a dog"]), reference[1], atol=1e-6)


def test_local_dir_without_weights_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(TINY_CONFIG.read_text())}))
    with pytest.raises(WeightsUnavailableError, match="no weights file"):
        load_encoder(EncoderSpec(f"local-dir:{tmp_path}", "", device="cpu"))


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError) as info:
        load_encoder(EncoderSpec("ViT-B-33", "none", device="cpu"))
    assert "ViT-B-33" in info.value.message and "ViT-B-32" in info.value.hint


def test_unknown_tag_lists_known_tags():
    with pytest.raises(UnknownModelError) as info:
        load_encoder(EncoderSpec("ViT-B-32", "laion9b_nope", device="cpu"))
    assert "laion9b_nope" in info.value.message
    assert "laion2b_s34b_b79k" in info.value.hint and "local weights file" in info.value.hint


def test_offline_tag_fails_fast(monkeypatch, tmp_path):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: must still apply
    before = hub_constants.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder(EncoderSpec("ViT-B-32", "laion2b_s34b_b79k", device="cpu", cache_dir=tmp_path))
    assert time.monotonic() - start < 20
    text = str(info.value)
    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    for needle in ("ViT-B-32", "laion2b_s34b_b79k", "--pretrained", "--model-cache-dir", repo, str(tmp_path)):
        assert needle in text
    assert hub_constants.HF_HUB_OFFLINE == before, "the offline switch must be restored"


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_encoder(EncoderSpec(TINY, str(tmp_path / "nope.safetensors"), device="cpu"))


@pytest.mark.parametrize("name", ["corrupt.pt", "corrupt.safetensors", "corrupt.bin"])
def test_corrupt_weights_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder(EncoderSpec(TINY, str(path), device="cpu"))
    assert str(path) in info.value.message and info.value.__cause__ is not None


def test_weights_for_another_model(saved_weights):
    with pytest.raises(WeightsUnavailableError, match="cannot load weights"):
        load_encoder(EncoderSpec("RN50", str(saved_weights / "tiny.pt"), device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_config_error():
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(ConfigError):
        load_encoder(EncoderSpec(TINY, "none", device="cuda"))


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    with pytest.raises(ConfigError):
        load_encoder(EncoderSpec(TINY, "none", device="cpu", precision="fp8"))


def test_model_id_for(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert model_id_for("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32/laion2b_s34b_b79k"
    assert model_id_for("ViT-B-32", "LAION2B_S34B_B79K") == "ViT-B-32/laion2b_s34b_b79k"
    assert model_id_for("ViT-B-32", "none") == model_id_for("ViT-B-32", "Random") == "ViT-B-32/random"
    assert model_id_for("ViT-B-32", str(weights)) == f"ViT-B-32/file:{weights.resolve()}"
    missing = tmp_path / "missing.pt"
    assert model_id_for("ViT-B-32", str(missing)) == f"ViT-B-32/file:{missing.resolve()}"
    assert model_id_for("hf-hub:org/repo", "laion2b_s34b_b79k") == "hf-hub:org/repo"
    assert model_id_for(f"local-dir:{tmp_path}/../{tmp_path.name}", "x") == f"local-dir:{tmp_path.resolve()}"
    assert model_id_for("ViT-B-32", str(tmp_path)) == f"local-dir:{tmp_path.resolve()}"
    assert model_id_for("ViT-B-32", "hf-hub:org/repo") == "hf-hub:org/repo"


class FakeEncoder(Encoder):
    def __init__(self, spec: EncoderSpec):
        self.spec, self.model_id, self.dim, self.image_size, self.device = spec, spec.model, 8, 32, "cpu"

    def preprocess(self, image):
        return image

    def encode_images(self, batch):
        return np.eye(self.dim, dtype=np.float32)[: len(batch)]

    def encode_texts(self, texts):
        return np.eye(self.dim, dtype=np.float32)[: len(texts)]


def test_register_encoder_routes_prefix():
    register_encoder("fake-", FakeEncoder)
    try:
        enc = load_encoder(EncoderSpec("fake-model", "whatever"))
        assert isinstance(enc, FakeEncoder) and enc.spec.pretrained == "whatever"
    finally:
        unregister_encoder("fake-")
    with pytest.raises(UnknownModelError):
        load_encoder(EncoderSpec("fake-model", "none", device="cpu"))


def test_encoder_spec_from_settings(tmp_path):
    from clipsearch.config import Settings

    settings = Settings(data_dir=tmp_path, model=TINY, pretrained="none", device="cpu", precision="fp32",
                        model_cache_dir=tmp_path / "cache")
    assert encoder_spec_from_settings(settings) == EncoderSpec(TINY, "none", "cpu", "fp32", tmp_path / "cache")


def test_package_import_does_not_load_torch():
    code = "import sys, clipsearch.encoders; sys.exit('torch' in sys.modules or 'open_clip' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_offline_tag_loads_from_populated_cache(monkeypatch, saved_weights, tmp_path, images, reference):
    """A tag whose weights sit in the Hub cache loads with HF_HUB_OFFLINE (the copy-a-cache workflow)."""
    pretrained = pytest.importorskip("open_clip.pretrained")
    monkeypatch.setitem(pretrained._PRETRAINED, TINY, {"cached": {"hf_hub": "clipsearch/tiny-test/"}})
    snapshot = tmp_path / "models--clipsearch--tiny-test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes((saved_weights / "tiny.pt").read_bytes())
    (tmp_path / "models--clipsearch--tiny-test" / "refs").mkdir()
    (tmp_path / "models--clipsearch--tiny-test" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder(EncoderSpec(TINY, "CACHED", device="cpu", precision="fp32", cache_dir=tmp_path))
    assert enc.model_id == f"{TINY}/cached"
    np.testing.assert_allclose(enc.encode_images([enc.preprocess(im) for im in images]), reference[0], atol=1e-6)
