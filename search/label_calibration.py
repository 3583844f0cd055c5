"""The arithmetic of zero-shot labels, over plain arrays: set softmax, label strength, cutoff tuning, precision.

A label's *strength* on a photo says how far the photo stands out from the library for that label, in robust
standard deviations: (similarity - median) / (1.4826 x MAD) over a library sample (the idea of
search.relevance). Once the user confirms photos of a label, its strength blends in the same measure against the
*prototype* of the confirmed photos (their normalised mean vector) — Tip-Adapter's idea of adding a cache of
labelled image features to the text classifier, here as one prototype per label. Both parts are standardised on the
library before blending because image-image and text-image cosines live on different scales (CLIP's modality gap):
a raw blend would raise every photo's score, not the relevant ones'.

A photo holds a label when its probability within the set passes the label's threshold (the zero-shot set decides
*which* label fits) and its strength passes the label's cutoff (DEFAULT_CUTOFF, then tuned by reviews: how sure it
must be). Confirmed photos always hold their label and rejected ones never do.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from clipsearch.search.relevance import MAD_TO_SIGMA

DEFAULT_CUTOFF = 3.0  # robust SDs above the library's median, as search's relevance cutoff (DEFAULT_STRICTNESS)
# Smallest spread a label uses: CLIP cosines of one text against unrelated photos spread by about 0.02-0.03, so
# this binds only in degenerate libraries (near-identical photos, or a label scoring the bulk identically).
MIN_SPREAD = 0.01
PROTOTYPE_PRIOR = 4.0  # confirmed photos worth as much as the text classifier: w = n / (n + PRIOR)
MAX_PROTOTYPE_WEIGHT = 0.75  # the text keeps a say: a handful of photos should not redefine the label
CUTOFF_MARGIN = 0.25  # how far (in strength) a tuned cutoff stays from the reviewed photo that set it
# The default cutoff counts as this many reviews: one rejected photo at the top of a label page must not empty the
# label, nor one confirmed outlier flood it; consistent reviews move the cutoff most of the way.
CUTOFF_PRIOR_REVIEWS = 3.0


def softmax_within_set(similarities: np.ndarray, logit_scale: float) -> np.ndarray:
    """Probabilities [n, L] of each label within its set, CLIP-style: softmax of scaled cosine similarities."""
    logits = np.asarray(similarities, np.float32) * np.float32(logit_scale)
    logits = logits - logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def robust_stats(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median, spread) per column of a sample of similarities; spread = 1.4826 x MAD, at least MIN_SPREAD."""
    sample = np.asarray(sample, np.float64)
    if sample.ndim != 2 or not len(sample):
        width = sample.shape[1] if sample.ndim == 2 else 0
        return np.zeros(width), np.ones(width)
    median = np.median(sample, axis=0)
    spread = np.maximum(MAD_TO_SIGMA * np.median(np.abs(sample - median), axis=0), MIN_SPREAD)
    return median, spread


def prototype(vectors: np.ndarray) -> np.ndarray | None:
    """The unit mean of unit vectors (confirmed photos), or None without any."""
    vectors = np.asarray(vectors, np.float32)
    if not len(vectors):
        return None
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm).astype(np.float32) if norm > 0 else None


def prototype_weight(confirmed: int) -> float:
    """How much the confirmed photos' prototype counts against the text classifier."""
    return min(MAX_PROTOTYPE_WEIGHT, confirmed / (confirmed + PROTOTYPE_PRIOR)) if confirmed > 0 else 0.0


def strengths(text_sims: np.ndarray, text_median: np.ndarray, text_spread: np.ndarray,
              proto_sims: np.ndarray | None = None, proto_median: np.ndarray | None = None,
              proto_spread: np.ndarray | None = None, proto_weight: np.ndarray | None = None) -> np.ndarray:
    """Strength [n, L] of each label on each photo; prototype arrays cover the same L columns (weight 0: unused)."""
    z = (np.asarray(text_sims, np.float64) - text_median) / text_spread
    if proto_sims is not None and proto_weight is not None and np.any(proto_weight > 0):
        w = np.asarray(proto_weight, np.float64)
        zp = (np.asarray(proto_sims, np.float64) - proto_median) / proto_spread
        z = np.where(w > 0, (1.0 - w) * z + w * zp, z)
    return z.astype(np.float32)


def tune_cutoff(confirmed: Sequence[float], rejected: Sequence[float], default: float = DEFAULT_CUTOFF,
                margin: float = CUTOFF_MARGIN, prior_reviews: float = CUTOFF_PRIOR_REVIEWS) -> float:
    """The strength cutoff the reviews call for, shrunk toward the default by the weight of the reviews.

    Among cutoffs making the fewest mistakes (a confirmed photo below it, a rejected one at or above it) the best is
    the one closest to `default`; candidates are the default, each confirmed strength - margin, each rejected
    strength + margin and midpoints between neighbouring strengths. The result is the average of that best cutoff
    (weight: the number of reviews) and the default (weight: prior_reviews). Without reviews: the default.
    """
    pos = np.asarray(confirmed, np.float64)
    neg = np.asarray(rejected, np.float64)
    if not len(pos) and not len(neg):
        return float(default)
    values = np.unique(np.concatenate([pos, neg]))
    candidates = np.concatenate([[default], pos - margin, neg + margin, (values[1:] + values[:-1]) / 2.0])
    mistakes = (pos[None, :] < candidates[:, None]).sum(axis=1) + (neg[None, :] >= candidates[:, None]).sum(axis=1)
    best = candidates[mistakes == mistakes.min()]
    fitted = float(best[np.argmin(np.abs(best - default))])
    n = len(pos) + len(neg)
    return (n * fitted + prior_reviews * default) / (n + prior_reviews)


def precision_estimate(confirmed: int, rejected: int, z: float = 1.96) -> dict | None:
    """Share of reviewed members that were right, with its Wilson score interval; None before any review.

    Reviews are given to photos holding the label (label and image pages show only those), so confirmed / reviewed
    estimates the label's precision. People review the top of a label page first, which makes it optimistic.
    """
    n = confirmed + rejected
    if n <= 0:
        return None
    p = confirmed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"precision": round(p, 4), "low": round(max(0.0, centre - half), 4), "high": round(min(1.0, centre + half), 4),
            "reviewed": n, "confirmed": confirmed, "rejected": rejected}
