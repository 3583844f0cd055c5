"""Label sets as the user edits and reads them: presets, adding/removing labels, counts, members of a label.

A label set is a group of labels that compete (softmax within the set); a label has a name, optional prompts and an
optional probability threshold. Classifying lives in clipsearch.search.labels, reviews in .label_feedback.
Set names cannot hold "/" (label pages and filters name a label as SET/LABEL); label names can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

from sqlalchemy import delete, func, select

from clipsearch.catalog import Catalog, ImageRow
from clipsearch.errors import ConfigError, QueryError
from clipsearch.label_tables import LabelMemberRow, LabelReviewRow, LabelRow, LabelSetRow
from clipsearch.search.request import parse_label_reference

DEFAULT_THRESHOLD = 0.5
MAX_NAME_LENGTH = 100
MAX_PROMPTS = 50


@dataclass
class LabelSpec:
    """A label as the user sees it."""

    name: str
    prompts: list[str] | None = None
    threshold: float | None = None
    id: int | None = None
    count: int = 0  # photos holding it

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLD

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "prompts": self.prompts, "threshold": self.threshold,
                "effective_threshold": self.effective_threshold, "photos": self.count}


@dataclass
class LabelSet:
    """A named set of labels and its templates (None: the default templates)."""

    name: str
    templates: list[str] | None = None
    labels: list[LabelSpec] = field(default_factory=list)

    def label(self, name: str) -> LabelSpec:
        """One label of the set by name (QueryError when absent)."""
        for label in self.labels:
            if label.name == name:
                return label
        raise unknown_label(self.name, name)

    def as_dict(self) -> dict:
        return {"name": self.name, "templates": self.templates, "labels": [label.as_dict() for label in self.labels]}


# --- presets ----------------------------------------------------------------------------------------
def presets() -> dict[str, dict]:
    """The shipped presets: {set name: {"description", "labels": [{"name", "prompts"?, "threshold"?}]}}."""
    text = resources.files("clipsearch.search").joinpath("label_presets.json").read_text(encoding="utf-8")
    return json.loads(text)


# --- editing ----------------------------------------------------------------------------------------
def clean_name(value: str | None, what: str) -> str:
    """A set or label name, stripped; ConfigError when empty, too long, or a set name holding '/'."""
    value = (value or "").strip()
    if not value:
        raise ConfigError(f"the {what} name is empty", f"give the {what} a name, e.g. clipsearch labels add scenes beach")
    if len(value) > MAX_NAME_LENGTH or any(ord(ch) < 32 for ch in value):
        raise ConfigError(f"the {what} name {value[:40]!r}... is too long or holds control characters",
                          f"use a short name (at most {MAX_NAME_LENGTH} characters)")
    if what == "label set" and "/" in value:
        raise ConfigError(f"the label set name {value!r} holds '/'", "labels are named SET/LABEL: use another name")
    return value


def check_threshold(value: float | None) -> float | None:
    """A probability threshold in [0, 1], or None for the default."""
    if value is not None and not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"a label threshold is a probability between 0 and 1, got {value:g}", "e.g. --threshold 0.3")
    return None if value is None else float(value)


def check_templates(templates: Sequence[str] | None) -> list[str] | None:
    """Templates each holding '{}' for the label name, or None for the default ones."""
    templates = [t.strip() for t in templates or () if t and t.strip()]
    if not templates:
        return None
    for template in templates:
        if "{}" not in template:
            raise ConfigError(f"template {template!r} has no {{}} for the label name", 'e.g. --template "a photo of a {}."')
    return templates


def clean_prompts(prompts: Sequence[str] | None) -> list[str] | None:
    """Non-empty prompts (at most MAX_PROMPTS), or None."""
    prompts = [p.strip() for p in prompts or () if p and p.strip()]
    if len(prompts) > MAX_PROMPTS:
        raise ConfigError(f"a label has at most {MAX_PROMPTS} prompts, got {len(prompts)}", "keep the most telling ones")
    return prompts or None


def add_label(catalog: Catalog, set_name: str, name: str, prompts: Sequence[str] | None = None,
              threshold: float | None = None, templates: Sequence[str] | None = None) -> bool:
    """Create or edit a label (creating its set if needed). prompts/threshold/templates left None keep their values.

    Returns True when the label is new.
    """
    set_name, name = clean_name(set_name, "label set"), clean_name(name, "label")
    threshold = check_threshold(threshold)
    templates = check_templates(templates)
    prompts = clean_prompts(prompts)
    with catalog.write() as session:
        label_set = session.get(LabelSetRow, set_name)
        if label_set is None:
            session.add(LabelSetRow(name=set_name, templates=json.dumps(templates) if templates else None))
            session.flush()
        elif templates:
            label_set.templates = json.dumps(templates)
        row = session.scalars(select(LabelRow).where(LabelRow.set_name == set_name, LabelRow.name == name)).first()
        if row is None:
            session.add(LabelRow(set_name=set_name, name=name, prompts=json.dumps(prompts) if prompts else None,
                                 threshold=threshold))
            return True
        if prompts is not None:
            row.prompts = json.dumps(prompts)
        if threshold is not None:
            row.threshold = threshold
        return False


def edit_label(catalog: Catalog, set_name: str, name: str, *, new_name: str | None = None,
               prompts: Sequence[str] | None = None, threshold: float | None = None,
               clear_threshold: bool = False) -> None:
    """Change a label as a form does: rename it, replace its prompts ([] or None clears them), set/clear its threshold."""
    new_name = clean_name(new_name, "label") if new_name is not None else None
    threshold = check_threshold(threshold)
    prompts = clean_prompts(prompts)
    with catalog.write() as session:
        row = _label_row(session, set_name, name)
        if new_name and new_name != row.name:
            clash = session.scalar(select(LabelRow.id).where(LabelRow.set_name == set_name, LabelRow.name == new_name))
            if clash is not None:
                raise ConfigError(f"the set {set_name!r} already has a label {new_name!r}", "choose another name")
            row.name = new_name
        row.prompts = json.dumps(prompts) if prompts else None
        if clear_threshold:
            row.threshold = None
        elif threshold is not None:
            row.threshold = threshold


def install_preset(catalog: Catalog, preset: str) -> dict[str, int]:
    """Install a preset set ("all": every one); labels already there are kept as edited. {set: labels added}."""
    available = presets()
    names = list(available) if preset == "all" else [preset]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"no label preset {unknown[0]!r}", f"presets: {', '.join(available)} (or all)")
    added: dict[str, int] = {}
    for set_name in names:
        added[set_name] = 0
        for label in available[set_name]["labels"]:
            added[set_name] += add_label(catalog, set_name, label["name"], label.get("prompts"), label.get("threshold"))
    return added


def remove(catalog: Catalog, set_name: str, name: str | None = None) -> None:
    """Remove a whole set, or one label of it (its members, classifiers and reviews go with it)."""
    with catalog.write() as session:
        if session.get(LabelSetRow, set_name) is None:
            raise unknown_set(catalog, set_name, session)
        if name is None:
            session.execute(delete(LabelSetRow).where(LabelSetRow.name == set_name))
            return
        found = session.execute(delete(LabelRow).where(LabelRow.set_name == set_name, LabelRow.name == name))
        if not found.rowcount:
            raise unknown_label(set_name, name)


# --- reading ----------------------------------------------------------------------------------------
def unknown_set(catalog: Catalog | None, set_name: str, session=None) -> QueryError:
    """The error for a set name that does not exist, listing those that do."""
    if session is not None:
        known = list(session.scalars(select(LabelSetRow.name).order_by(LabelSetRow.name)))
    else:
        known = set_names(catalog)
    return QueryError(f"no label set {set_name!r}",
                      f"sets: {', '.join(known)}" if known else "add one: clipsearch labels add --preset scenes")


def unknown_label(set_name: str, name: str) -> QueryError:
    """The error for a label name its set does not have."""
    return QueryError(f"the label set {set_name!r} has no label {name!r}", f"clipsearch labels show {set_name} lists them")


def _label_row(session, set_name: str, name: str) -> LabelRow:
    row = session.scalars(select(LabelRow).where(LabelRow.set_name == set_name, LabelRow.name == name)).first()
    if row is None:
        if session.get(LabelSetRow, set_name) is None:
            raise unknown_set(None, set_name, session)
        raise unknown_label(set_name, name)
    return row


def label_id(catalog: Catalog, set_name: str, name: str) -> int:
    """The id of SET/LABEL (QueryError when either is unknown)."""
    with catalog.read() as session:
        return _label_row(session, set_name, name).id


def label_ids_of(catalog: Catalog, references: Sequence[str]) -> tuple[int, ...]:
    """Ids of labels named "SET/LABEL" (search filters); QueryError for a malformed or unknown one."""
    return tuple(sorted({label_id(catalog, *parse_label_reference(reference)) for reference in references}))


def set_names(catalog: Catalog) -> list[str]:
    """Names of every label set, sorted."""
    with catalog.read() as session:
        return list(session.scalars(select(LabelSetRow.name).order_by(LabelSetRow.name)))


def label_sets(catalog: Catalog, set_name: str | None = None, with_counts: bool = True) -> list[LabelSet]:
    """Every set (or one; QueryError when unknown), with labels and (unless with_counts=False) how many photos hold each."""
    with catalog.read() as session:
        query = select(LabelSetRow).order_by(LabelSetRow.name)
        if set_name is not None:
            query = query.where(LabelSetRow.name == set_name)
        sets = list(session.scalars(query))
        if set_name is not None and not sets:
            raise unknown_set(catalog, set_name, session)
        if not sets:
            return []
        counts = dict(session.execute(
            select(LabelMemberRow.label_id, func.count()).group_by(LabelMemberRow.label_id)).all()) if with_counts else {}
        labels = session.scalars(select(LabelRow).where(LabelRow.set_name.in_([s.name for s in sets])).order_by(LabelRow.id))
        by_set: dict[str, list[LabelSpec]] = {s.name: [] for s in sets}
        for row in labels:
            by_set[row.set_name].append(LabelSpec(row.name, json.loads(row.prompts) if row.prompts else None,
                                                  row.threshold, row.id, counts.get(row.id, 0)))
    return [LabelSet(s.name, json.loads(s.templates) if s.templates else None, by_set[s.name]) for s in sets]


def label_photos(catalog: Catalog, set_name: str, name: str, k: int | None = 50, offset: int = 0) -> list[dict[str, Any]]:
    """Photos holding a label, most confident first: [{"id", "path", "probability", "strength", "confirmed", "verdict"}]."""
    with catalog.read() as session:
        label = _label_row(session, set_name, name).id
        query = (select(ImageRow.id, ImageRow.path, LabelMemberRow.probability, LabelMemberRow.strength,
                        LabelMemberRow.confirmed, LabelReviewRow.verdict)
                 .join(ImageRow, ImageRow.id == LabelMemberRow.image_id)
                 .outerjoin(LabelReviewRow, (LabelReviewRow.image_id == LabelMemberRow.image_id)
                            & (LabelReviewRow.label_id == LabelMemberRow.label_id))
                 .where(LabelMemberRow.label_id == label)
                 .order_by(LabelMemberRow.strength.desc(), ImageRow.id)
                 .offset(offset))
        if k is not None:
            query = query.limit(k)
        return [{"id": i, "path": p, "probability": round(float(prob), 6), "strength": round(float(strength), 4),
                 "confirmed": bool(confirmed), "verdict": verdict}
                for i, p, prob, strength, confirmed, verdict in session.execute(query)]


def top_photo_ids(catalog: Catalog, label_ids: Sequence[int], per_label: int) -> dict[int, list[int]]:
    """The `per_label` strongest photo ids of each label (thumbnail strips on /labels)."""
    out: dict[int, list[int]] = {int(i): [] for i in label_ids}
    if per_label <= 0:
        return out
    with catalog.read() as session:
        for label in out:  # one short index range scan each: a window over every member costs far more at 1M
            out[label] = list(session.scalars(
                select(LabelMemberRow.image_id).where(LabelMemberRow.label_id == label)
                .order_by(LabelMemberRow.strength.desc(), LabelMemberRow.image_id).limit(per_label)))
    return out


def labels_of(catalog: Catalog, image_id: int) -> list[dict[str, Any]]:
    """The labels one photo holds: [{"set", "label", "probability", "strength", "confirmed", "verdict"}]."""
    with catalog.read() as session:
        rows = session.execute(
            select(LabelRow.set_name, LabelRow.name, LabelMemberRow.probability, LabelMemberRow.strength,
                   LabelMemberRow.confirmed, LabelReviewRow.verdict)
            .join(LabelRow, LabelRow.id == LabelMemberRow.label_id)
            .outerjoin(LabelReviewRow, (LabelReviewRow.image_id == LabelMemberRow.image_id)
                       & (LabelReviewRow.label_id == LabelMemberRow.label_id))
            .where(LabelMemberRow.image_id == image_id).order_by(LabelRow.set_name, LabelMemberRow.strength.desc()))
        return [{"set": s, "label": n, "probability": float(p), "strength": float(z), "confirmed": bool(c), "verdict": v}
                for s, n, p, z, c, v in rows]
