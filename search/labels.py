"""Zero-shot labels: cached text classifiers, calibration on the library, and membership from the stored vectors.

Each label's classifier is CLIP-paper prompt ensembling (clipsearch.search.zeroshot.class_embeddings): the label's
prompts if it has any (a prompt with "{}" gets the label name there, others are used as they are), else the set's
templates (default: zeroshot.DEFAULT_TEMPLATES) x the label name. It is cached in label_classifiers per (label, model)
under a hash of the model id and the exact texts encoded, so a change of prompts, templates, name or model
recomputes it, and nothing else does (no text encoder is loaded when every classifier is cached). The logit scale
comes from the model (open_clip's exp(logit_scale), at most 100) or defaults to 100, CLIP's trained value.

Applying a set (apply_set) measures each label's similarity statistics on a sample of the library, builds the
prototypes of confirmed photos, tunes each label's cutoff from its reviews (clipsearch.search.label_calibration
explains the rule), then scores every stored vector in chunks of CHUNK rows (images are never re-embedded) and
replaces the set's members in one write transaction. New photos are labelled by apply_new with the calibration of
the last apply (the indexer and the watcher call it after each batch commits).

Known limit: a label true of most of the library (over about half) has its median among its positives, and the
default cutoff then drops some of them; confirming a few of them lowers its cutoff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from sqlalchemy import delete, select

from clipsearch.catalog import Catalog, EmbeddingRow, vector_to_blob
from clipsearch.catalog_sql import upsert_rows
from clipsearch.errors import ConfigError, EmptyLibraryError
from clipsearch.label_tables import (LabelCalibrationRow, LabelCandidateRow, LabelClassifierRow, LabelMemberRow,
                                     LabelReviewRow)
from clipsearch.search import label_calibration as calib
from clipsearch.search.label_sets import LabelSet, LabelSpec, label_sets
from clipsearch.search.zeroshot import DEFAULT_TEMPLATES, class_embeddings

log = logging.getLogger(__name__)

DEFAULT_LOGIT_SCALE = 100.0
CHUNK = 100_000  # vectors scored at a time: 100k x 512 float32 = 200 MB
STATS_SAMPLE = 20_000  # photos each label's similarity statistics are measured on
CLASSIFIER_VERSION = 1  # bump to invalidate every cached classifier

EncoderSource = Any  # an Encoder, a zero-argument callable returning one (loaded only when needed), or None


@dataclass
class ApplyReport:
    """What one apply did."""

    set_name: str
    images: int
    assigned: dict[str, int]  # label name -> photos
    unlabelled: int  # photos given no label of this set ("none of these")
    encoded_labels: int  # classifiers (re)computed
    seconds: float
    classify_seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# --- classifiers --------------------------------------------------------------------------------------
def label_texts(label: LabelSpec, templates: Sequence[str] | None) -> list[str]:
    """The texts whose embeddings are averaged into a label's classifier."""
    if label.prompts:
        return [prompt.replace("{}", label.name) for prompt in label.prompts]
    return [template.format(label.name) for template in (templates or DEFAULT_TEMPLATES)]


def classifier_key(model_id: str, texts: Sequence[str]) -> str:
    """Cache key of a classifier: changes exactly when the model or any encoded text changes."""
    payload = json.dumps({"v": CLASSIFIER_VERSION, "model": model_id, "texts": list(texts)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def logit_scale_of(encoder) -> float:
    """The model's softmax temperature: encoder.logit_scale, else open_clip's exp(model.logit_scale), else 100."""
    value = getattr(encoder, "logit_scale", None)
    try:
        if value is None:
            raw = getattr(getattr(encoder, "model", None), "logit_scale", None)
            if raw is not None:
                value = float(raw.exp().item()) if hasattr(raw, "exp") else float(np.exp(float(raw)))
        value = float(value) if value is not None else DEFAULT_LOGIT_SCALE
    except (TypeError, ValueError, RuntimeError):
        value = DEFAULT_LOGIT_SCALE
    return float(min(max(value, 1.0), DEFAULT_LOGIT_SCALE)) if np.isfinite(value) else DEFAULT_LOGIT_SCALE


@dataclass
class Classifier:
    """A set's classifier matrix for one model: rows are unit label vectors, in `labels` order."""

    labels: list[LabelSpec]
    matrix: np.ndarray  # [n_labels, d]
    logit_scale: float
    encoded: int = 0  # classifiers computed now (cache misses)

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([label.effective_threshold for label in self.labels], np.float32)


def _resolve_encoder(encoder: EncoderSource):
    if encoder is None:
        return None
    return encoder() if callable(encoder) and not hasattr(encoder, "encode_texts") else encoder


def set_classifier(catalog: Catalog, label_set: LabelSet, model_id: str, encoder: EncoderSource = None) -> Classifier:
    """The set's classifier, from the cache where keys match, else encoded (and cached). Needs an encoder on a miss."""
    if not label_set.labels:
        raise ConfigError(f"the label set {label_set.name!r} has no labels",
                          f"add one: clipsearch labels add {label_set.name} LABEL")
    texts = [label_texts(label, label_set.templates) for label in label_set.labels]
    keys = [classifier_key(model_id, t) for t in texts]
    ids = [label.id for label in label_set.labels]
    with catalog.read() as session:
        cached = {row.label_id: row for row in session.scalars(
            select(LabelClassifierRow).where(LabelClassifierRow.model == model_id, LabelClassifierRow.label_id.in_(ids)))}
    vectors: list[np.ndarray | None] = []
    scales, missing = [], []
    for n, (label_id, key) in enumerate(zip(ids, keys)):
        row = cached.get(label_id)
        if row is not None and row.key == key:
            vectors.append(np.frombuffer(row.vector, dtype="<f4").astype(np.float32))
            scales.append(row.logit_scale)
        else:
            vectors.append(None)
            missing.append(n)
    scale = float(scales[0]) if scales else DEFAULT_LOGIT_SCALE
    if missing:
        loaded = _resolve_encoder(encoder)
        if loaded is None:
            raise ConfigError(f"the label set {label_set.name!r} has classifiers to compute and no text encoder was given",
                              f"run clipsearch labels apply {label_set.name}")
        if getattr(loaded, "model_id", model_id) != model_id:
            raise ConfigError(f"the encoder is {loaded.model_id} but the library's vectors come from {model_id}",
                              "label with the library's model")
        scale = logit_scale_of(loaded)
        computed = _encode(loaded, [label_set.labels[n] for n in missing], [texts[n] for n in missing], label_set.templates)
        with catalog.write() as session:
            for n, vector in zip(missing, computed):
                vectors[n] = vector
                session.merge(LabelClassifierRow(label_id=ids[n], model=model_id, key=keys[n], vector=vector_to_blob(vector),
                                                 logit_scale=scale))
    return Classifier(label_set.labels, np.stack(vectors).astype(np.float32), scale, encoded=len(missing))


def _encode(encoder, labels: list[LabelSpec], texts: list[list[str]], templates: Sequence[str] | None) -> list[np.ndarray]:
    """Prompt-ensembled vectors: labels without prompts in one class_embeddings call, each prompted label on its own."""
    out: dict[int, np.ndarray] = {}
    plain = [n for n, label in enumerate(labels) if not label.prompts]
    if plain:
        matrix = class_embeddings(encoder, [labels[n].name for n in plain], list(templates or DEFAULT_TEMPLATES))
        out.update(zip(plain, matrix))
    for n, label in enumerate(labels):
        if label.prompts:
            # Braces escaped: each text is final, class_embeddings only averages and normalises.
            escaped = [t.replace("{", "{{").replace("}", "}}") for t in texts[n]]
            out[n] = class_embeddings(encoder, [label.name], escaped)[0]
    return [out[n] for n in range(len(labels))]


# --- calibration --------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Per-label arrays (in the classifier's label order) turning similarities into strengths, and the cutoffs."""

    text_median: np.ndarray
    text_spread: np.ndarray
    prototypes: np.ndarray  # [L, d], zero rows for labels without confirmed photos
    proto_median: np.ndarray
    proto_spread: np.ndarray
    proto_weight: np.ndarray
    cutoff: np.ndarray

    def score(self, vectors: np.ndarray, classifier: Classifier) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities within the set [n, L], strengths [n, L]) of unit image vectors."""
        sims = np.asarray(vectors, np.float32) @ classifier.matrix.T
        probs = calib.softmax_within_set(sims, classifier.logit_scale)
        refined = self.proto_weight > 0
        proto_sims = None
        if refined.any():
            proto_sims = np.zeros_like(sims)
            proto_sims[:, refined] = np.asarray(vectors, np.float32) @ self.prototypes[refined].T
        return probs, calib.strengths(sims, self.text_median, self.text_spread, proto_sims, self.proto_median,
                                      self.proto_spread, self.proto_weight)


Reviews = dict[int, tuple[list[int], list[int]]]  # label id -> (confirmed image ids, rejected image ids)


def reviews_of(catalog: Catalog, label_ids: Sequence[int], image_ids: Sequence[int] | None = None) -> Reviews:
    """Confirmed and rejected photos of some labels (optionally only among some images)."""
    out: Reviews = {int(i): ([], []) for i in label_ids}
    with catalog.read() as session:
        query = select(LabelReviewRow.label_id, LabelReviewRow.image_id, LabelReviewRow.verdict).where(
            LabelReviewRow.label_id.in_(list(out)))
        if image_ids is not None:
            query = query.where(LabelReviewRow.image_id.in_([int(i) for i in image_ids]))
        for label_id, image_id, verdict in session.execute(query.order_by(LabelReviewRow.image_id)):
            out[label_id][0 if verdict == "confirm" else 1].append(image_id)
    return out


def build_prototypes(catalog: Catalog, model_id: str, labels: Sequence[LabelSpec], reviews: Reviews,
                     dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(prototypes [L, d], weights [L]) of the labels' confirmed photos (zero rows and weights without any)."""
    prototypes, weights = np.zeros((len(labels), dim), np.float32), np.zeros(len(labels))
    confirmed = sorted({i for label in labels for i in reviews.get(label.id, ([], []))[0]})
    if not confirmed:
        return prototypes, weights
    ids, vectors = catalog.vectors(model_id, confirmed)
    row_of = {int(i): n for n, i in enumerate(ids)}
    for n, label in enumerate(labels):
        rows = [row_of[i] for i in reviews.get(label.id, ([], []))[0] if i in row_of]
        unit = calib.prototype(vectors[rows]) if rows else None
        if unit is not None:
            prototypes[n], weights[n] = unit, calib.prototype_weight(len(rows))
    return prototypes, weights


def prototype_stats(sample: np.ndarray | None, prototypes: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median, spread) of each prototype's similarities over the library sample; (0, 1) for unused prototypes.

    The sample is read only when some prototype is used (weight > 0), so callers without one may pass None.
    """
    median, spread = np.zeros(len(weights)), np.ones(len(weights))
    used = np.asarray(weights) > 0
    if used.any():
        median[used], spread[used] = calib.robust_stats(sample @ prototypes[used].T)
    return median, spread


def tune_cutoffs(catalog: Catalog, model_id: str, classifier: Classifier, cal: Calibration, reviews: Reviews,
                 columns: Sequence[int] | None = None) -> None:
    """Set the cutoff of each label (or of the given columns) from its reviewed photos' strengths."""
    columns = range(len(classifier.labels)) if columns is None else columns
    groups = {n: reviews.get(classifier.labels[n].id, ([], [])) for n in columns}
    reviewed = sorted({i for confirmed, rejected in groups.values() for i in (*confirmed, *rejected)})
    z = np.zeros((0, len(classifier.labels)))
    row_of: dict[int, int] = {}
    if reviewed:
        ids, vectors = catalog.vectors(model_id, reviewed)
        row_of = {int(i): r for r, i in enumerate(ids)}
        _, z = cal.score(vectors, classifier)
    for n, (confirmed, rejected) in groups.items():
        cal.cutoff[n] = calib.tune_cutoff([z[row_of[i], n] for i in confirmed if i in row_of],
                                          [z[row_of[i], n] for i in rejected if i in row_of])


def calibrate(catalog: Catalog, classifier: Classifier, model_id: str, reviews: Reviews,
              rng_seed: int = 0) -> Calibration:
    """Measure each label on a library sample, build confirmed-photo prototypes, tune cutoffs from the reviews."""
    n_labels, dim = classifier.matrix.shape
    prototypes, weights = build_prototypes(catalog, model_id, classifier.labels, reviews, dim)
    sample = library_sample(catalog, model_id, rng_seed)
    text_median, text_spread = calib.robust_stats(sample @ classifier.matrix.T)
    proto_median, proto_spread = prototype_stats(sample, prototypes, weights)
    cal = Calibration(text_median, text_spread, prototypes, proto_median, proto_spread, weights,
                      np.full(n_labels, calib.DEFAULT_CUTOFF))
    tune_cutoffs(catalog, model_id, classifier, cal, reviews)
    return cal


def library_sample(catalog: Catalog, model_id: str, rng_seed: int = 0) -> np.ndarray:
    """Vectors of up to STATS_SAMPLE photos drawn at random (all of a smaller library)."""
    with catalog.read() as session:
        ids = np.fromiter(session.scalars(select(EmbeddingRow.image_id).where(EmbeddingRow.model == model_id)), np.int64)
    if len(ids) > STATS_SAMPLE:
        ids = np.sort(np.random.default_rng(rng_seed).choice(ids, STATS_SAMPLE, replace=False))
    _, vectors = catalog.vectors(model_id, ids.tolist())
    return vectors.reshape(len(ids), -1) if len(ids) else np.zeros((0, 1), np.float32)


def save_calibration(session, classifier: Classifier, model_id: str, cal: Calibration,
                     columns: Sequence[int] | None = None) -> None:
    """Store the calibration of every label (or of the given columns)."""
    for n in range(len(classifier.labels)) if columns is None else columns:
        label = classifier.labels[n]
        has_prototype = cal.proto_weight[n] > 0
        session.merge(LabelCalibrationRow(
            label_id=label.id, model=model_id, text_median=float(cal.text_median[n]), text_spread=float(cal.text_spread[n]),
            prototype=vector_to_blob(cal.prototypes[n]) if has_prototype else None,
            proto_median=float(cal.proto_median[n]), proto_spread=float(cal.proto_spread[n]),
            proto_weight=float(cal.proto_weight[n]), cutoff=float(cal.cutoff[n])))


def stored_calibration(catalog: Catalog, classifier: Classifier, model_id: str) -> Calibration | None:
    """The calibration of the set's last apply for this model, or None when some label has none yet."""
    ids = [label.id for label in classifier.labels]
    with catalog.read() as session:
        rows = {row.label_id: row for row in session.scalars(
            select(LabelCalibrationRow).where(LabelCalibrationRow.model == model_id, LabelCalibrationRow.label_id.in_(ids)))}
    if len(rows) < len(ids):
        return None
    ordered = [rows[i] for i in ids]
    dim = classifier.matrix.shape[1]
    prototypes = np.zeros((len(ids), dim), np.float32)
    for n, row in enumerate(ordered):
        if row.prototype is not None:
            prototypes[n] = np.frombuffer(row.prototype, dtype="<f4")
    column = lambda name: np.array([getattr(row, name) for row in ordered], np.float64)  # noqa: E731
    return Calibration(column("text_median"), column("text_spread"), prototypes, column("proto_median"),
                       column("proto_spread"), column("proto_weight"), column("cutoff"))


# --- membership ----------------------------------------------------------------------------------------
def library_model_id(catalog: Catalog) -> str:
    """The id of the model the library's vectors come from (EmptyLibraryError before indexing)."""
    model = catalog.library_model()
    if model is None:
        raise EmptyLibraryError("no images are indexed in this library yet, so there is nothing to label",
                                "index a folder first: clipsearch index ~/Pictures")
    return model["model_id"]


@dataclass
class Members:
    """Rows of label_members being built (image ids, label columns, probabilities, strengths, confirmed flags) and
    of label_candidates (photos passing a label's threshold: image ids, label columns, probabilities)."""

    ids: list[np.ndarray]
    cols: list[np.ndarray]
    probs: list[np.ndarray]
    strengths: list[np.ndarray]
    confirmed: list[np.ndarray]
    candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def empty(cls) -> "Members":
        return cls([], [], [], [], [], [])

    def add(self, ids, cols, probs, strengths, confirmed: bool) -> None:
        self.ids.append(np.asarray(ids, np.int64))
        self.cols.append(np.asarray(cols, np.int64))
        self.probs.append(np.asarray(probs, np.float64))
        self.strengths.append(np.asarray(strengths, np.float64))
        self.confirmed.append(np.full(len(self.ids[-1]), confirmed))

    def select(self, ids: np.ndarray, probs: np.ndarray, z: np.ndarray, classifier: Classifier, cal: Calibration,
               reviews: Reviews) -> None:
        """Add the photos (rows of probs/z) passing threshold and cutoff, minus reviewed ones (added apart)."""
        passing = probs >= classifier.thresholds[None, :]
        rows, cols = np.nonzero(passing)
        self.candidates.append((ids[rows], cols, probs[rows, cols]))
        rows, cols = np.nonzero(passing & (z >= cal.cutoff[None, :]))
        if len(rows) and reviews:
            reviewed = {(image, n) for n, label in enumerate(classifier.labels)
                        for group in reviews.get(label.id, ([], [])) for image in group}
            if reviewed:
                keep = np.fromiter(((int(ids[r]), int(c)) not in reviewed for r, c in zip(rows, cols)), bool, len(rows))
                rows, cols = rows[keep], cols[keep]
        self.add(ids[rows], cols, probs[rows, cols], z[rows, cols], confirmed=False)

    def add_confirmed(self, ids: np.ndarray, probs: np.ndarray, z: np.ndarray, classifier: Classifier,
                      reviews: Reviews) -> None:
        """Confirmed photos hold their label whatever their scores."""
        row_of = {int(i): r for r, i in enumerate(ids)}
        for n, label in enumerate(classifier.labels):
            rows = [row_of[i] for i in reviews.get(label.id, ([], []))[0] if i in row_of]
            if rows:
                self.add(ids[rows], [n] * len(rows), probs[rows, n], z[rows, n], confirmed=True)

    def write(self, session, classifier: Classifier) -> tuple[np.ndarray, np.ndarray]:
        """Insert the rows (the caller deleted what they replace); (image ids, label columns) written."""
        label_ids = np.array([label.id for label in classifier.labels], np.int64)
        connection = session.connection()
        for ids, cols, probs in self.candidates:
            upsert_rows(connection, LabelCandidateRow.__table__, ("image_id", "label_id"), ("image_id", "label_id", "probability"),
                        list(zip(ids.tolist(), label_ids[cols].tolist(), np.asarray(probs, np.float64).tolist())))
        if not self.ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids, cols = np.concatenate(self.ids), np.concatenate(self.cols)
        rows = list(zip(ids.tolist(), label_ids[cols].tolist(), np.concatenate(self.probs).tolist(),
                        np.concatenate(self.strengths).tolist(), np.concatenate(self.confirmed).tolist()))
        upsert_rows(connection, LabelMemberRow.__table__, ("image_id", "label_id"),
                    ("image_id", "label_id", "probability", "strength", "confirmed"), rows)
        return ids, cols


def apply_set(catalog: Catalog, set_name: str, encoder: EncoderSource = None, chunk: int = CHUNK,
              rng_seed: int = 0) -> ApplyReport:
    """(Re)label the whole library with one set: calibrate, score every stored vector, replace the set's members."""
    started = time.perf_counter()
    model_id = library_model_id(catalog)
    (label_set,) = label_sets(catalog, set_name, with_counts=False)
    classifier = set_classifier(catalog, label_set, model_id, encoder)
    reviews = reviews_of(catalog, [label.id for label in classifier.labels])
    tick = time.perf_counter()
    cal = calibrate(catalog, classifier, model_id, reviews, rng_seed)
    classify_seconds = time.perf_counter() - tick
    members, total = Members.empty(), 0
    confirmed = np.array(sorted({i for label in classifier.labels for i in reviews[label.id][0]}), np.int64)
    for ids, vectors in catalog.vector_chunks(model_id, chunk):
        tick = time.perf_counter()
        probs, z = cal.score(vectors, classifier)
        members.select(ids, probs, z, classifier, cal, reviews)
        if len(confirmed):
            pinned = np.isin(ids, confirmed)
            members.add_confirmed(ids[pinned], probs[pinned], z[pinned], classifier, reviews)
        total += len(ids)
        classify_seconds += time.perf_counter() - tick
    label_ids = [label.id for label in classifier.labels]
    with catalog.write() as session:
        session.execute(delete(LabelMemberRow).where(LabelMemberRow.label_id.in_(label_ids)))
        session.execute(delete(LabelCandidateRow).where(LabelCandidateRow.label_id.in_(label_ids)))
        ids, cols = members.write(session, classifier)
        save_calibration(session, classifier, model_id, cal)
    counts = np.bincount(cols, minlength=len(label_ids))
    return ApplyReport(set_name, total, {label.name: int(c) for label, c in zip(classifier.labels, counts)},
                       int(total - len(np.unique(ids))), classifier.encoded, time.perf_counter() - started, classify_seconds)


def apply_all(catalog: Catalog, encoder: EncoderSource = None, chunk: int = CHUNK) -> list[ApplyReport]:
    """Relabel the library with every set (sets without labels are skipped)."""
    return [apply_set(catalog, label_set.name, encoder, chunk)
            for label_set in label_sets(catalog, with_counts=False) if label_set.labels]


def apply_uncalibrated(catalog: Catalog, encoder: EncoderSource = None) -> list[ApplyReport]:
    """Apply every set not yet applied with the library's model (after --reembed, or sets added but never applied)."""
    model = catalog.library_model()
    sets = [label_set for label_set in label_sets(catalog, with_counts=False) if label_set.labels] if model else []
    if not sets:
        return []
    with catalog.read() as session:
        calibrated = set(session.scalars(select(LabelCalibrationRow.label_id)
                                         .where(LabelCalibrationRow.model == model["model_id"])))
    return [apply_set(catalog, label_set.name, encoder) for label_set in sets
            if any(label.id not in calibrated for label in label_set.labels)]


def apply_new(catalog: Catalog, image_ids: Sequence[int], encoder: EncoderSource = None) -> dict[str, int]:
    """Label photos just indexed, with every set: {set: labels given}. Hook for the indexer and the watcher.

    Uses the cached classifiers and calibration of each set's last full apply; a set never applied with this model,
    or one whose classifiers changed meanwhile with no encoder given, is skipped: `clipsearch labels apply` covers it.
    Call it after the batch's vectors are committed, from the process holding the writer lock.
    """
    image_ids = [int(i) for i in image_ids]
    sets = [label_set for label_set in label_sets(catalog, with_counts=False) if label_set.labels] if image_ids else []
    model = catalog.library_model() if sets else None
    if model is None:  # cheap when there are no labels: indexing calls this for every batch
        return {}
    model_id = model["model_id"]
    ids, vectors = catalog.vectors(model_id, image_ids)
    given: dict[str, int] = {}
    for label_set in sets:
        try:
            classifier = set_classifier(catalog, label_set, model_id, encoder)
        except ConfigError as e:
            log.info("labels: set %s not applied to new photos (%s)", label_set.name, e.message)
            continue
        cal = stored_calibration(catalog, classifier, model_id)
        if cal is None:
            log.info("labels: set %s has not been applied with this model yet; new photos wait for a full apply",
                     label_set.name)
            continue
        label_ids = [label.id for label in classifier.labels]
        reviews = reviews_of(catalog, label_ids, image_ids)
        members = Members.empty()
        if len(ids):
            probs, z = cal.score(vectors, classifier)
            members.select(ids, probs, z, classifier, cal, reviews)
            members.add_confirmed(ids, probs, z, classifier, reviews)
        with catalog.write() as session:
            for table in (LabelMemberRow, LabelCandidateRow):
                session.execute(delete(table).where(table.image_id.in_(image_ids), table.label_id.in_(label_ids)))
            written, _ = members.write(session, classifier)
        given[label_set.name] = int(len(written))
    return given
