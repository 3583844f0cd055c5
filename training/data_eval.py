"""Turn a held-out TrainData split into the files `clipsearch eval` reads, so training evaluates with the same code.

    train, held = data.split(0.05, seed)
    sets = eval_sets_from(held, run_dir / "eval-data")
    if sets.labels_csv:    evaluate_zeroshot(encoder, sets.images_dir, sets.labels_csv,
                                             classes_file=sets.classes_file, templates=sets.templates)
    if sets.captions_csv:  evaluate_retrieval(encoder, sets.images_dir, sets.captions_csv)

(clipsearch.search.evaluation). Image files are referenced where they lie; images inside shards are written out
once, as their original bytes, under OUT/images.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from clipsearch.training.data_sources import SampleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSets:
    """A held-out split as a labels CSV (zero-shot) and/or a captions CSV (retrieval) over `images_dir`."""

    images_dir: Path
    labels_csv: Path | None  # relative_path,label: evaluation.evaluate_zeroshot
    classes_file: Path | None  # class names in label order, one a line
    captions_csv: Path | None  # relative_path,caption (every caption of an image): evaluation.evaluate_retrieval
    templates: tuple[str, ...]  # the data's caption templates (class data), for the zero-shot classifier
    n_images: int


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "sample"


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _image_reference(source, s: int, images_dir: Path, out_images: Path) -> str:
    """The image's path relative to images_dir (written out first when it lives inside a shard)."""
    if hasattr(source, "paths"):
        path = Path(source.paths[s])
        try:
            return path.relative_to(images_dir).as_posix()
        except ValueError:
            return str(path)  # outside the folder: absolute (pathlib joins keep it as is)
    name = f"{_safe_name(source.sample_id(s))}.{source.image_extension(s)}"
    target = out_images / name
    data = source.image(s)
    if not target.is_file() or target.stat().st_size != len(data):
        target.write_bytes(data)
    return f"images/{name}"


def _all_captions(source, s: int) -> list[str]:
    try:
        return source.captions(s)
    except SampleError:
        return []


def eval_sets_from(data, out_dir: str | os.PathLike) -> EvalSets:
    """Write `data` (usually the held-out part of TrainData.split) as eval inputs under out_dir; see the module doc."""
    source = data.source
    out = Path(out_dir)
    out_images = out / "images"
    out_images.mkdir(parents=True, exist_ok=True)
    images_dir = Path(source.root) if hasattr(source, "root") else out
    labelled = bool(data.class_names) and source.labels is not None
    label_rows, caption_rows, skipped = [], [], []
    for s in (int(i) for i in data.indices):
        try:
            reference = _image_reference(source, s, images_dir, out_images)
        except SampleError as e:
            skipped.append((source.sample_id(s), e.reason))
            continue
        if labelled and source.labels[s] >= 0:
            label_rows.append((reference, data.class_names[source.labels[s]]))
        if not data.class_mode:
            caption_rows.extend((reference, caption) for caption in _all_captions(source, s))
    if skipped:
        log.warning("%d held-out sample(s) could not be written for evaluation, e.g. %s", len(skipped), skipped[0])
    labels_csv = classes_file = captions_csv = None
    if label_rows:
        labels_csv = _write_csv(out / "labels.csv", ("relative_path", "label"), label_rows)
        classes_file = out / "classes.txt"
        classes_file.write_text("".join(f"{name}\n" for name in data.class_names), encoding="utf-8")
    if caption_rows:
        captions_csv = _write_csv(out / "captions.csv", ("relative_path", "caption"), caption_rows)
    n_images = len({r for r, _ in label_rows} | {r for r, _ in caption_rows})
    return EvalSets(images_dir, labels_csv, classes_file, captions_csv, tuple(data.templates), n_images)
