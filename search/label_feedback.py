"""Reviews of labels: a person confirms or rejects a photo holding a label, and the label learns from it.

A review is stored (label_reviews) and the label's set is re-applied from the stored vectors: confirmed photos
become the label's prototype and, with rejected ones, tune its cutoff (clipsearch.search.label_calibration). The
precision estimate is the share of reviewed members that were confirmed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select

from clipsearch.catalog import Catalog, ImageRow
from clipsearch.errors import QueryError
from clipsearch.label_tables import LabelCalibrationRow, LabelReviewRow
from clipsearch.search import label_calibration as calib
from clipsearch.search.label_sets import label_id
from clipsearch.search.labels import ApplyReport, EncoderSource, apply_set

VERDICTS = ("confirm", "reject")


def review(catalog: Catalog, set_name: str, name: str, image_id: int, verdict: str | None,
           encoder: EncoderSource = None) -> ApplyReport:
    """Record (or, with verdict None, withdraw) a verdict on a photo for a label, then relabel the label's set."""
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
    return apply_set(catalog, set_name, encoder)


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
    with catalog.read() as session:
        counts = dict(session.execute(select(LabelReviewRow.verdict, func.count())
                                      .where(LabelReviewRow.label_id == label).group_by(LabelReviewRow.verdict)).all())
        row = session.get(LabelCalibrationRow, (label, model["model_id"])) if model else None
    confirmed, rejected = counts.get("confirm", 0), counts.get("reject", 0)
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
    counts: dict[int, dict[str, int]] = {int(i): {} for i in label_ids}
    with catalog.read() as session:
        rows = session.execute(select(LabelReviewRow.label_id, LabelReviewRow.verdict, func.count())
                               .where(LabelReviewRow.label_id.in_(list(counts)))
                               .group_by(LabelReviewRow.label_id, LabelReviewRow.verdict))
        for label, verdict, n in rows:
            counts[label][verdict] = n
    return {label: calib.precision_estimate(c.get("confirm", 0), c.get("reject", 0)) for label, c in counts.items()}

