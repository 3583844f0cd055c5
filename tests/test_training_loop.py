"""train(): loss goes down on a tiny captioned set, settings load from TOML with overrides, accumulation is exact,
tower locking and WiSE-FT endpoints hold, and the `train` command runs end to end (clipsearch-tiny, CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clipsearch.errors import ConfigError
from clipsearch.training import load_config, train
from clipsearch.training.checkpoints import list_checkpoints, load_checkpoint
from clipsearch.training.config import config_from_dict, config_to_dict, parse_overrides, save_config
from clipsearch.training.data import DataSpec
from tests.training_fixtures import colour_captions, tiny_config, train_rows


@pytest.fixture(scope="module")
def colours_csv(tmp_path_factory) -> Path:
    return colour_captions(tmp_path_factory.mktemp("colours"))


def _initial_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """clipsearch-tiny's random initial weights exactly as train() draws them for `seed`."""
    import open_clip

    from clipsearch.encoders.openclip import register_model_configs
    from clipsearch.training.loop import seed_everything

    register_model_configs()
    seed_everything(seed)
    model = open_clip.create_model("clipsearch-tiny", pretrained=None, device="cpu", output_dict=True)
    return model.state_dict()


def _export_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "open_clip_model.safetensors"))


def test_few_steps_reduce_the_loss_and_write_the_run_folder(colours_csv, tmp_path):
    config = tiny_config(colours_csv, tmp_path, "reduce", steps=16, warmup=2, holdout=8, eval_every=8)
    run = train(config)
    losses = [float(row["loss"]) for row in train_rows(run)]
    assert len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, losses
    for name in ("config.toml", "config.json", "train.csv", "eval.csv", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert [step for step, _ in list_checkpoints(run)] == [16]  # the last step is always saved
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["samples"] == 16 * 8 and summary["samples_per_s"] > 0
    recall = summary["eval"]["holdout"]["text_to_image_R@1"]
    assert 0.0 <= recall <= 1.0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the export loads with open_clip as a local-dir model
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    exported = _export_weights(run)
    assert torch.equal(model.state_dict()["logit_scale"], exported["logit_scale"])
    # the recorded config loads back to the same settings
    assert load_config(run / "config.toml") == config.resolved()


def test_config_toml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "clipsearch-tiny"\nlr = 1e-4\nsteps = 10\n\n[data]\npath = "train.csv"\nkind = "csv"\n\n'
                    '[[eval_sets]]\nimages_dir = "val"\nlabels_csv = "val/labels.csv"\n', encoding="utf-8")
    config = load_config(path, ["lr=3e-4", "data.caption_column=caption", "wise_ft_sweep=[0, 0.5, 1]", "lock_image=true",
                                "name=my run", "grad_clip=1"])
    assert config.lr == 3e-4 and config.steps == 10 and config.lock_image is True and config.name == "my run"
    assert config.data == DataSpec(path="train.csv", kind="csv", caption_column="caption")
    assert config.wise_ft_sweep == (0.0, 0.5, 1.0) and config.grad_clip == 1.0
    assert config.eval_sets[0].labels_csv == "val/labels.csv" and config.eval_sets[0].label == "val"
    assert config.total_batch == config.batch_size * config.accum_steps
    assert parse_overrides(["data.path=a b.csv"]) == {"data": {"path": "a b.csv"}}
    # a run folder's config.toml and config.json give back an equal config
    save_config(config, tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.toml") == config
    assert config_from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == config
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("override, message", [
    (["lrr=1"], "did you mean lr"),
    (["steps=many"], "whole number"),
    (["precision=fp8"], "precision must be one of"),
    (["wise_ft_alpha=1.5"], "outside [0, 1]"),
    (["batch_size=0"], "at least 1"),
    (["data.colour=x"], "unknown setting 'data.colour'"),
])
def test_bad_settings_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, override)
    assert message in str(caught.value)


def test_accumulation_matches_the_large_batch(colours_csv, tmp_path):
    """2 micro-batches of 4 with cached features give the loss and gradients of one batch of 8 (open_clip's scheme)."""
    common = dict(steps=1, checkpoint_every=1, export=False)
    big = train(tiny_config(colours_csv, tmp_path, "big", batch_size=8, **common))
    accumulated = train(tiny_config(colours_csv, tmp_path, "accum", batch_size=4, accum_steps=2, **common))
    assert float(train_rows(accumulated)[0]["loss"]) == pytest.approx(float(train_rows(big)[0]["loss"]), rel=1e-5)
    moments_big = load_checkpoint(list_checkpoints(big)[-1][1]).optimizer["state"]
    moments_acc = load_checkpoint(list_checkpoints(accumulated)[-1][1]).optimizer["state"]
    assert moments_big.keys() == moments_acc.keys()
    for key in moments_big:  # AdamW's first moment after one step is (1 - beta1) * gradient
        torch.testing.assert_close(moments_acc[key]["exp_avg"], moments_big[key]["exp_avg"], rtol=1e-4, atol=1e-8)


def test_locked_text_tower_bf16_and_grad_checkpointing(colours_csv, tmp_path):
    run = train(tiny_config(colours_csv, tmp_path, "locked", steps=2, lock_text=True, precision="bf16",
                            grad_checkpointing=True))
    before, after = _initial_weights(), _export_weights(run)
    text = [k for k in before if k.startswith(("transformer.", "token_embedding", "ln_final", "text_projection"))]
    image = [k for k in before if k.startswith("visual.")]
    assert text and image
    assert all(torch.equal(before[k], after[k]) for k in text)
    assert not all(torch.equal(before[k], after[k]) for k in image)
    assert all(float(row["loss"]) == float(row["loss"]) for row in train_rows(run))  # no NaN under bf16


def test_wise_ft_endpoints_through_train(colours_csv, tmp_path):
    """alpha 0 exports the starting weights exactly; the sweep's alpha-1 row scores the fine-tuned model itself."""
    run = train(tiny_config(colours_csv, tmp_path, "wise", steps=3, holdout=8, wise_ft_alpha=0.0,
                            wise_ft_sweep=(0.0, 1.0)))
    before, exported = _initial_weights(), _export_weights(run)
    assert before.keys() == exported.keys()
    assert all(torch.equal(before[k], exported[k]) for k in before)
    finetuned = load_checkpoint(list_checkpoints(run)[-1][1]).model
    assert not torch.equal(finetuned["visual.conv1.weight"], before["visual.conv1.weight"])
    summary = json.loads((run / "summary.json").read_text())
    rows = {row["alpha"]: row for row in summary["wise_ft_sweep"]}
    assert set(rows) == {0.0, 1.0}
    for metric, value in summary["eval"]["holdout"].items():
        assert rows[1.0][f"holdout/{metric}"] == value


def test_train_command_runs_and_reports_errors(colours_csv, tmp_path):
    from clipsearch.training.command import train_command

    runner = CliRunner()
    result = runner.invoke(train_command, ["--data", str(colours_csv), "--steps", "2", "--batch-size", "8",
                                           "--output", str(tmp_path), "--name", "cli", "--no-progress",
                                           "--set", "workers=0", "--set", "warmup=0", "--set", "tensorboard=false"])
    assert result.exit_code == 0, result.output
    assert f"run folder: {tmp_path / 'cli'}" in result.output
    assert (tmp_path / "cli" / "export" / "open_clip_config.json").is_file()
    assert len(train_rows(tmp_path / "cli")) == 2

    bad = runner.invoke(train_command, ["--data", str(colours_csv), "--set", "lerning_rate=1"])
    assert bad.exit_code == 2 and "unknown setting 'lerning_rate'" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(train_command, ["--steps", "1", "--output", str(tmp_path)])
    assert missing.exit_code != 0 and "no training data" in missing.output
