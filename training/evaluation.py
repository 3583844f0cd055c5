"""Evaluation during training with `clipsearch eval`'s own code: zero-shot top-1/5 and retrieval recall@k.

The live model is wrapped in ModelEncoder, so the numbers are those `clipsearch eval` gives for the exported model.
Eval sets are folders in `clipsearch eval`'s layout: the configured `eval_sets`, plus the held-out split of the
training data written out once into RUN/holdout.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from clipsearch.search import evaluation, zeroshot
from clipsearch.training.config import EvalSetSpec, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["EvalRunner", "holdout_eval_sets"]

HOLDOUT_DIR = "holdout"


def holdout_eval_sets(heldout: Any, run_dir: Path) -> list[EvalSetSpec]:
    """The held-out split as eval sets: zero-shot for class data, retrieval for captions (files under RUN/holdout)."""
    if heldout is None:
        return []
    from clipsearch.training.data import eval_sets_from

    out = Path(run_dir) / HOLDOUT_DIR
    written = eval_sets_from(heldout, out)
    sets = []
    if written.labels_csv:
        templates_file = None
        if written.templates:  # the training captions' own templates make the zero-shot classifier
            templates_file = out / "templates.txt"
            templates_file.write_text("".join(f"{t}\n" for t in written.templates), encoding="utf-8")
        sets.append(EvalSetSpec(images_dir=str(written.images_dir), labels_csv=str(written.labels_csv),
                                classes_file=str(written.classes_file) if written.classes_file else None,
                                templates_file=str(templates_file) if templates_file else None, name="holdout"))
    if written.captions_csv:
        sets.append(EvalSetSpec(images_dir=str(written.images_dir), captions_csv=str(written.captions_csv),
                                name="holdout-retrieval" if written.labels_csv else "holdout"))
    log.info("held-out eval: %d images under %s", written.n_images, out)
    return sets


class EvalRunner:
    """Scores a model on every eval set; `evaluate(model)` -> {set name: {metric: value}}."""

    def __init__(self, config: TrainConfig, preprocess, tokenizer, device: torch.device, holdout_sets: list[EvalSetSpec],
                 autocast_dtype: torch.dtype | None = None):
        self.config = config
        self.autocast_dtype = autocast_dtype
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.sets = list(holdout_sets) + list(config.eval_sets)
        names = [s.label for s in self.sets]
        for i, spec in enumerate(self.sets):  # two sets named alike would mix their curves
            if names.count(spec.label) > 1:
                self.sets[i] = dataclasses.replace(spec, name=f"{spec.label}-{i}")
        self.templates = {s.label: zeroshot.load_templates(s.templates_file) if s.templates_file else None
                          for s in self.sets}

    def evaluate(self, model: torch.nn.Module, *, step: int | None) -> dict[str, dict[str, float]]:
        """Every eval set's metrics for `model` (left in eval mode; the training step switches back)."""
        from clipsearch.training.inmemory_encoder import ModelEncoder

        encoder = ModelEncoder(model, self.preprocess, self.tokenizer, device=str(self.device),
                               model_id=f"training@{step}" if step is not None else "training",
                               autocast_dtype=self.autocast_dtype)
        results: dict[str, dict[str, float]] = {}
        workers = max(1, self.config.workers)
        for spec in self.sets:
            limit = spec.limit if spec.limit is not None else (self.config.eval_limit or None)
            if spec.labels_csv:
                report = evaluation.evaluate_zeroshot(encoder, spec.images_dir, spec.labels_csv,
                                                      classes_file=spec.classes_file, templates=self.templates[spec.label],
                                                      limit=limit, workers=workers)
            else:
                report = evaluation.evaluate_retrieval(encoder, spec.images_dir, spec.captions_csv, limit=limit,
                                                       workers=workers)
            if report.get("n_failed"):
                log.warning("eval set %s: %d images could not be read", spec.label, report["n_failed"])
            results[spec.label] = {k: float(v) for k, v in report["metrics"].items()}
        return results
