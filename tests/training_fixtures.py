"""Tiny synthetic training data for the training tests: solid-colour images captioned with their colour's name."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.fakes import PALETTE, make_image

TRAIN_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")


def colour_captions(root: Path, per_colour: int = 4, colours=TRAIN_COLOURS) -> Path:
    """Write root/images/*.png and root/train.csv (filepath,title); returns the CSV path."""
    rows = []
    for colour in colours:
        for i in range(per_colour):
            name = f"images/{colour}{i}.png"
            make_image(root / name, PALETTE[colour], size=(24, 24), noise=1 + i + 17 * len(rows))
            rows.append((name, f"a photo of the colour {colour}"))
    path = root / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return path


def tiny_config(data_csv: Path, output: Path, name: str, **overrides):
    """A seconds-long clipsearch-tiny config on the colour captions (no bar, no TensorBoard, no workers)."""
    from clipsearch.training import TrainConfig
    from clipsearch.training.data import DataSpec

    settings = dict(data=DataSpec(path=str(data_csv)), batch_size=8, steps=4, lr=1e-3, warmup=1, workers=0,
                    output=str(output), name=name, progress=False, tensorboard=False, precision="fp32",
                    checkpoint_every=0, eval_limit=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def train_rows(run_dir: Path) -> list[dict[str, str]]:
    """The run's train.csv rows."""
    from clipsearch.training.logs import read_csv_rows

    return read_csv_rows(Path(run_dir) / "train.csv")
