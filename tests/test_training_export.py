"""Export: a trained model as an open_clip local-dir folder that open_clip, clipsearch's encoder and the
`clipsearch index` / `clipsearch search` commands all load to identical embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from clipsearch.encoders import EncoderSpec, load_encoder  # noqa: E402
from clipsearch.encoders.openclip import register_model_configs  # noqa: E402
from clipsearch.training.export import CONFIG_NAME, WEIGHTS_NAME, ExportError, export_open_clip_folder  # noqa: E402
from clipsearch.training.inmemory_encoder import ModelEncoder  # noqa: E402
from tests.fakes import make_image  # noqa: E402

TINY = "clipsearch-tiny"
TEXTS = ["a red square", "a photo of a blue sky", "green"]
COLOURS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def trained():
    """A tiny model whose weights differ from the seed-0 random init every loader would otherwise build."""
    register_model_configs()
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))
    model.train()  # as it would be mid-training: the encoder and export must not depend on the mode
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer(TINY)


@pytest.fixture(scope="module")
def in_memory(trained, tokenizer):
    return ModelEncoder.for_open_clip(trained, TINY, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 70 - 5 * i, 3), dtype=np.uint8)) for i in range(4)]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_open_clip_folder(trained, TINY, tmp_path_factory.mktemp("run") / "export", info={"step": 7})


def _embeddings(encoder, images):
    return encoder.encode_images([encoder.preprocess(im) for im in images]), encoder.encode_texts(TEXTS)


def test_folder_layout_and_config(exported, trained):
    assert sorted(p.name for p in exported.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    config = json.loads((exported / CONFIG_NAME).read_text())
    assert config["model_cfg"] == open_clip.get_model_config(TINY)
    assert config["preprocess_cfg"]["mean"] == list(trained.visual.preprocess_cfg["mean"])
    assert config["clipsearch"] == {"source_model": TINY, "step": 7}
    assert trained.training  # exporting left the model's mode alone


def test_open_clip_loads_the_export(exported, trained, in_memory, images):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    loaded, original = model.state_dict(), trained.state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
    model.eval()
    with torch.no_grad():
        image_vectors = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        text_vectors = model.encode_text(open_clip.get_tokenizer(f"local-dir:{exported}")(TEXTS), normalize=True)
    mine_images, mine_texts = _embeddings(in_memory, images)
    np.testing.assert_array_equal(image_vectors.numpy(), mine_images)
    np.testing.assert_array_equal(text_vectors.numpy(), mine_texts)


def test_clipsearch_encoder_loads_the_export(exported, in_memory, images):
    encoder = load_encoder(EncoderSpec("ViT-B-32", f"local-dir:{exported}", device="cpu", precision="fp32"))
    assert encoder.model_id == f"local-dir:{exported.resolve()}"
    assert (encoder.dim, encoder.image_size) == (in_memory.dim, in_memory.image_size) == (64, 64)
    theirs, mine = _embeddings(encoder, images), _embeddings(in_memory, images)
    np.testing.assert_allclose(theirs[0], mine[0], atol=1e-6)
    np.testing.assert_allclose(theirs[1], mine[1], atol=1e-6)  # clipsearch cuts padding off texts: same result


def test_export_to_index_to_search_round_trip(exported, in_memory, tmp_path):
    from click.testing import CliRunner

    from clipsearch.cli import main

    photos = tmp_path / "photos"
    paths = [make_image(photos / f"{colour}.png", colour, noise=n + 1) for n, colour in enumerate(COLOURS)]
    env = {"CLIPSEARCH_DATA_DIR": str(tmp_path / "library")}
    runner = CliRunner()
    result = runner.invoke(main, ["index", str(photos), "--pretrained", f"local-dir:{exported}", "--device", "cpu",
                                  "--precision", "fp32"], env=env)
    assert result.exit_code == 0, result.output
    assert "added 4" in result.output

    # search uses the library's recorded model: the export folder, loaded afresh
    result = runner.invoke(main, ["search", "a red square", "--json", "-k", "4", "--precision", "fp32", "--local"],
                           env=env)
    assert result.exit_code == 0, result.output
    hits = {hit["path"]: hit["score"] for hit in json.loads(result.stdout)}
    assert set(hits) == {str(p) for p in paths}

    from PIL import Image

    image_vectors = in_memory.encode_images([in_memory.preprocess(Image.open(p).convert("RGB")) for p in paths])
    expected = image_vectors @ in_memory.encode_texts(["a red square"])[0]
    for path, score in zip(paths, expected):
        assert hits[str(path)] == pytest.approx(float(score), abs=1e-5)

    result = runner.invoke(main, ["status", "--json"], env=env)
    assert json.loads(result.stdout)["model"] == f"local-dir:{exported.resolve()}"


def test_reexport_replaces_and_foreign_folders_are_refused(trained, tmp_path):
    out = export_open_clip_folder(trained, TINY, tmp_path / "export")
    first = (out / WEIGHTS_NAME).read_bytes()
    changed = open_clip.create_model(TINY)
    export_open_clip_folder(changed, TINY, out)
    assert (out / WEIGHTS_NAME).read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    busy = tmp_path / "photos"
    busy.mkdir()
    (busy / "holiday.jpg").write_bytes(b"not mine to delete")
    with pytest.raises(ExportError, match="other files") as info:
        export_open_clip_folder(trained, TINY, busy)
    assert "new or empty folder" in info.value.hint
    assert (busy / "holiday.jpg").read_bytes() == b"not mine to delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "photos"]


def test_a_config_that_does_not_match_the_weights_is_caught(trained, tmp_path):
    wrong = open_clip.get_model_config(TINY)
    wrong["embed_dim"] = 32
    with pytest.raises(ExportError, match="does not describe") as info:
        export_open_clip_folder(trained, TINY, tmp_path / "export", model_cfg=wrong)
    assert "model_cfg" in info.value.hint
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ExportError, match="no config for model"):
        export_open_clip_folder(trained, "no-such-model", tmp_path / "export")


def test_build_time_options_tied_weights_and_half_precision(images, tmp_path):
    # Options open_clip applies at build time are in no config file: the export must record them.
    torch.manual_seed(5)
    model = open_clip.create_model(TINY, force_quick_gelu=True, force_image_size=32, force_context_length=40).eval()
    blocks = model.transformer.resblocks
    blocks[1].mlp.c_fc.weight = blocks[0].mlp.c_fc.weight  # tied tensors, which safetensors refuses to share
    out = export_open_clip_folder(model, TINY, tmp_path / "export")
    model_cfg = json.loads((out / CONFIG_NAME).read_text())["model_cfg"]
    assert model_cfg["quick_gelu"] is True
    assert (model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]["context_length"]) == (32, 40)
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert preprocess(images[0]).shape == (3, 32, 32)
    short = open_clip.get_tokenizer(f"local-dir:{out}")
    assert short(TEXTS).shape == (len(TEXTS), 40)
    theirs = _embeddings(ModelEncoder.for_open_clip(loaded, TINY, tokenizer=short), images)
    mine = _embeddings(ModelEncoder.for_open_clip(model, TINY, tokenizer=short), images)
    np.testing.assert_array_equal(theirs[0], mine[0])
    np.testing.assert_array_equal(theirs[1], mine[1])

    from safetensors.torch import load_file

    half = export_open_clip_folder(model, TINY, tmp_path / "half", dtype=torch.float16)
    assert {t.dtype for t in load_file(str(half / WEIGHTS_NAME)).values()} == {torch.float16}
    assert (half / WEIGHTS_NAME).stat().st_size < 0.6 * (out / WEIGHTS_NAME).stat().st_size
    open_clip.create_model(f"local-dir:{half}")  # loads (cast back to fp32)


def test_hugging_face_tokenizer_files_travel_with_the_export(trained, tmp_path):
    # open_clip's local-dir: loads an HF tokenizer from the folder itself, so the export must hold its files.
    class SavingTokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    model_cfg = open_clip.get_model_config(TINY)
    model_cfg["text_cfg"]["hf_tokenizer_name"] = "example/tokenizer"
    out = export_open_clip_folder(trained, TINY, tmp_path / "export", model_cfg=model_cfg, tokenizer=SavingTokenizer())
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(ExportError, match="cannot save them"):
        export_open_clip_folder(trained, TINY, tmp_path / "other", model_cfg=model_cfg, tokenizer=lambda texts: None)


def test_in_memory_encoder_restores_training_modes(trained, tokenizer):
    trained.train()
    trained.visual.eval()  # e.g. a locked image tower kept in eval mode
    encoder = ModelEncoder(trained, lambda im: im, tokenizer)
    assert encoder.encode_texts(["x"]).shape == (1, 64) and encoder.encode_texts([]).shape == (0, 64)
    assert trained.training and trained.transformer.training and not trained.visual.training
    assert not any(p.grad is not None for p in trained.parameters())
    with pytest.raises(TypeError):
        encoder.encode_texts("one string")
    trained.train()
