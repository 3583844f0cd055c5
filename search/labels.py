"""Zero-shot labels (issue 6): named label sets, cached text classifiers, and assignment from the stored vectors.

A label set is a group of labels that compete: each photo's scores are softmaxed within the set. A label is given
to a photo when both
  * its probability within the set >= the label's threshold (DEFAULT_THRESHOLD = 0.5: the label clearly wins
    its set, so at most one label per set by default; a lower threshold lets several labels of one set apply), and
  * its cosine similarity >= the label's adaptive floor: median + FLOOR_STRICTNESS x robust spread (1.4826 x MAD,
    at least MIN_FLOOR_SPREAD) of that label's similarities over the library (the idea of search.relevance).
    This is the "none of these" rule: softmax always crowns a winner, even for a photo unrelated to every label; the floor asks the
    winner to stand out from how the label scores the bulk of the library. FLOOR_STRICTNESS = 3, as search: the
    winner is the best of many labels, so a looser floor lets unrelated photos through (on random vectors with a
    100-label set, 2 robust SDs passed ~70% of unrelated photos, 3 passes ~13%); true CLIP matches usually stand
    4-6 SDs above the bulk.
    Known limit: a label true of most of the library (over ~half) has its median among its positives, and the floor
    then drops some of them; lowering its threshold does not help, finer labels do.
Photos can hold several labels across sets. Assignments are computed from the catalog's vectors (never re-embedding
images), in chunks of CHUNK rows, and a set's assignments are replaced in one write transaction.

Classifiers: CLIP-paper prompt ensembling (clipsearch.search.zeroshot.class_embeddings): a label's prompts if it has
any (a prompt with "{}" gets the label name there, others are used as they are), else the set's templates (default:
zeroshot.DEFAULT_TEMPLATES) x the label name. Each is cached in label_classifiers per (label, model) under a hash of
the model id and the exact texts encoded, so a change of prompts, templates, name or model recomputes it, and
nothing else does (no text encoder is loaded when every classifier is cached). The logit scale comes from the
model (open_clip's exp(logit_scale), at most 100) or defaults to 100, CLIP's trained value.

Hooks for later steps:
  * apply_new(catalog, image_ids): label photos just indexed (for the indexer/watcher to call after a batch
    commits; not wired yet). It uses the cached classifiers and floors of the last full apply.
  * label_photos(catalog, set, label, k): the top photos of a label, for label pages.
  * LabelFeedbackRow (clipsearch.label_tables): confirmed/rejected examples, for threshold tuning and few-shot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterator, Sequence

import numpy as np
from sqlalchemy import delete, func, select

from clipsearch.catalog import Catalog, EmbeddingRow, ImageRow, vector_to_blob
from clipsearch.errors import ConfigError, EmptyLibraryError, QueryError
from clipsearch.label_tables import LabelAssignmentRow, LabelClassifierRow, LabelRow, LabelSetRow
from clipsearch.search.relevance import MAD_TO_SIGMA
from clipsearch.search.zeroshot import DEFAULT_TEMPLATES, class_embeddings

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
FLOOR_STRICTNESS = 3.0  # as search's relevance cutoff (DEFAULT_STRICTNESS)
DEFAULT_LOGIT_SCALE = 100.0
CHUNK = 100_000  # vectors scored at a time: 100k x 512 float32 = 200 MB
# Smallest spread a floor uses: CLIP cosines of one text against unrelated photos spread by about 0.02-0.03, so this
# binds only in degenerate libraries (near-identical photos, or a label scoring the bulk identically).
MIN_FLOOR_SPREAD = 0.01
FLOOR_SAMPLE = 20_000  # similarities per label the floor is measured on
CLASSIFIER_VERSION = 1  # bump to invalidate every cached classifier

EncoderSource = Any  # an Encoder, a zero-argument callable returning one (loaded only when needed), or None


@dataclass
class LabelSpec:
    """A label as the user sees it."""

    name: str
    prompts: list[str] | None = None
    threshold: float | None = None
    id: int | None = None
    count: int = 0  # photos holding it

    def as_dict(self) -> dict:
        return {"name": self.name, "prompts": self.prompts, "threshold": self.threshold,
                "effective_threshold": self.threshold if self.threshold is not None else DEFAULT_THRESHOLD,
                "photos": self.count}


@dataclass
class LabelSet:
    """A named set of labels and its templates (None: the default templates)."""

    name: str
    templates: list[str] | None = None
    labels: list[LabelSpec] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "templates": self.templates, "labels": [label.as_dict() for label in self.labels]}


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


# --- presets ----------------------------------------------------------------------------------------
def presets() -> dict[str, dict]:
    """The shipped presets: {set name: {"description", "labels": [{"name", "prompts"?, "threshold"?}]}}."""
    text = resources.files("clipsearch.search").joinpath("label_presets.json").read_text(encoding="utf-8")
    return json.loads(text)


# --- editing ----------------------------------------------------------------------------------------
def _clean_name(value: str, what: str) -> str:
    value = (value or "").strip()
    if not value:
        raise ConfigError(f"the {what} name is empty", f"give the {what} a name, e.g. clipsearch labels add scenes beach")
    return value


def _check_threshold(value: float | None) -> float | None:
    if value is not None and not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"a label threshold is a probability between 0 and 1, got {value:g}", "e.g. --threshold 0.3")
    return None if value is None else float(value)


def _check_templates(templates: Sequence[str] | None) -> list[str] | None:
    if not templates:
        return None
    for template in templates:
        if "{}" not in template:
            raise ConfigError(f"template {template!r} has no {{}} for the label name", 'e.g. --template "a photo of a {}."')
    return list(templates)


def add_label(catalog: Catalog, set_name: str, name: str, prompts: Sequence[str] | None = None,
              threshold: float | None = None, templates: Sequence[str] | None = None) -> bool:
    """Create or edit a label (creating its set if needed). prompts/threshold/templates left None keep their values.

    Returns True when the label is new.
    """
    set_name, name = _clean_name(set_name, "label set"), _clean_name(name, "label")
    threshold = _check_threshold(threshold)
    templates = _check_templates(templates)
    prompts = [p.strip() for p in prompts or () if p.strip()] or None
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
    """Remove a whole set, or one label of it (its assignments, classifiers and feedback go with it)."""
    with catalog.write() as session:
        if session.get(LabelSetRow, set_name) is None:
            raise _unknown_set(catalog, set_name, session)
        if name is None:
            session.execute(delete(LabelSetRow).where(LabelSetRow.name == set_name))
            return
        found = session.execute(delete(LabelRow).where(LabelRow.set_name == set_name, LabelRow.name == name))
        if not found.rowcount:
            raise _unknown_label(set_name, name)


def _unknown_set(catalog: Catalog, set_name: str, session=None) -> QueryError:
    if session is not None:
        known = list(session.scalars(select(LabelSetRow.name).order_by(LabelSetRow.name)))
    else:
        known = set_names(catalog)
    return QueryError(f"no label set {set_name!r}",
                      f"sets: {', '.join(known)}" if known else "add one: clipsearch labels add --preset scenes")


def _unknown_label(set_name: str, name: str) -> QueryError:
    return QueryError(f"the label set {set_name!r} has no label {name!r}", f"clipsearch labels show {set_name} lists them")


def set_names(catalog: Catalog) -> list[str]:
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
            raise _unknown_set(catalog, set_name, session)
        if not sets:
            return []
        counts = dict(session.execute(
            select(LabelAssignmentRow.label_id, func.count()).group_by(LabelAssignmentRow.label_id)).all()) if with_counts else {}
        labels = session.scalars(select(LabelRow).where(LabelRow.set_name.in_([s.name for s in sets])).order_by(LabelRow.id))
        by_set: dict[str, list[LabelSpec]] = {s.name: [] for s in sets}
        for row in labels:
            by_set[row.set_name].append(LabelSpec(row.name, json.loads(row.prompts) if row.prompts else None,
                                                  row.threshold, row.id, counts.get(row.id, 0)))
    return [LabelSet(s.name, json.loads(s.templates) if s.templates else None, by_set[s.name]) for s in sets]


def label_photos(catalog: Catalog, set_name: str, name: str, k: int | None = 50, offset: int = 0) -> list[dict]:
    """Photos holding a label, best score first: [{"id", "path", "score", "similarity"}] (label pages' hook)."""
    with catalog.read() as session:
        label_id = session.scalar(select(LabelRow.id).where(LabelRow.set_name == set_name, LabelRow.name == name))
        if label_id is None:
            if session.get(LabelSetRow, set_name) is None:
                raise _unknown_set(catalog, set_name, session)
            raise _unknown_label(set_name, name)
        query = (select(ImageRow.id, ImageRow.path, LabelAssignmentRow.score, LabelAssignmentRow.similarity)
                 .join(ImageRow, ImageRow.id == LabelAssignmentRow.image_id)
                 .where(LabelAssignmentRow.label_id == label_id)
                 .order_by(LabelAssignmentRow.score.desc(), LabelAssignmentRow.similarity.desc(), ImageRow.id)
                 .offset(offset))
        if k is not None:
            query = query.limit(k)
        return [{"id": i, "path": p, "score": round(float(s), 6), "similarity": round(float(c), 6)}
                for i, p, s, c in session.execute(query)]


def labels_of(catalog: Catalog, image_id: int) -> list[dict]:
    """The labels one photo holds: [{"set", "label", "score", "similarity"}] (image pages' hook)."""
    with catalog.read() as session:
        rows = session.execute(
            select(LabelRow.set_name, LabelRow.name, LabelAssignmentRow.score, LabelAssignmentRow.similarity)
            .join(LabelRow, LabelRow.id == LabelAssignmentRow.label_id)
            .where(LabelAssignmentRow.image_id == image_id).order_by(LabelRow.set_name, LabelAssignmentRow.score.desc()))
        return [{"set": s, "label": n, "score": float(p), "similarity": float(c)} for s, n, p, c in rows]


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
    floors: np.ndarray  # [n_labels], nan where not measured yet
    encoded: int = 0  # classifiers computed now (cache misses)

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([DEFAULT_THRESHOLD if label.threshold is None else label.threshold for label in self.labels], np.float32)


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
    floors, scales, missing = [], [], []
    for n, (label_id, key) in enumerate(zip(ids, keys)):
        row = cached.get(label_id)
        if row is not None and row.key == key:
            vectors.append(np.frombuffer(row.vector, dtype="<f4").astype(np.float32))
            floors.append(np.nan if row.floor is None else row.floor)
            scales.append(row.logit_scale)
        else:
            vectors.append(None)
            floors.append(np.nan)
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
                                                 logit_scale=scale, floor=None))
    return Classifier(label_set.labels, np.stack(vectors).astype(np.float32), scale, np.asarray(floors, np.float64),
                      encoded=len(missing))


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


# --- assignment ----------------------------------------------------------------------------------------
def _library_model_id(catalog: Catalog) -> str:
    model = catalog.library_model()
    if model is None:
        raise EmptyLibraryError("no images are indexed in this library yet, so there is nothing to label",
                                "index a folder first: clipsearch index ~/Pictures")
    return model["model_id"]


def iter_vector_chunks(catalog: Catalog, model_id: str, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of a model's embeddings, `chunk` rows at a time in id order (bounded memory at 1M vectors)."""
    last = -1
    while True:
        with catalog.read() as session:
            rows = session.execute(
                select(EmbeddingRow.image_id, EmbeddingRow.vector)
                .where(EmbeddingRow.model == model_id, EmbeddingRow.image_id > last)
                .order_by(EmbeddingRow.image_id).limit(chunk)).all()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1).astype(np.float32, copy=False)
        del rows
        yield ids, matrix
        last = int(ids[-1])
        if len(ids) < chunk:
            return


def classify(vectors: np.ndarray, classifier: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [n, L] float32, probabilities within the set [n, L] float32) of unit image vectors."""
    sims = np.asarray(vectors, np.float32) @ classifier.matrix.T
    logits = sims * np.float32(classifier.logit_scale)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return sims, logits


def similarity_floors(sample_sims: np.ndarray, strictness: float = FLOOR_STRICTNESS) -> np.ndarray:
    """Per-label floor: median + strictness x 1.4826 x MAD of that label's similarities over a library sample."""
    sims = np.asarray(sample_sims, np.float64)
    if not len(sims):
        return np.full(sims.shape[1] if sims.ndim == 2 else 0, -np.inf)
    median = np.median(sims, axis=0)
    spread = np.maximum(MAD_TO_SIGMA * np.median(np.abs(sims - median), axis=0), MIN_FLOOR_SPREAD)
    return median + strictness * spread


def _candidates(sims: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, label) index pairs whose probability passes the label threshold."""
    rows, cols = np.nonzero(probs >= thresholds[None, :])
    return rows, cols


def apply_set(catalog: Catalog, set_name: str, encoder: EncoderSource = None, chunk: int = CHUNK,
              rng_seed: int = 0) -> ApplyReport:
    """(Re)label the whole library with one set: classify every stored vector, replace the set's assignments."""
    started = time.perf_counter()
    model_id = _library_model_id(catalog)
    (label_set,) = label_sets(catalog, set_name)
    classifier = set_classifier(catalog, label_set, model_id, encoder)
    with catalog.read() as session:
        total = session.scalar(select(func.count()).select_from(EmbeddingRow).where(EmbeddingRow.model == model_id)) or 0
    rng = np.random.default_rng(rng_seed)
    keep = min(1.0, FLOOR_SAMPLE / max(total, 1))
    thresholds = classifier.thresholds
    found_ids, found_labels, found_scores, found_sims, samples = [], [], [], [], []
    classify_seconds = 0.0
    for ids, vectors in iter_vector_chunks(catalog, model_id, chunk):
        tick = time.perf_counter()
        sims, probs = classify(vectors, classifier)
        rows, cols = _candidates(sims, probs, thresholds)
        found_ids.append(ids[rows])
        found_labels.append(cols)
        found_scores.append(probs[rows, cols])
        found_sims.append(sims[rows, cols])
        samples.append(sims[rng.random(len(sims)) < keep] if keep < 1.0 else sims)
        classify_seconds += time.perf_counter() - tick
    tick = time.perf_counter()
    n_labels = len(classifier.labels)
    floors = similarity_floors(np.concatenate(samples) if samples else np.zeros((0, n_labels), np.float32))
    ids = np.concatenate(found_ids) if found_ids else np.zeros(0, np.int64)
    cols = np.concatenate(found_labels) if found_labels else np.zeros(0, np.int64)
    scores = np.concatenate(found_scores) if found_scores else np.zeros(0, np.float32)
    sims = np.concatenate(found_sims) if found_sims else np.zeros(0, np.float32)
    passed = sims >= floors[cols] if len(cols) else np.zeros(0, bool)
    ids, cols, scores, sims = ids[passed], cols[passed], scores[passed], sims[passed]
    classify_seconds += time.perf_counter() - tick
    label_ids = np.array([label.id for label in classifier.labels], np.int64)
    with catalog.write() as session:
        session.execute(delete(LabelAssignmentRow).where(LabelAssignmentRow.label_id.in_(label_ids.tolist())))
        _insert_assignments(session, ids, label_ids[cols], scores, sims)
        for label_id, floor in zip(label_ids.tolist(), floors.tolist()):
            session.execute(LabelClassifierRow.__table__.update()
                            .where(LabelClassifierRow.label_id == label_id, LabelClassifierRow.model == model_id)
                            .values(floor=float(floor) if np.isfinite(floor) else None))
    counts = np.bincount(cols, minlength=len(label_ids))
    return ApplyReport(set_name, int(total), {label.name: int(c) for label, c in zip(classifier.labels, counts)},
                       int(total - len(np.unique(ids))), classifier.encoded, time.perf_counter() - started, classify_seconds)


def _insert_assignments(session, image_ids: np.ndarray, label_ids: np.ndarray, scores: np.ndarray, sims: np.ndarray) -> None:
    """Bulk insert through the driver's executemany (an ORM insert of a million dicts costs several times more)."""
    if not len(image_ids):
        return
    rows = list(zip(image_ids.tolist(), label_ids.tolist(), np.asarray(scores, np.float64).tolist(),
                    np.asarray(sims, np.float64).tolist()))
    session.connection().exec_driver_sql(
        "INSERT OR REPLACE INTO label_assignments (image_id, label_id, score, similarity) VALUES (?, ?, ?, ?)", rows)


def apply_all(catalog: Catalog, encoder: EncoderSource = None, chunk: int = CHUNK) -> list[ApplyReport]:
    """Relabel the library with every set (sets without labels are skipped)."""
    reports = []
    for label_set in label_sets(catalog):
        if label_set.labels:
            reports.append(apply_set(catalog, label_set.name, encoder, chunk))
    return reports


def apply_new(catalog: Catalog, image_ids: Sequence[int], encoder: EncoderSource = None) -> dict[str, int]:
    """Label photos just indexed, with every set: {set: labels given}. Hook for the indexer and the watcher.

    Uses the cached classifiers and floors of each set's last full apply; a set never applied (no floors yet), or
    one whose classifiers changed meanwhile with no encoder given, is skipped: `clipsearch labels apply` covers it.
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
        if np.isnan(classifier.floors).any():
            log.info("labels: set %s has not been applied to the library yet; new photos wait for a full apply", label_set.name)
            continue
        label_ids = np.array([label.id for label in classifier.labels], np.int64)
        with catalog.write() as session:
            session.execute(delete(LabelAssignmentRow).where(LabelAssignmentRow.image_id.in_(image_ids),
                                                             LabelAssignmentRow.label_id.in_(label_ids.tolist())))
            if len(ids):
                sims, probs = classify(vectors, classifier)
                rows, cols = _candidates(sims, probs, classifier.thresholds)
                keep = sims[rows, cols] >= classifier.floors[cols]
                rows, cols = rows[keep], cols[keep]
                _insert_assignments(session, ids[rows], label_ids[cols], probs[rows, cols], sims[rows, cols])
                given[label_set.name] = int(len(rows))
    return given
