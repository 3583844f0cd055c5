"""Adaptive relevance cutoffs: which results of one query count as relevant, judged from that query's own scores.

A fixed similarity cutoff does not work for CLIP: typical scores differ between models, between queries ("a photo"
scores everything high, "a red bicycle" scores most photos low) and between libraries. What is stable is the shape:
most of a library is unrelated to a query and forms a bulk of similar scores; relevant photos stand out above it.
So the cutoff is the bulk's median plus `strictness` robust standard deviations (1.4826 x the median absolute
deviation, which the few relevant photos barely move), measured on a random sample of the library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_STRICTNESS = 3.0
MIN_STRICTNESS, MAX_STRICTNESS = 0.0, 10.0
SAMPLE_SIZE = 2000  # enough for median and MAD to within about 3% of their library-wide values
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
MIN_SPREAD = 1e-4  # a library of near-identical photos would otherwise make every difference "significant"


@dataclass(frozen=True)
class Cutoff:
    """A relevance cutoff and the score statistics it came from."""

    threshold: float
    median: float
    spread: float
    strictness: float

    def as_dict(self) -> dict:
        """JSON-ready form (a cutoff that lets everything through has threshold null)."""
        return {key: round(float(value), 6) + 0.0 if np.isfinite(value) else None for key, value in self.__dict__.items()}


def relevance_cutoff(sample_scores: np.ndarray, strictness: float = DEFAULT_STRICTNESS) -> Cutoff:
    """The score above which results count as relevant, from the query's scores on a sample of the library."""
    scores = np.asarray(sample_scores, dtype=np.float64).ravel()
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        return Cutoff(float("-inf"), 0.0, 0.0, strictness)
    median = float(np.median(scores))
    spread = max(MAD_TO_SIGMA * float(np.median(np.abs(scores - median))), MIN_SPREAD)
    return Cutoff(median + strictness * spread, median, spread, strictness)


def check_strictness(value: float) -> float:
    """The strictness if it is within range; ValueError otherwise."""
    value = float(value)
    if not (MIN_STRICTNESS <= value <= MAX_STRICTNESS):
        raise ValueError(f"relevance strictness must be between {MIN_STRICTNESS:g} and {MAX_STRICTNESS:g}, got {value:g}")
    return value
