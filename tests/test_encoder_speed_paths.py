"""Encoder speed paths: bf16 auto-detection and agreement, exact text truncation, warm-up."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from clipsearch.encoders import Encoder, EncoderSpec, cpu_has_native_bf16, load_encoder
from clipsearch.encoders import cpu_flags_have_native_bf16
from tests.test_encoders import TINY, TINY_CONFIG, make_images

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
openclip = pytest.importorskip("clipsearch.encoders.openclip")
text_cut = pytest.importorskip("clipsearch.encoders.text_cut")

# Lengths from 1 word to past the 77-token context (which the tokenizer truncates, EOT kept last).
TEXTS = ["dog", "a red car", "two people walking on a beach at sunset with a dog", "photo " * 100, ""]


def load(model: str = TINY, precision: str = "fp32") -> Encoder:
    return load_encoder(EncoderSpec(model, "none", device="cpu", precision=precision))


def full_context(enc, texts: list[str]) -> np.ndarray:
    """open_clip's own encode_text over the full 77 tokens, L2-normalised, float32."""
    tokens = open_clip.get_tokenizer(enc.spec.model)(texts)
    with torch.inference_mode():
        out = torch.nn.functional.normalize(enc.model.encode_text(tokens).float(), dim=-1)
    return out.numpy()


def min_row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture(scope="module")
def fp32():
    return load()


@pytest.fixture(scope="module")
def bf16():
    return load(precision="bf16")


# --- precision auto ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 amx_tile amx_bf16 amx_int8\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", False),  # ARM: no x86 flags line
        ("", False),
    ],
)
def test_cpuinfo_flags(cpuinfo, native):
    assert cpu_flags_have_native_bf16(cpuinfo) is native


def test_cpu_has_native_bf16_is_cached_bool():
    assert isinstance(cpu_has_native_bf16(), bool)
    assert cpu_has_native_bf16() is cpu_has_native_bf16()
    assert cpu_has_native_bf16.cache_info().hits >= 1


@pytest.mark.parametrize("native", [True, False])
def test_precision_plan(monkeypatch, native):
    monkeypatch.setattr(openclip, "cpu_has_native_bf16", lambda: native)
    plan = openclip._precision_plan
    assert plan("cpu", "auto") == ((torch.bfloat16 if native else torch.float32), False)
    assert plan("cpu", "fp32") == (torch.float32, False)
    assert plan("cpu", "bf16") == (torch.bfloat16, False)  # never autocast on the CPU
    assert plan("cuda", "auto") == (torch.float32, True)  # fp16 autocast, whatever the CPU
    assert plan("cuda:1", "fp32") == (torch.float32, False)
    assert plan("mps", "auto") == (torch.float32, False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(openclip, "cpu_has_native_bf16", lambda: native)
    enc = load(precision="auto")
    assert enc.precision == ("bf16" if native else "fp32")
    assert next(enc.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    out = enc.encode_texts(["a red car", "a dog"])
    assert out.dtype == np.float32 and out.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_auto_on_this_machine():
    assert load(precision="auto").precision == ("bf16" if cpu_has_native_bf16() else "fp32")


# --- bf16 agreement ------------------------------------------------------------------------------------------


def test_bf16_agrees_with_fp32_tiny(fp32, bf16):
    images = make_images(6)
    for enc in (fp32, bf16):
        assert enc.encode_images([]).dtype == np.float32
    a = fp32.encode_images([fp32.preprocess(im) for im in images])
    b = bf16.encode_images([bf16.preprocess(im) for im in images])
    assert b.dtype == np.float32 and min_row_cosine(a, b) >= 0.999
    assert min_row_cosine(fp32.encode_texts(TEXTS), bf16.encode_texts(TEXTS)) >= 0.999


@pytest.mark.slow
def test_bf16_agrees_with_fp32_vit_b_32():
    a_enc, b_enc = load("ViT-B-32"), load("ViT-B-32", "bf16")
    assert (a_enc.precision, b_enc.precision) == ("fp32", "bf16")
    assert a_enc.text_truncation and b_enc.text_truncation
    images = make_images(4, seed=3)
    a = a_enc.encode_images([a_enc.preprocess(im) for im in images])
    b = b_enc.encode_images([b_enc.preprocess(im) for im in images])
    assert min_row_cosine(a, b) >= 0.999
    assert min_row_cosine(a_enc.encode_texts(TEXTS), b_enc.encode_texts(TEXTS)) >= 0.999
    np.testing.assert_allclose(a_enc.encode_texts(TEXTS), full_context(a_enc, TEXTS), atol=1e-5)


# --- text truncation -----------------------------------------------------------------------------------------


def test_truncated_equals_full_context_fp32(fp32):
    assert fp32.text_truncation is True
    out = fp32.encode_texts(TEXTS)
    np.testing.assert_allclose(out, full_context(fp32, TEXTS), atol=1e-5)
    # Each text alone is cut shorter than in the batch: same rows.
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(fp32.encode_texts([text])[0], out[i], atol=1e-5)


def test_cut_length_is_last_eot_plus_one(fp32):
    tokens = open_clip.get_tokenizer(TINY)(["dog", "a red car"])  # [SOT dog EOT], [SOT a red car EOT]
    assert fp32._text_tower.cut_length(tokens) == 5
    assert fp32._text_tower.cut_length(open_clip.get_tokenizer(TINY)(["photo " * 100])) == 77


def test_truncated_bf16_close_to_full_context(bf16):
    assert bf16.text_truncation is True  # decided on the fp32 model before the conversion
    assert min_row_cosine(bf16.encode_texts(TEXTS), full_context(bf16, TEXTS)) >= 0.999


def _register_config(tmp_path, name: str, text_cfg: dict, custom_text: bool = False) -> str:
    config = json.loads(TINY_CONFIG.read_text())
    config["text_cfg"].update(text_cfg)
    if custom_text:
        config["custom_text"] = True
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return name


@pytest.mark.parametrize(
    ("name", "text_cfg", "custom_text", "why"),
    [
        ("cs-test-bidirectional", {"no_causal_mask": True}, False, "not causal"),  # like MobileCLIP
        ("cs-test-bidirectional-custom", {"no_causal_mask": True, "pool_type": "first"}, True, "not causal"),
        ("cs-test-last-pool", {"pool_type": "last"}, False, "pools 'last'"),  # the last slot is padding
    ],
)
def test_truncation_refused_for_other_towers(tmp_path, caplog, name, text_cfg, custom_text, why):
    _register_config(tmp_path, name, text_cfg, custom_text)
    with caplog.at_level(logging.DEBUG, logger="clipsearch.encoders.text_cut"):
        enc = load(name)
    assert enc.text_truncation is False
    assert any(why in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(enc.encode_texts(TEXTS), full_context(enc, TEXTS), atol=1e-6)


def test_cut_would_change_a_bidirectional_tower(tmp_path):
    """Why the refusal matters: without a causal mask the padding is attended to, so cutting changes the output."""
    enc = load(_register_config(tmp_path, "cs-test-bidirectional-2", {"no_causal_mask": True}, custom_text=True))
    assert enc.text_truncation is False
    tokens = open_clip.get_tokenizer(enc.spec.model)(TEXTS[:3])
    with torch.inference_mode():  # TextTransformer.forward accepts a short batch when it has no mask
        cut = torch.nn.functional.normalize(enc.model.encode_text(tokens[:, :12]), dim=-1).numpy()
    assert np.abs(cut - full_context(enc, TEXTS[:3])).max() > 1e-3


def test_truncation_on_for_causal_custom_text_tower(tmp_path):
    """A CustomTextCLIP whose text tower is open_clip's causal TextTransformer gets the cut too."""
    enc = load(_register_config(tmp_path, "cs-test-causal-custom", {}, custom_text=True))
    assert type(enc.model).__name__ == "CustomTextCLIP" and enc.text_truncation is True
    np.testing.assert_allclose(enc.encode_texts(TEXTS), full_context(enc, TEXTS), atol=1e-5)


def test_truncation_off_when_verification_fails(monkeypatch, caplog):
    real = text_cut.CausalTextTower.encode
    monkeypatch.setattr(text_cut.CausalTextTower, "encode", lambda self, tokens: real(self, tokens) + 0.01)
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders.text_cut"):
        enc = load()
    assert enc.text_truncation is False and any("differ" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(enc.encode_texts(TEXTS), full_context(enc, TEXTS), atol=1e-6)


def test_truncation_off_when_verification_raises(monkeypatch, caplog):
    def broken(self, tokens):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(text_cut.CausalTextTower, "encode", broken)
    with caplog.at_level(logging.WARNING, logger="clipsearch.encoders.text_cut"):
        enc = load()
    assert enc.text_truncation is False and any("shape mismatch" in r.getMessage() for r in caplog.records)


# --- warm-up -------------------------------------------------------------------------------------------------


def test_warm_up(fp32):
    before = fp32.encode_texts(["a red car"])
    assert fp32.warm_up() is None
    np.testing.assert_allclose(fp32.encode_texts(["a red car"]), before, atol=1e-6)


def test_base_encoder_warm_up_is_a_no_op():
    from tests.test_encoders import FakeEncoder

    assert FakeEncoder(EncoderSpec("fake", "x")).warm_up() is None
