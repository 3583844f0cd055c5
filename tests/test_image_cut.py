"""Exact image class-token cut: the last ViT block computes the class token only, verified against the full tower."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from clipsearch.encoders import EncoderSpec, load_encoder
from tests.test_encoders import TINY, TINY_CONFIG, make_images

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
image_cut = pytest.importorskip("clipsearch.encoders.image_cut")


def load(model: str = TINY, precision: str = "fp32", cache_dir=None):
    return load_encoder(EncoderSpec(model, "none", device="cpu", precision=precision, cache_dir=cache_dir))


def full_tower(enc, inputs) -> np.ndarray:
    """open_clip's own encode_image (every token through every block), L2-normalised, float32."""
    x = torch.stack(list(inputs)).to(next(enc.model.parameters()).dtype)
    with torch.inference_mode():
        return torch.nn.functional.normalize(enc.model.encode_image(x).float(), dim=-1).numpy()


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def register_config(tmp_path, name: str, vision_cfg: dict) -> str:
    config = json.loads(TINY_CONFIG.read_text())
    config["vision_cfg"].update(vision_cfg)
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return name


def test_cut_equals_the_full_tower_fp32(tmp_path):
    enc = load(cache_dir=tmp_path)
    assert enc.image_tower is not None
    inputs = [enc.preprocess(im) for im in make_images(7)]
    got = enc.encode_images(inputs)
    np.testing.assert_allclose(got, full_tower(enc, inputs), atol=1e-5)
    np.testing.assert_allclose(enc.encode_images(inputs[2:3]), got[2:3], atol=1e-5)  # batch of one


def test_the_cut_runs_only_the_class_token_through_the_last_block(tmp_path):
    """What makes it faster: the last block's MLP sees one row per image instead of every token."""
    enc = load(cache_dir=tmp_path)
    mlp = enc.model.visual.transformer.resblocks[-1].mlp
    rows = []
    handle = mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        enc.encode_images([enc.preprocess(im) for im in make_images(2)])
    finally:
        handle.remove()
    assert rows == [1]


def test_bf16_cut_agrees_with_fp32_full(tmp_path):
    fp32, bf16 = load(cache_dir=tmp_path), load(precision="bf16", cache_dir=tmp_path)
    assert bf16.image_tower is not None  # decided on the fp32 model before the conversion
    images = make_images(6, seed=4)
    expected = full_tower(fp32, [fp32.preprocess(im) for im in images])
    assert min_row_cosine(bf16.encode_images([bf16.preprocess(im) for im in images]), expected) >= 0.999


def test_a_cached_model_keeps_the_verdict(tmp_path, caplog):
    first = load(cache_dir=tmp_path)
    with caplog.at_level(logging.DEBUG, logger="clipsearch.encoders.image_cut"):
        again = load(cache_dir=tmp_path)  # from the built-model cache: no second verification
    assert again.image_tower is not None and "cut on" not in caplog.text
    inputs = [first.preprocess(im) for im in make_images(3)]
    np.testing.assert_allclose(again.encode_images(inputs), first.encode_images(inputs), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "vision_cfg", "why"),
    [
        ("cs-test-avg-pool", {"pool_type": "avg"}, "does not pool its class token"),
        ("cs-test-attn-pool", {"attentional_pool": True, "attn_pooler_heads": 2}, "does not pool its class token"),
        ("cs-test-custom-block", {"qk_norm": True}, "not the standard self-attention block"),
        ("cs-test-resnet", {"layers": [1, 1, 1, 1], "width": 16, "head_width": 16}, "not open_clip's ViT"),
    ],
)
def test_cut_refused_for_other_towers(tmp_path, caplog, name, vision_cfg, why):
    register_config(tmp_path, name, vision_cfg)
    with caplog.at_level(logging.DEBUG, logger="clipsearch.encoders.image_cut"):
        enc = load(name, cache_dir=tmp_path)
        assert enc.image_tower is None
        assert load(name, cache_dir=tmp_path).image_tower is None  # the cached 'off' verdict is kept
    assert why in caplog.text
    inputs = [enc.preprocess(im) for im in make_images(3)]
    np.testing.assert_allclose(enc.encode_images(inputs), full_tower(enc, inputs), atol=1e-6)


def test_cut_would_change_an_average_pooled_tower(tmp_path):
    """Why the refusal matters: a tower pooling every token needs every row of its last block."""
    enc = load(register_config(tmp_path, "cs-test-avg-pool-2", {"pool_type": "avg"}), cache_dir=tmp_path)
    inputs = [enc.preprocess(im) for im in make_images(3)]
    cut = image_cut.ClassTokenImageTower(enc.model.visual)
    with torch.inference_mode():
        got = torch.nn.functional.normalize(cut(torch.stack(inputs)), dim=-1).numpy()
    assert np.abs(got - full_tower(enc, inputs)).max() > 1e-3


def test_cut_off_when_verification_fails(tmp_path, monkeypatch, caplog):
    real = image_cut.ClassTokenImageTower.forward
    monkeypatch.setattr(image_cut.ClassTokenImageTower, "forward", lambda self, x: real(self, x) + 0.01)
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders.image_cut"):
        enc = load(cache_dir=tmp_path)
    assert enc.image_tower is None and "differs from the full tower" in caplog.text


def test_cut_off_when_verification_raises(tmp_path, monkeypatch, caplog):
    def broken(self, x):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(image_cut.ClassTokenImageTower, "forward", broken)
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders.image_cut"):
        enc = load(cache_dir=tmp_path)
    assert enc.image_tower is None and "shape mismatch" in caplog.text
    inputs = [enc.preprocess(im) for im in make_images(2)]
    np.testing.assert_allclose(enc.encode_images(inputs), full_tower(enc, inputs), atol=1e-6)


@pytest.mark.slow
def test_vit_b_32_cut_equals_the_full_tower(tmp_path):
    enc = load("ViT-B-32", cache_dir=tmp_path)
    assert enc.image_tower is not None
    inputs = [enc.preprocess(im) for im in make_images(4, seed=3)]
    np.testing.assert_allclose(enc.encode_images(inputs), full_tower(enc, inputs), atol=1e-5)
