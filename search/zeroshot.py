"""Zero-shot classification and retrieval metrics over embedding arrays (CLIP paper / CLIP_benchmark definitions).

Small functions over numpy arrays, no I/O beyond `load_templates`. Rankings break ties by the lower index
(a stable sort), so results are deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from clipsearch.encoders import normalize_rows
from clipsearch.errors import ConfigError

__all__ = [
    "DEFAULT_TEMPLATES",
    "accuracy_at",
    "class_embeddings",
    "load_templates",
    "logits",
    "mean_per_class_recall",
    "retrieval_recall",
    "softmax",
    "topk_predictions",
]

# A subset of the CLIP paper's ImageNet prompt templates (the "photo" ones).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a bad photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of one {}.",
    "a photo of many {}.",
    "itap of a {}.",
)


def load_templates(path: str | Path) -> list[str]:
    """Prompt templates from a text file: one a line, each containing `{}`; blank lines and `#` lines skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the templates file {path}: {e}", "give a UTF-8 text file, one template a line") from e
    templates = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise ConfigError(f"{path}:{number}: template {line!r} has no {{}} for the class name",
                              'write each template with {} where the class name goes, e.g. "a photo of a {}."')
        templates.append(line)
    if not templates:
        raise ConfigError(f"the templates file {path} holds no templates", 'one a line, e.g. "a photo of a {}."')
    return templates


def class_embeddings(encoder, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """[n_classes, d] zero-shot weights: every prompt encoded and L2-normalised, averaged per class, renormalised."""
    if not classnames:
        raise ConfigError("no class names to classify into", "the labels file must name at least one class")
    if not templates:
        raise ConfigError("no prompt templates", 'give at least one template such as "a photo of a {}."')
    prompts = [template.format(name) for name in classnames for template in templates]
    parts = [np.asarray(encoder.encode_texts(prompts[i:i + batch_size]), dtype=np.float32)
             for i in range(0, len(prompts), max(1, batch_size))]
    vectors = normalize_rows(np.concatenate(parts, axis=0))
    per_class = vectors.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return normalize_rows(per_class)


def logits(image_vectors: np.ndarray, class_vectors: np.ndarray, logit_scale: float = 100.0) -> np.ndarray:
    """[n_images, n_classes] scaled cosine similarities (rows of both inputs are L2-normalised)."""
    return logit_scale * (np.asarray(image_vectors, np.float32) @ np.asarray(class_vectors, np.float32).T)


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along `axis`."""
    scores = np.asarray(scores, dtype=np.float64)
    shifted = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return (shifted / shifted.sum(axis=axis, keepdims=True)).astype(np.float32)


def topk_predictions(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, min(k, n_columns)] column indices by descending score; ties go to the lower index."""
    scores = np.asarray(scores)
    k = max(0, min(int(k), scores.shape[1]))
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def accuracy_at(scores: np.ndarray, labels: Sequence[int], k: int) -> float:
    """Fraction of rows whose true label is among the top k scores (k above the class count counts all classes)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    top = topk_predictions(scores, k)
    return float((top == labels[:, None]).any(axis=1).mean())


def mean_per_class_recall(predictions: Sequence[int], labels: Sequence[int], n_classes: int) -> float:
    """Balanced accuracy: the mean over classes present in `labels` of the fraction of that class predicted right."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    recalls = [float((predictions[labels == c] == c).mean()) for c in range(n_classes) if (labels == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def retrieval_recall(image_vectors: np.ndarray, text_vectors: np.ndarray, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways, as in the CLIP paper.

    text→image: a caption counts when its own image is among its top k images.
    image→text: an image counts when ANY of its captions is among its top k captions.
    Returns {"text_to_image_R@k": ..., "image_to_text_R@k": ...} for every k.
    """
    images = np.asarray(image_vectors, np.float32)
    texts = np.asarray(text_vectors, np.float32)
    owner = np.asarray(text_to_image, dtype=np.int64)
    if len(owner) != len(texts):
        raise ValueError("text_to_image needs one image index per text")
    max_k = max(ks)
    text_hits = np.zeros((len(texts), len(ks)), dtype=bool)
    for start in range(0, len(texts), chunk):
        top = topk_predictions(texts[start:start + chunk] @ images.T, max_k)
        found = top == owner[start:start + chunk, None]
        for j, k in enumerate(ks):
            text_hits[start:start + chunk, j] = found[:, :k].any(axis=1)
    image_hits = np.zeros((len(images), len(ks)), dtype=bool)
    for start in range(0, len(images), chunk):
        top = topk_predictions(images[start:start + chunk] @ texts.T, max_k)
        found = owner[top] == np.arange(start, start + len(top))[:, None]
        for j, k in enumerate(ks):
            image_hits[start:start + chunk, j] = found[:, :k].any(axis=1)
    result: dict[str, float] = {}
    for j, k in enumerate(ks):
        result[f"text_to_image_R@{k}"] = float(text_hits[:, j].mean()) if len(texts) else float("nan")
    for j, k in enumerate(ks):
        result[f"image_to_text_R@{k}"] = float(image_hits[:, j].mean()) if len(images) else float("nan")
    return result
