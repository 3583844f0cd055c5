"""Catalog tables of zero-shot labels (issue 6): label sets, labels, cached text classifiers, assignments, feedback.

Registered on the catalog's `Base`, so every Catalog creates them (`create_all` adds missing tables to existing
libraries too). Catalog.__init__ imports this module; this module imports only `Base` and `utcnow` from the catalog.
Rows are removed by SQLite foreign keys (PRAGMA foreign_keys=ON): deleting an image drops its assignments and
feedback, deleting a label drops its classifiers, assignments and feedback, deleting a set drops its labels.
The logic lives in clipsearch.search.labels.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
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
    # Adaptive similarity floor measured on the library at the last full apply (reused for new photos).
    floor: Mapped[float | None] = mapped_column(Float)


class LabelAssignmentRow(Base):
    """A label given to an image: softmax probability within its set, and raw cosine similarity."""

    __tablename__ = "label_assignments"
    __table_args__ = (Index("ix_label_assignments_label_score", "label_id", "score"),)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    similarity: Mapped[float] = mapped_column(Float)


class LabelFeedbackRow(Base):
    """A user's verdict on one assignment ('confirm' or 'reject'); storage for the feedback step (not used yet)."""

    __tablename__ = "label_feedback"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), primary_key=True)
    verdict: Mapped[str] = mapped_column(String)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
