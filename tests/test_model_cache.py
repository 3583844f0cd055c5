"""The built-model cache: a second load builds on the meta device from the cache and gives identical embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.encoders import EncoderSpec, load_encoder
from clipsearch.encoders import built_model_folder


def embeddings(encoder):
    images = [Image.new("RGB", (80, 60), colour) for colour in ("red", "navy", "olive")]
    return (encoder.encode_images([encoder.preprocess(im) for im in images]),
            encoder.encode_texts(["a red square", "a dark blue photo of the sea"]))


def cached_files():
    folder = built_model_folder(None)
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def test_random_weights_load_from_cache_identically():
    spec = EncoderSpec("clipsearch-tiny", "none", "cpu", "fp32")
    first = load_encoder(spec)
    assert len(cached_files()) == 1
    second = load_encoder(spec)
    for a, b in zip(embeddings(first), embeddings(second)):
        np.testing.assert_array_equal(a, b)
    assert second.text_truncation and second.image_size == first.image_size


def test_weights_file_cache_follows_the_file(tmp_path):
    torch.manual_seed(1)
    reference = load_encoder(EncoderSpec("clipsearch-tiny", "none", "cpu", "fp32"))
    weights = tmp_path / "tiny.pt"
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.model.state_dict().items()}
    torch.save(state, weights)
    spec = EncoderSpec("clipsearch-tiny", str(weights), "cpu", "fp32")
    first, second = load_encoder(spec), load_encoder(spec)
    for a, b in zip(embeddings(first), embeddings(second)):
        np.testing.assert_array_equal(a, b)
    # Replacing the weights file must not load the stale cached tensors.
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, weights)
    changed = load_encoder(spec)
    assert not np.allclose(embeddings(changed)[0], embeddings(first)[0])


@pytest.mark.parametrize("damage", [b"", b"garbage"])
def test_damaged_cache_is_ignored(damage):
    spec = EncoderSpec("clipsearch-tiny", "none", "cpu", "fp32")
    first = load_encoder(spec)
    (path,) = cached_files()
    path.write_bytes(damage)
    second = load_encoder(spec)
    for a, b in zip(embeddings(first), embeddings(second)):
        np.testing.assert_array_equal(a, b)


def test_cache_is_per_precision_and_keeps_the_verified_text_cut():
    bf16 = EncoderSpec("clipsearch-tiny", "none", "cpu", "bf16")
    first = load_encoder(bf16)
    second = load_encoder(bf16)  # from the bf16 cache file: no conversion, no re-verification
    assert first.text_truncation and second.text_truncation
    assert next(second.model.parameters()).dtype == torch.bfloat16
    for a, b in zip(embeddings(first), embeddings(second)):
        np.testing.assert_array_equal(a, b)
    fp32 = load_encoder(EncoderSpec("clipsearch-tiny", "none", "cpu", "fp32"))
    assert len(cached_files()) == 2 and next(fp32.model.parameters()).dtype == torch.float32
    for a, b in zip(embeddings(fp32), embeddings(second)):
        cosine = (a * b).sum(axis=1)
        assert cosine.min() >= 0.999


def test_abandoned_temp_files_are_cleaned():
    import os
    import time

    folder = built_model_folder(None)
    folder.mkdir(parents=True)
    old, fresh = folder / "old-build.tmp", folder / "fresh-build.tmp"
    for path in (old, fresh):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    load_encoder(EncoderSpec("clipsearch-tiny", "none", "cpu", "fp32"))
    assert not old.exists() and fresh.exists()
