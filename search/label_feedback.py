"""Reviews of labels: a person confirms or rejects a photo holding a label, and the label learns from it.

A review is stored (label_reviews) and the label is rescored: confirmed photos become the label's prototype and,
with rejected ones, tune its cutoff (clipsearch.search.label_calibration). Reviews never change probabilities within
the set (those come from the text classifiers alone), so only the label's candidates (photos passing its threshold,
kept by the last apply) and its confirmed photos are rescored, not the whole library; the result equals a full
apply of the set (tested). The precision estimate is the share of reviewed members that were confirmed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select

import numpy as np

from clipsearch.catalog import Catalog, ImageRow
from clipsearch.errors import QueryError
from clipsearch.label_tables import LabelCalibrationRow, LabelCandidateRow, LabelMemberRow, LabelReviewRow
from clipsearch.search import label_calibration as calib
from clipsearch.search import labels
from clipsearch.search.label_sets import label_id, label_sets

VERDICTS = ("confirm", "reject")


def review(catalog: Catalog, set_name: str, name: str, image_id: int, verdict: str | None,
           encoder: labels.EncoderSource = None) -> int:
    """Record (or, with verdict None, withdraw) a verdict on a photo for a label, then rescore the label.

    Returns how many photos hold the label now.
    """
    if verdict is not None and verdict not in VERDICTS:
        raise QueryError(f"unknown verdict {str(verdict)[:20]!r}", "use confirm or reject (or clear to withdraw)")
    label = label_id(catalog, set_name, name)
    with catalog.write() as session:
        if session.get(ImageRow, int(image_id)) is None:
            raise QueryError(f"no image with id {image_id} in the library", "review a photo shown on the label page")
        if verdict is None:
            session.execute(delete(LabelReviewRow).where(LabelReviewRow.label_id == label,
                                                         LabelReviewRow.image_id == int(image_id)))
        else:
            session.merge(LabelReviewRow(label_id=label, image_id=int(image_id), verdict=verdict))
    return relabel_label(catalog, set_name, name, encoder)


def relabel_label(catalog: Catalog, set_name: str, name: str, encoder: labels.EncoderSource = None,
                  rng_seed: int = 0) -> int:
    """Rescore one label after its reviews changed: prototype, cutoff, members. Photos holding it now.

    Falls back to a full apply of the set when the set has not been applied with the library's model yet.
    """
    model_id = labels.library_model_id(catalog)
    (label_set,) = label_sets(catalog, set_name, with_counts=False)
    classifier = labels.set_classifier(catalog, label_set, model_id, encoder)
    cal = labels.stored_calibration(catalog, classifier, model_id)
    n = next(i for i, spec in enumerate(classifier.labels) if spec.name == name)
    label = classifier.labels[n]
    if cal is None:
        return labels.apply_set(catalog, set_name, encoder, rng_seed=rng_seed).assigned.get(name, 0)
    reviews = labels.reviews_of(catalog, [label.id])
    prototypes, weights = labels.build_prototypes(catalog, model_id, [label], reviews, classifier.matrix.shape[1])
    cal.prototypes[n], cal.proto_weight[n] = prototypes[0], weights[0]
    sample = labels.library_sample(catalog, model_id, rng_seed) if weights[0] > 0 else None  # only a prototype needs it
    median, spread = labels.prototype_stats(sample, prototypes, weights)
    cal.proto_median[n], cal.proto_spread[n] = median[0], spread[0]
    labels.tune_cutoffs(catalog, model_id, classifier, cal, reviews, columns=[n])
    confirmed, rejected = (set(group) for group in reviews[label.id])
    with catalog.read() as session:
        candidates = set(session.scalars(select(LabelCandidateRow.image_id).where(LabelCandidateRow.label_id == label.id)))
    ids, vectors = catalog.vectors(model_id, sorted(candidates | confirmed))
    members = labels.Members.empty()
    if len(ids):
        probs, z = cal.score(vectors, classifier)
        pinned = np.isin(ids, np.fromiter(confirmed, np.int64, len(confirmed)))
        dropped = np.isin(ids, np.fromiter(rejected, np.int64, len(rejected)))
        held = (probs[:, n] >= classifier.thresholds[n]) & (z[:, n] >= cal.cutoff[n]) & ~pinned & ~dropped
        for rows, is_confirmed in ((np.nonzero(held)[0], False), (np.nonzero(pinned)[0], True)):
            members.add(ids[rows], np.full(len(rows), n), probs[rows, n], z[rows, n], confirmed=is_confirmed)
    with catalog.write() as session:
        session.execute(delete(LabelMemberRow).where(LabelMemberRow.label_id == label.id))
        written, _ = members.write(session, classifier)
        labels.save_calibration(session, classifier, model_id, cal, columns=[n])
    return int(len(written))


def reviewed_photos(catalog: Catalog, set_name: str, name: str, verdict: str, k: int | None = 50,
                    offset: int = 0) -> list[dict[str, Any]]:
    """Photos given a verdict for a label, latest first: [{"id", "path", "verdict", "at"}]."""
    if verdict not in VERDICTS:
        raise QueryError(f"unknown verdict {str(verdict)[:20]!r}", "use confirm or reject")
    label = label_id(catalog, set_name, name)
    query = (select(ImageRow.id, ImageRow.path, LabelReviewRow.at)
             .join(ImageRow, ImageRow.id == LabelReviewRow.image_id)
             .where(LabelReviewRow.label_id == label, LabelReviewRow.verdict == verdict)
             .order_by(LabelReviewRow.at.desc(), ImageRow.id).offset(offset))
    if k is not None:
        query = query.limit(k)
    with catalog.read() as session:
        return [{"id": i, "path": p, "verdict": verdict, "at": at.isoformat(timespec="seconds")}
                for i, p, at in session.execute(query)]


def label_quality(catalog: Catalog, set_name: str, name: str) -> dict[str, Any]:
    """A label's reviews, precision estimate and current calibration (cutoff, prototype weight) for the library model."""
    label = label_id(catalog, set_name, name)
    model = catalog.library_model()
    confirmed, rejected = _verdict_counts(catalog, [label])[label]
    with catalog.read() as session:
        row = session.get(LabelCalibrationRow, (label, model["model_id"])) if model else None
    return {
        "confirmed": confirmed,
        "rejected": rejected,
        "precision": calib.precision_estimate(confirmed, rejected),
        "cutoff": round(row.cutoff, 4) if row else None,
        "default_cutoff": calib.DEFAULT_CUTOFF,
        "prototype_weight": round(row.proto_weight, 4) if row else 0.0,
        "applied": row is not None,
    }


def qualities(catalog: Catalog, label_ids: list[int]) -> dict[int, dict[str, Any] | None]:
    """Precision estimates of many labels at once (the /labels overview): {label id: estimate or None}."""
    return {label: calib.precision_estimate(*counts) for label, counts in _verdict_counts(catalog, label_ids).items()}


def _verdict_counts(catalog: Catalog, label_ids: list[int]) -> dict[int, tuple[int, int]]:
    """{label id: (confirmed, rejected)} in one query."""
    counts: dict[int, dict[str, int]] = {int(i): {} for i in label_ids}
    with catalog.read() as session:
        rows = session.execute(select(LabelReviewRow.label_id, LabelReviewRow.verdict, func.count())
                               .where(LabelReviewRow.label_id.in_(list(counts)))
                               .group_by(LabelReviewRow.label_id, LabelReviewRow.verdict))
        for label, verdict, n in rows:
            counts[label][verdict] = n
    return {label: (c.get("confirm", 0), c.get("reject", 0)) for label, c in counts.items()}

