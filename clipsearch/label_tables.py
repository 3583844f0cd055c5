"""Catalog tables of zero-shot labels: label sets, labels, cached text classifiers, calibrations, candidates, members, reviews.

Registered on the catalog's `Base`; the migrations (clipsearch/migrations) create them. Catalog.__init__ imports
this module; this module imports only `Base` and `utcnow` from the catalog. Rows are removed by foreign keys
(PostgreSQL always, SQLite with PRAGMA foreign_keys=ON): deleting an image drops its memberships and reviews,
deleting a label drops its classifiers, calibrations, memberships and reviews, deleting a set drops its labels.
The logic lives in clipsearch.search.label_sets (editing), .labels (classifying) and .label_feedback (reviews).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from clipsearch.catalog import Base, utcnow


class LabelSetRow(Base):
    """A named set of labels that compete with each other (softmax within the set)."""

    __tablename__ = "label_sets"
    name: Mapped[str] = mapped_column(String, primary_key=True)
    templates: Mapped[str | None] = mapped_column(String)  # JSON list of "{}" templates; null: the default CLIP ones
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class LabelRow(Base):
    """One label: a name, optional prompts (used instead of templates x name) and an optional probability threshold."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("set_name", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    set_name: Mapped[str] = mapped_column(ForeignKey("label_sets.name", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String)
    prompts: Mapped[str | None] = mapped_column(String)  # JSON list, or null
    threshold: Mapped[float | None] = mapped_column(Float)  # null: DEFAULT_THRESHOLD


class LabelClassifierRow(Base):
    """Cached text classifier of a label for one model; `key` hashes every text that went into it."""

    __tablename__ = "label_classifiers"
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String, primary_key=True)
    key: Mapped[str] = mapped_column(String)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    logit_scale: Mapped[float] = mapped_column(Float)


class LabelCalibrationRow(Base):
    """How a label's strength is measured for one model, from its last apply over the library and its feedback.

    strength = (1 - proto_weight) x (text similarity - text_median) / text_spread
               + proto_weight x (similarity to the confirmed photos' prototype - proto_median) / proto_spread
    and a photo passes when strength >= cutoff. Without feedback: proto_weight 0 and the default cutoff.
    """

    __tablename__ = "label_calibration"
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String, primary_key=True)
    text_median: Mapped[float] = mapped_column(Float)
    text_spread: Mapped[float] = mapped_column(Float)
    prototype: Mapped[bytes | None] = mapped_column(LargeBinary)  # unit mean of confirmed photos' vectors, or null
    proto_median: Mapped[float] = mapped_column(Float, default=0.0)
    proto_spread: Mapped[float] = mapped_column(Float, default=1.0)
    proto_weight: Mapped[float] = mapped_column(Float, default=0.0)
    cutoff: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class LabelMemberRow(Base):
    """A label held by an image: probability within its set, strength (see LabelCalibrationRow), and why."""

    __tablename__ = "label_members"
    __table_args__ = (Index("ix_label_members_label_strength", "label_id", "strength"),)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    probability: Mapped[float] = mapped_column(Float)
    strength: Mapped[float] = mapped_column(Float)
    confirmed: Mapped[bool] = mapped_column(Boolean, default=False)  # held because the user confirmed it


class LabelCandidateRow(Base):
    """A photo passing a label's probability threshold within its set (which reviews never change): the photos a
    review has to rescore, so that a review reads these vectors rather than the whole library's."""

    __tablename__ = "label_candidates"
    __table_args__ = (Index("ix_label_candidates_label", "label_id"),)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    probability: Mapped[float] = mapped_column(Float)


class LabelReviewRow(Base):
    """A user's verdict on a photo holding a label: 'confirm' or 'reject' (feedback for tuning and precision)."""

    __tablename__ = "label_reviews"
    __table_args__ = (Index("ix_label_reviews_label", "label_id"),)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    verdict: Mapped[str] = mapped_column(String)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

