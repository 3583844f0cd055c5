"""WiSE-FT: α = 0 and α = 1 give the endpoint weights bit for bit (non-float buffers too), α = 0.5 the midpoint;
the sweep evaluates each blend without touching the models it was given."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")

from clipsearch.errors import ConfigError  # noqa: E402
from clipsearch.training.wise_ft import interpolate_weights, wise_ft_sweep  # noqa: E402

TINY = "clipsearch-tiny"


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (torch.equal says -0.0 == 0.0; this does not)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def _state_dicts():
    g = torch.Generator().manual_seed(0)
    original = {
        "weight": torch.randn(3, 4, generator=g),
        "signed_zero": torch.tensor([-0.0, 0.0, -0.0]),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "double": torch.randn(2, generator=g, dtype=torch.float64),
        "counter": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
    }
    finetuned = {
        "weight": torch.randn(3, 4, generator=g),
        "signed_zero": torch.tensor([-0.0, -0.0, 0.0]),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "double": torch.randn(2, generator=g, dtype=torch.float64),
        "counter": torch.tensor(123),
        "mask": torch.tensor([False, False, True]),
    }
    return original, finetuned


def test_endpoints_are_exact_copies():
    original, finetuned = _state_dicts()
    for alpha, expected in ((0, original), (0.0, original), (1, finetuned), (1.0, finetuned)):
        blended = interpolate_weights(original, finetuned, alpha)
        assert blended.keys() == expected.keys()
        for name, tensor in blended.items():
            assert bitwise_equal(tensor, expected[name]), (alpha, name)
            assert tensor.data_ptr() != expected[name].data_ptr()  # copies: training on will not alter the inputs


def test_midpoint_and_non_float_buffers():
    original, finetuned = _state_dicts()
    half = interpolate_weights(original, finetuned, 0.5)
    torch.testing.assert_close(half["weight"], (original["weight"] + finetuned["weight"]) / 2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(half["double"], (original["double"] + finetuned["double"]) / 2, rtol=1e-15, atol=1e-15)
    assert half["half"].dtype == torch.bfloat16  # blended in fp32, stored back in the weights' own dtype
    torch.testing.assert_close(half["half"], ((original["half"].float() + finetuned["half"].float()) / 2).bfloat16())
    assert half["counter"].item() == 123 and half["mask"].tolist() == [False, False, True]  # nearer endpoint
    quarter = interpolate_weights(original, finetuned, 0.25)
    assert quarter["counter"].item() == 7 and quarter["mask"].tolist() == [True, False, True]
    torch.testing.assert_close(quarter["weight"], 0.75 * original["weight"] + 0.25 * finetuned["weight"])


def test_incompatible_weights_and_alphas_are_refused():
    original, finetuned = _state_dicts()
    with pytest.raises(ConfigError, match="between 0 and 1"):
        interpolate_weights(original, finetuned, 1.5)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        interpolate_weights(original, finetuned, float("nan"))
    with pytest.raises(ConfigError, match="only in fine-tuned: \\['extra'\\]"):
        interpolate_weights(original, {**finetuned, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(ConfigError, match="shape"):
        interpolate_weights(original, {**finetuned, "weight": torch.zeros(4, 3)}, 0.5)


@pytest.fixture(scope="module")
def tiny_pair():
    """Two tiny open_clip models: a 'pretrained' one and a 'fine-tuned' one with other weights."""
    import open_clip

    from clipsearch.encoders.openclip import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    original = open_clip.create_model(TINY)
    torch.manual_seed(1)
    finetuned = open_clip.create_model(TINY)
    return original.eval(), finetuned.eval()


@functools.cache
def _tokenizer():
    import open_clip

    return open_clip.get_tokenizer(TINY)


def _embed(model, texts=("a photo of a dog", "a red car")) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(_tokenizer()(list(texts)))


def test_sweep_evaluates_each_blend_and_leaves_the_models_alone(tiny_pair, tmp_path):
    from PIL import Image

    from clipsearch.search.evaluation import evaluate_zeroshot
    from clipsearch.training.inmemory_encoder import ModelEncoder

    original, finetuned = tiny_pair
    before = {name: t.clone() for name, t in finetuned.state_dict().items()}
    images = tmp_path / "images"
    images.mkdir()
    rows = ["relative_path,label"]
    for i, (label, colour) in enumerate((("red", (220, 20, 20)), ("blue", (20, 20, 220))) * 2):
        Image.new("RGB", (40, 30), colour).save(images / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")

    seen = {}

    def evaluate(model):
        seen[len(seen)] = _embed(model)
        encoder = ModelEncoder.for_open_clip(model, TINY, tokenizer=_tokenizer())
        report = evaluate_zeroshot(encoder, images, tmp_path / "labels.csv", templates=["a photo of a {}."], workers=1)
        return {"top1": report["metrics"]["top1"], "n_evaluated": report["n_evaluated"]}

    results = wise_ft_sweep(original, finetuned, [0.0, 0.5, 1.0], evaluate)
    assert [row["alpha"] for row in results] == [0.0, 0.5, 1.0]
    assert all(row["n_evaluated"] == 4 and 0.0 <= row["top1"] <= 1.0 for row in results)
    assert torch.equal(seen[0], _embed(original)) and torch.equal(seen[2], _embed(finetuned))
    assert not torch.allclose(seen[1], seen[0]) and not torch.allclose(seen[1], seen[2])
    after = finetuned.state_dict()
    assert all(bitwise_equal(after[name], tensor) for name, tensor in before.items())


def test_sweep_accepts_a_state_dict_and_checks_its_inputs(tiny_pair):
    original, finetuned = tiny_pair
    rows = wise_ft_sweep(original.state_dict(), finetuned, [1.0], lambda model: {"norm": float(_embed(model).norm())})
    assert rows == [{"alpha": 1.0, "norm": float(_embed(finetuned).norm())}]
    with pytest.raises(ConfigError, match="at least one alpha"):
        wise_ft_sweep(original, finetuned, [], lambda model: {})
    with pytest.raises(ValueError, match="alpha"):
        wise_ft_sweep(original, finetuned, [0.5], lambda model: {"alpha": 1})
