"""Evaluate an encoder on a labelled image folder (zero-shot classification) or a captioned one (retrieval).

Dataset layouts: a labels CSV with `relative_path,label` (other columns ignored) and optionally a classes file;
a captions CSV with `relative_path,caption` (several rows per image allowed). Paths are relative to the images
folder. Unreadable or missing images are reported in the result and skipped; evaluation goes on without them.
"""

from __future__ import annotations

import csv
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipsearch.errors import ConfigError, ImageDecodeError
from clipsearch.images import open_image
from clipsearch.search import zeroshot

DEFAULT_MAX_PIXELS = 100_000_000


@dataclass
class LabelledSet:
    """Images with integer labels into `classnames`."""

    paths: list[str]
    labels: list[int]
    classnames: list[str]


@dataclass
class CaptionedSet:
    """Unique images, and captions each pointing at its image by index."""

    paths: list[str]
    captions: list[str]
    text_to_image: list[int]


@dataclass
class EmbeddedImages:
    vectors: np.ndarray  # [n_ok, d]
    ok: list[int]  # indices into the input paths that embedded
    failures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def _read_csv(path: str | Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise ConfigError(
                    f"{path} lacks the column(s) {', '.join(missing)} (it has: {', '.join(columns) or 'none'})",
                    f"a {what} CSV needs a header row with {', '.join(required)}",
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"cannot read the {what} file {path}: {e}", f"give a UTF-8 CSV with {', '.join(required)}") from e
    rows = [row for row in rows if row.get(required[0])]
    if not rows:
        raise ConfigError(f"the {what} file {path} has no rows", f"give a CSV with {', '.join(required)} and one row per item")
    return rows


def read_classes(path: str | Path) -> list[str]:
    """Class names in order: a CSV with a `label` column (e.g. wnid,label), or a text file with one name a line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the classes file {path}: {e}", "one class name a line, or a CSV with a label column") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and "label" in [c.strip() for c in next(csv.reader([lines[0]]))]:
        names = [row["label"] for row in _read_csv(path, ("label",), "classes")]
    else:
        names = lines
    if not names:
        raise ConfigError(f"the classes file {path} names no classes", "one class name a line")
    if len(set(names)) != len(names):
        raise ConfigError(f"the classes file {path} names a class twice", "each class name once")
    return names


def read_labels(labels_csv: str | Path, classes_file: str | Path | None = None) -> LabelledSet:
    """The labelled images of a `relative_path,label` CSV; classes from `classes_file`, else the sorted labels."""
    rows = _read_csv(labels_csv, ("relative_path", "label"), "labels")
    classnames = read_classes(classes_file) if classes_file else sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(classnames)}
    unknown = sorted({row["label"] for row in rows} - set(index))
    if unknown:
        raise ConfigError(f"{labels_csv} uses label(s) the classes file lacks: {', '.join(unknown[:5])}",
                          "add them to the classes file, or leave --classes out to take the classes from the labels")
    return LabelledSet([row["relative_path"] for row in rows], [index[row["label"]] for row in rows], classnames)


def read_captions(captions_csv: str | Path) -> CaptionedSet:
    """The images and captions of a `relative_path,caption` CSV (images in first-seen order)."""
    rows = _read_csv(captions_csv, ("relative_path", "caption"), "captions")
    image_index: dict[str, int] = {}
    captions, owners = [], []
    for row in rows:
        if not row["caption"]:
            continue
        owners.append(image_index.setdefault(row["relative_path"], len(image_index)))
        captions.append(row["caption"])
    return CaptionedSet(list(image_index), captions, owners)


def balanced_subset(labels: Sequence[int], limit: int | None) -> list[int]:
    """Indices of at most `limit` items: the first of each class in turn (round robin), in file order."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for members in by_class.values():
            if depth < len(members) and len(chosen) < limit:
                chosen.append(members[depth])
        depth += 1
    return sorted(chosen)


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(n) (all of them when limit is None or not smaller)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, max(limit, 1))})


def subset_labels(data: LabelledSet, limit: int | None) -> LabelledSet:
    keep = balanced_subset(data.labels, limit)
    return LabelledSet([data.paths[i] for i in keep], [data.labels[i] for i in keep], data.classnames)


def subset_captions(data: CaptionedSet, limit: int | None) -> CaptionedSet:
    keep = evenly_spaced(len(data.paths), limit)
    new_index = {old: new for new, old in enumerate(keep)}
    pairs = [(c, new_index[o]) for c, o in zip(data.captions, data.text_to_image) if o in new_index]
    return CaptionedSet([data.paths[i] for i in keep], [c for c, _ in pairs], [o for _, o in pairs])


def embed_images(encoder, images_dir: str | Path, paths: Sequence[str], *, batch_size: int = 32, workers: int = 4,
                 max_pixels: int = DEFAULT_MAX_PIXELS, progress: Callable[[int], None] | None = None) -> EmbeddedImages:
    """Embed images under `images_dir` in batches, decoding in `workers` threads; failures reported and skipped."""
    root = Path(images_dir)
    batch_size = max(1, batch_size)

    def load(relative: str):
        path = root / relative
        if not path.is_file():
            return ImageDecodeError("missing file", path=str(path))
        try:
            image, _ = open_image(path, max_pixels=max_pixels, target_size=encoder.image_size)
            return encoder.preprocess(image)
        except ImageDecodeError as e:
            return e
        except Exception as e:  # a preprocess failure on one odd image must not end the evaluation
            return ImageDecodeError(f"cannot preprocess ({type(e).__name__}: {e})", path=str(path))

    vectors, ok, failures = [], [], []
    batches = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(load, paths[i]) for i in batches[0]] if batches else []
        for b, batch in enumerate(batches):
            results = [f.result() for f in pending]
            # decode the next batch while this one is encoded
            pending = [pool.submit(load, paths[i]) for i in batches[b + 1]] if b + 1 < len(batches) else []
            inputs = []
            for i, result in zip(batch, results):
                if isinstance(result, ImageDecodeError):
                    failures.append((paths[i], result.reason))
                else:
                    inputs.append(result)
                    ok.append(i)
            if inputs:
                vectors.append(np.asarray(encoder.encode_images(inputs), dtype=np.float32))
            if progress:
                progress(len(batch))
    dim = getattr(encoder, "dim", 0)
    stacked = np.concatenate(vectors, axis=0) if vectors else np.zeros((0, dim), np.float32)
    return EmbeddedImages(stacked, ok, failures)


def _failures(items: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"path": path, "reason": reason} for path, reason in items]


def evaluate_zeroshot(encoder, images_dir: str | Path, labels_csv: str | Path, *, classes_file: str | Path | None = None,
                      templates: Sequence[str] | None = None, limit: int | None = None, batch_size: int = 32,
                      workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Zero-shot classification of a labelled folder: top-1, top-5, mean per-class recall (JSON-ready dict)."""
    data = subset_labels(read_labels(labels_csv, classes_file), limit)
    templates = list(templates or zeroshot.DEFAULT_TEMPLATES)
    started = time.perf_counter()
    class_vectors = zeroshot.class_embeddings(encoder, data.classnames, templates)
    embed_started = time.perf_counter()
    embedded = embed_images(encoder, images_dir, data.paths, batch_size=batch_size, workers=workers,
                            max_pixels=max_pixels, progress=progress)
    embed_seconds = time.perf_counter() - embed_started
    labels = np.asarray([data.labels[i] for i in embedded.ok], dtype=np.int64)
    scores = zeroshot.logits(embedded.vectors, class_vectors)
    predictions = zeroshot.topk_predictions(scores, 1)[:, 0] if len(labels) else np.zeros(0, np.int64)
    n_classes = len(data.classnames)
    seconds = time.perf_counter() - started
    return {
        "task": "zeroshot",
        "model": encoder.model_id,
        "images_dir": str(images_dir),
        "labels": str(labels_csv),
        "metrics": {
            "top1": zeroshot.accuracy_at(scores, labels, 1),
            "top5": zeroshot.accuracy_at(scores, labels, 5),
            "mean_per_class_recall": zeroshot.mean_per_class_recall(predictions, labels, n_classes),
        },
        "chance_top1": 1.0 / n_classes,
        "n_classes": n_classes,
        "n_templates": len(templates),
        "n_images": len(data.paths),
        "n_evaluated": len(embedded.ok),
        "n_failed": len(embedded.failures),
        "failures": _failures(embedded.failures),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(data.paths) / embed_seconds, 2) if embed_seconds > 0 else None,
    }


def evaluate_retrieval(encoder, images_dir: str | Path, captions_csv: str | Path, *, limit: int | None = None,
                       ks: Sequence[int] = (1, 5, 10), batch_size: int = 32, workers: int = 4,
                       max_pixels: int = DEFAULT_MAX_PIXELS, progress: Callable[[int], None] | None = None) -> dict:
    """Text↔image retrieval recall@k over a captioned folder (JSON-ready dict); failed images drop with their captions."""
    data = subset_captions(read_captions(captions_csv), limit)
    started = time.perf_counter()
    embedded = embed_images(encoder, images_dir, data.paths, batch_size=batch_size, workers=workers,
                            max_pixels=max_pixels, progress=progress)
    embed_seconds = time.perf_counter() - started
    new_index = {old: new for new, old in enumerate(embedded.ok)}
    pairs = [(c, new_index[o]) for c, o in zip(data.captions, data.text_to_image) if o in new_index]
    captions = [c for c, _ in pairs]
    text_vectors = np.concatenate(
        [np.asarray(encoder.encode_texts(captions[i:i + 256]), np.float32) for i in range(0, len(captions), 256)], axis=0
    ) if captions else np.zeros((0, embedded.vectors.shape[1]), np.float32)
    metrics = zeroshot.retrieval_recall(embedded.vectors, text_vectors, [o for _, o in pairs], ks)
    seconds = time.perf_counter() - started
    return {
        "task": "retrieval",
        "model": encoder.model_id,
        "images_dir": str(images_dir),
        "captions": str(captions_csv),
        "metrics": metrics,
        "n_images": len(data.paths),
        "n_evaluated": len(embedded.ok),
        "n_captions": len(captions),
        "n_failed": len(embedded.failures),
        "failures": _failures(embedded.failures),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(data.paths) / embed_seconds, 2) if embed_seconds > 0 else None,
    }
