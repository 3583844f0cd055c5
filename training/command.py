"""`clipsearch train`: the click command (torch and the training code are imported only when it runs)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from clipsearch.cli_common import reports_errors

EPILOG = """\b
Examples:
  clipsearch train --data photos.csv --pretrained laion2b_s34b_b79k --model ViT-B-32 --lock-image
  clipsearch train --config run.toml --set lr=1e-4 --set data.path=shards/train-{0000..0004}.tar.gz
  clipsearch train --resume runs/20250101-120000-ViT-B-32        (continue from its newest checkpoint)
  torchrun --nproc-per-node 2 -m clipsearch train --config run.toml (data-parallel)

\b
The run folder holds config.toml (reuse with --config), checkpoints/, train.csv, eval.csv, curves.png,
summary.json and export/ (load with `clipsearch index --pretrained local-dir:RUN/export`)."""


def _alphas(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.25,0.5,0.75,1") from None


def _eval_set(folder: str) -> dict:
    """An eval set from a folder in `clipsearch eval`'s layout: labels.csv (+ classes.txt) or captions.csv in it."""
    root = Path(folder).expanduser()
    spec: dict = {"images_dir": str(root)}
    if (root / "labels.csv").is_file():
        spec["labels_csv"] = str(root / "labels.csv")
        if (root / "classes.txt").is_file():
            spec["classes_file"] = str(root / "classes.txt")
    elif (root / "captions.csv").is_file():
        spec["captions_csv"] = str(root / "captions.csv")
    else:
        raise click.BadParameter(f"{root} holds neither labels.csv (relative_path,label) nor captions.csv "
                                 "(relative_path,caption)", param_hint="--eval-set")
    return spec


@click.command("train", short_help="Train or fine-tune CLIP encoders on your images and captions.", epilog=EPILOG)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file of training settings (see TrainConfig); the flags below override it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any setting, dotted for tables: --set lr=1e-4 --set data.kind=webdataset. Repeatable.")
@click.option("--data", help="Training data: CSV/TSV (filepath,title), image folder, or WebDataset shards.")
@click.option("--model", help="open_clip architecture, e.g. ViT-B-32 (default clipsearch-tiny).")
@click.option("--pretrained", help="Start from these weights: tag, file, hf-hub:…, local-dir:…; none = from scratch.")
@click.option("--steps", type=int, help="Optimiser steps (instead of epochs).")
@click.option("--epochs", type=int, help="Epochs over the data.")
@click.option("--batch-size", type=int, help="Global batch size per micro-batch.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--holdout", type=float, help="Hold out this fraction (or number) of samples for evaluation.")
@click.option("--eval-set", "eval_sets", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Also evaluate on this folder (labels.csv [+ classes.txt] or captions.csv, as `clipsearch eval` "
                   "reads). Repeatable; the reference side of --wise-ft-sweep.")
@click.option("--eval-every", type=int, help="Evaluate every N steps (default: only at the end).")
@click.option("--lock-image/--no-lock-image", default=None, help="LiT: freeze the image tower.")
@click.option("--lock-text/--no-lock-text", default=None, help="Freeze the text tower.")
@click.option("--output", type=click.Path(file_okay=False), help="Folder that holds run folders (default runs).")
@click.option("--name", help="Run folder name (default: date-time and model).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="Where to train.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Autocast precision.")
@click.option("--resume", help="Continue a run: a checkpoint file, a run folder, or 'latest'.")
@click.option("--wise-ft-alpha", type=float, help="Export (1-α)·original + α·fine-tuned weights.")
@click.option("--wise-ft-sweep", help="Evaluate these WiSE-FT alphas at the end, e.g. 0,0.25,0.5,0.75,1.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@reports_errors
def train_command(config_path, overrides, data, model, pretrained, steps, epochs, batch_size, lr, holdout, eval_sets,
                  eval_every, lock_image, lock_text, output, name, device, precision, resume, wise_ft_alpha, wise_ft_sweep, no_progress):
    """Train CLIP image and text encoders from scratch, or adapt pretrained ones, with the contrastive loss.

    Settings come from --config (TOML), then --set KEY=VALUE, then the flags. The exported model loads straight
    into `clipsearch index --pretrained local-dir:RUN/export`.
    """
    from clipsearch.training.config import load_config, merge_settings, parse_overrides

    flags = {"model": model, "pretrained": pretrained, "steps": steps, "epochs": epochs, "batch_size": batch_size,
             "lr": lr, "holdout": holdout, "eval_every": eval_every, "lock_image": lock_image, "lock_text": lock_text, "output": output,
             "name": name, "device": device, "precision": precision, "resume": resume,
             "wise_ft_alpha": wise_ft_alpha, "wise_ft_sweep": _alphas(wise_ft_sweep)}
    values = {k: v for k, v in flags.items() if v is not None}
    if data is not None:
        values["data"] = {"path": data}
    if eval_sets:
        values["eval_sets"] = [_eval_set(folder) for folder in eval_sets]
    if no_progress:
        values["progress"] = False
    if config_path is None and resume and resume != "latest" and Path(resume).expanduser().exists():
        # resuming without --config: take the settings the run itself recorded
        from clipsearch.training.checkpoints import find_checkpoint, run_dir_of

        recorded = run_dir_of(find_checkpoint(resume, ".")) / "config.toml"
        config_path = recorded if recorded.is_file() else None
    config = load_config(config_path, merge_settings(parse_overrides(overrides), values))

    from clipsearch.training.loop import train

    run_dir = train(config)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    click.echo(f"run folder: {run_dir}")
    export = run_dir / "export"
    if export.is_dir():
        click.echo(f"exported model: {export}  (clipsearch index --pretrained local-dir:{export})")
