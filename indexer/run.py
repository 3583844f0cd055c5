"""Indexing orchestration: walk, plan against the catalog, decode in threads, embed in batches, commit, sync."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from sqlalchemy import delete, select

from clipsearch.catalog import STATUS_FAILED, STATUS_OK, EmbeddingRow, ImageRow, RootRow, delete_embeddings, touch_images, utcnow, vector_to_blob
from clipsearch.catalog_sql import upsert_rows
from clipsearch.config import Settings
from clipsearch.encoders import Encoder, EncoderSpec, load_encoder, model_may_run_on_gpu
from clipsearch.encoders.openvino import choose_runtime
from clipsearch.encoders.background import BackgroundEncoder
from clipsearch.errors import ConfigError, LibraryError
from clipsearch.indexer.prepare import Candidate, Failed, MaybeMoved, Prepared, Unchanged, file_still_exists, prepare
from clipsearch.indexer.prepare import decode_on_device, preprocess_decoded
from clipsearch.indexer.scope import Changes, files_in_scopes, hinted_moves, rows_in_scopes
from clipsearch.indexer.walk import FoundFile, normalise_root, walk_images
from clipsearch.library import Library

log = logging.getLogger(__name__)

VANISHED = "file vanished"
LOAD_AHEAD_IMAGES = 128  # while the model loads, photos decoded ahead (or one batch if larger): ~70 MB of 12 MP drafts


class IndexProgress(Protocol):
    """What the indexer tells a progress display (the CLI draws it; the library never prints)."""

    def start(self, total: int) -> None: ...

    def advance(self, count: int = 1) -> None: ...

    def failed(self, path: str, reason: str) -> None: ...


@dataclass
class IndexReport:
    """What one indexing run did."""

    model_id: str = ""
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing_roots: list[str] = field(default_factory=list)
    walk_errors: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    embedded: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    encode_seconds: float = 0.0
    vectors: int = 0

    @property
    def images_per_second(self) -> float:
        """Embedded images per wall-clock second of the run."""
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """A JSON-ready summary."""
        return {
            "model_id": self.model_id, "added": self.added, "updated": self.updated, "moved": self.moved,
            "removed": self.removed, "unchanged": self.unchanged, "failed": len(self.failed),
            "failures": [{"path": p, "reason": r} for p, r in self.failed],
            "missing_roots": self.missing_roots, "walk_errors": [{"path": p, "reason": r} for p, r in self.walk_errors],
            "interrupted": self.interrupted, "embedded": self.embedded, "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2), "vectors": self.vectors,
        }


class _Batch:
    """Writes accumulated between two commits."""

    def __init__(self):
        self.prepared: list[Prepared] = []
        self.failed: list[Failed] = []
        self.unchanged: list[Unchanged] = []
        self.moved: list[tuple[MaybeMoved, int]] = []

    def __len__(self) -> int:
        return len(self.prepared) + len(self.failed) + len(self.unchanged) + len(self.moved)


class Indexer:
    """Indexes folders into one library with one encoder.

    The encoder may still be loading (a BackgroundEncoder): the walk, the plan and the first decodes go ahead
    meanwhile, and a run with nothing to embed never waits for it. `on_encoder` runs once, with the encoder,
    before the first vector is written.
    """

    def __init__(self, library: Library, encoder: Encoder | BackgroundEncoder, progress: IndexProgress | None = None,
                 stop: threading.Event | None = None, sync_store: bool = True,
                 on_encoder: Callable[[Encoder], None] | None = None):
        self.library = library
        self.sync_store = sync_store  # False: the caller brings the vector file up to date when it sees fit
        self.catalog = library.catalog
        self.settings = library.settings
        self._source = encoder if isinstance(encoder, BackgroundEncoder) else BackgroundEncoder.loaded(encoder)
        self.model_id = self._source.model_id
        self._on_encoder = on_encoder
        self._encoder: Encoder | None = None
        self.require_encoder = False  # True: load it (and run on_encoder) even when no photo needs embedding
        self.progress = progress
        self.stop = stop or threading.Event()
        self.report = IndexReport(model_id=self.model_id)
        self._claimed: set[int] = set()
        self._gone_by_hash: dict[str, list[int]] = {}
        self._gone: dict[str, int] = {}
        self._found: set[str] = set()
        self._renamed: list[tuple[MaybeMoved, int]] = []
        self._jpegs_on_device = False  # decided when the model has loaded

    @property
    def encoder(self) -> Encoder:
        """The encoder, waiting for it to load if need be (runs on_encoder the first time)."""
        if self._encoder is None:
            encoder = self._source.result(self.stop)
            if self._on_encoder is not None:
                self._on_encoder(encoder)
            self._jpegs_on_device = self._decodes_jpegs(encoder)
            self._encoder = encoder
        return self._encoder

    def _loaded_encoder(self) -> Encoder | None:
        """The encoder if it has finished loading (raising its load error), else None: never waits."""
        return self.encoder if self._encoder is not None or self._source.ready() is not None else None

    def run(self, folders: Sequence[str | Path], changes: Changes | None = None) -> IndexReport:
        """Index the folders, or with `changes` only those paths under them; the report (interrupted=True on a stop)."""
        started = time.perf_counter()
        try:
            roots = self._walkable_roots(folders)
            candidates = self._plan(roots, changes)
            if self.progress:
                self.progress.start(len(candidates))
            self._process(candidates)
            if not self.report.interrupted:
                if self.require_encoder:
                    self.encoder  # noqa: B018 - waits for the load and runs on_encoder
                self._remove_gone()
                if changes is None:  # only a whole walk tells when a root was last seen complete
                    self._touch_roots(roots)
                self._label_uncalibrated()
        except BaseException:
            self.report.seconds = time.perf_counter() - started
            try:  # keep what was committed searchable, but report the original error
                self._sync_store()
            except Exception as sync_error:
                log.warning("could not update the vector index after the error: %s", sync_error)
            raise
        self.report.seconds = time.perf_counter() - started
        self._sync_store()
        return self.report

    # --- planning -------------------------------------------------------------------------------
    def _walkable_roots(self, folders: Sequence[str | Path]) -> list[str]:
        roots = []
        for folder in folders:
            root = normalise_root(folder)
            if not Path(root).is_dir():
                # An unmounted drive must not look like "every photo was deleted".
                self.report.missing_roots.append(root)
                continue
            roots.append(root)
        return roots

    def _plan(self, roots: list[str], changes: Changes | None) -> list[Candidate]:
        model_id = self.model_id
        if changes is None:
            found = self._walk(roots)
            known = self.catalog.known_under(roots)
        else:
            scopes, found = files_in_scopes(
                changes, roots, include_hidden=self.settings.include_hidden, follow_symlinks=self.settings.follow_symlinks,
                exclude=str(self.library.data_dir), on_error=self._walk_error,
            )
            known = rows_in_scopes(self.catalog, scopes, changes.defer)
            self._claim_renames(changes, found, known)
        candidates = []
        for path, (root, item) in found.items():
            row = known.get(path)
            if row is not None and row.size == item.size and row.mtime_ns == item.mtime_ns and (
                row.status == STATUS_FAILED or row.model == model_id
            ):
                self.report.unchanged += 1
                continue
            candidates.append(Candidate(
                path, root, item.size, item.mtime_ns,
                existing_id=row.id if row else None,
                existing_hash=row.content_hash if row else None,
                existing_has_vector=bool(row and row.model == model_id),
                allow_move=row is None,
            ))
        self._found = set(found)
        for path, row in known.items():
            if path in found:
                continue
            self._gone[path] = row.id
            if row.content_hash and (row.model == model_id or row.status == STATUS_FAILED):
                self._gone_by_hash.setdefault(row.content_hash, []).append(row.id)
        return candidates

    def _walk(self, roots: list[str]) -> dict[str, tuple[str, FoundFile]]:
        found: dict[str, tuple[str, FoundFile]] = {}
        for root in roots:
            for item in walk_images(
                root,
                include_hidden=self.settings.include_hidden,
                follow_symlinks=self.settings.follow_symlinks,
                exclude=[self.library.data_dir],
                on_error=self._walk_error,
            ):
                found.setdefault(item.path, (root, item))
        return found

    def _walk_error(self, path: str, reason: str) -> None:
        self.report.walk_errors.append((path, reason))

    def _claim_renames(self, changes: Changes, found: dict[str, tuple[str, FoundFile]], known: dict) -> None:
        """Files a reported rename explains keep their old row as they are: no read, no hash, no embedding."""
        gone = {path: row for path, row in known.items() if path not in found}
        for path, row in hinted_moves(changes.moves, {p: v for p, v in found.items() if p not in known}, gone,
                                      self.model_id).items():
            root, item = found.pop(path)
            self._claimed.add(row.id)
            candidate = Candidate(path, root, item.size, item.mtime_ns)
            self._renamed.append((MaybeMoved(candidate, row.content_hash or "", [row.id]), row.id))

    def _find_moved(self, digest: str, candidate: Candidate) -> list[int]:
        """Catalog rows with this content whose files are gone (runs in decoding threads)."""
        ids = [i for i in self._gone_by_hash.get(digest, ()) if i not in self._claimed]
        if ids:
            return ids
        # A move from a folder outside this run: rows elsewhere in the library whose files vanished.
        return [
            row.id for row in self.catalog.find_by_hash(digest)
            if row.id not in self._claimed and row.path not in self._found
            and (row.model == self.model_id or row.status == STATUS_FAILED)
            and not file_still_exists(row.path)
        ]

    # --- the pipeline ---------------------------------------------------------------------------
    def _model_on_gpu(self) -> bool:
        """Whether the model runs (or, still loading, will probably run) on a GPU: it sizes the decoding pool."""
        encoder = self._loaded_encoder()
        if encoder is not None:
            return model_may_run_on_gpu(str(getattr(encoder, "device", "cpu")))  # resolved: cpu, cuda[:N] or mps
        spec = getattr(self._source, "spec", None)
        try:
            return spec is not None and choose_runtime(spec) == "torch" and model_may_run_on_gpu(spec.device)
        except ConfigError:  # a bad runtime setting: the load reports it in its own words
            return False

    def _decodes_jpegs(self, encoder: Encoder) -> bool:
        """Whether JPEGs are to be left for the model's device to decode (setting gpu_jpeg_decode); warns if it can't."""
        if not self.settings.gpu_jpeg_decode:
            return False
        if not encoder.decodes_jpegs():
            log.warning("gpu_jpeg_decode is on, but the model does not run on a CUDA GPU with torchvision's "
                        "JPEG decoder: decoding JPEGs on the CPU (run the model with --device cuda, or drop "
                        "--gpu-jpeg-decode)")
            return False
        return True

    def _process(self, candidates: list[Candidate]) -> None:
        settings = self.settings
        workers = settings.decode_workers(model_on_gpu=self._model_on_gpu())
        window = max(2 * settings.batch_size, 4 * workers)
        pending: deque[Future] = deque()
        todo = deque(candidates)
        batch = _Batch()
        batch.moved.extend(self._renamed)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipsearch-decode")

        def submit(candidate: Candidate) -> None:
            encoder = self._loaded_encoder()
            if encoder is None and self._source.image_size_hint is None:
                encoder = self.encoder  # the size to decode at is unknown until the model is loaded
            pending.append(pool.submit(
                prepare, candidate, encoder.preprocess if encoder else None,
                image_size=encoder.image_size if encoder else self._source.image_size_hint,
                max_pixels=settings.max_image_pixels, find_moved=self._find_moved,
                jpeg_on_device=self._jpegs_on_device,  # False until the model has loaded
            ))

        try:
            while todo or pending:
                while todo and len(pending) < window:
                    submit(todo.popleft())
                if self.stop.is_set():
                    raise KeyboardInterrupt
                outcome = pending.popleft().result()
                if isinstance(outcome, MaybeMoved):
                    row_id = next((i for i in outcome.row_ids if i not in self._claimed), None)
                    if row_id is None:  # another copy took that row first: embed this one
                        outcome.candidate.allow_move = False
                        submit(outcome.candidate)
                        continue
                    self._claimed.add(row_id)
                    batch.moved.append((outcome, row_id))
                else:
                    self._add(batch, outcome)
                if self.progress:
                    self.progress.advance()
                if len(batch.prepared) >= settings.batch_size or len(batch) >= 4 * settings.batch_size:
                    if self._decode_ahead(batch):
                        continue
                    self._commit(batch)
                    batch = _Batch()
            self._commit(batch)
        except KeyboardInterrupt:
            self.report.interrupted = True
            for future in pending:
                future.cancel()
            batch.prepared.clear()  # decoded but not embedded: the next run redoes them
            self._commit(batch)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _decode_ahead(self, batch: _Batch) -> bool:
        """Whether to keep decoding instead of committing: photos wait for a model still loading, within bounds."""
        return bool(batch.prepared) and len(batch.prepared) < LOAD_AHEAD_IMAGES and self._loaded_encoder() is None

    def _commit(self, batch: _Batch) -> None:
        if not len(batch):
            return
        vectors = self._embed(batch) if batch.prepared else None
        with self.catalog.write() as session:
            embedded_ids = self._write_rows(session, batch, vectors)
        self._label(embedded_ids)

    def _embed(self, batch: _Batch) -> np.ndarray:
        """Vectors of the batch's prepared photos, encoded batch_size at a time."""
        encoder = self.encoder
        self._finish_preparing(batch, encoder)
        started = time.perf_counter()
        size, items = self.settings.batch_size, batch.prepared
        parts = [encoder.encode_images([p.model_input for p in items[i : i + size]]) for i in range(0, len(items), size)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
        self.report.encode_seconds += time.perf_counter() - started
        if vectors.shape != (len(items), encoder.dim):
            raise LibraryError(f"encoder returned vectors of shape {vectors.shape}", "this is a bug: please report it")
        return vectors

    def _finish_preparing(self, batch: _Batch, encoder: Encoder) -> None:
        """Decode on the model's device the JPEGs left as bytes, and preprocess photos decoded before the model was
        loaded (decoded again if the size guess was too small)."""
        items, batch.prepared = batch.prepared, []
        on_device = iter(decode_on_device([i for i in items if i.jpeg is not None], encoder,
                                          self.settings.max_image_pixels))
        for item in items:
            if item.jpeg is not None:
                self._add(batch, next(on_device))
            elif item.model_input is None and item.target_size is not None and item.target_size < encoder.image_size:
                self._add(batch, prepare(item.candidate, encoder.preprocess, image_size=encoder.image_size,
                                         max_pixels=self.settings.max_image_pixels, find_moved=None))
            else:
                self._add(batch, preprocess_decoded(item, encoder.preprocess) if item.model_input is None else item)

    def _add(self, batch: _Batch, outcome: Prepared | Failed | Unchanged) -> None:
        """File a prepared, failed or unchanged outcome in the batch (failures also go to the progress display)."""
        if isinstance(outcome, Prepared):
            batch.prepared.append(outcome)
        elif isinstance(outcome, Failed):
            batch.failed.append(outcome)
            if self.progress:
                self.progress.failed(outcome.candidate.path, outcome.reason)
        else:
            batch.unchanged.append(outcome)

    def _write_rows(self, session, batch: _Batch, vectors) -> list[int]:
        """Write a batch's outcomes into an open write session (vectors: one row per prepared item); the ids embedded."""
        model_id = self.model_id
        now = utcnow()
        # A few statements per batch, not a few per photo: round trips count once the catalog is on a server.
        existing = [item.candidate.existing_id for item in batch.prepared if item.candidate.existing_id is not None]
        for start in range(0, len(existing), 500):  # load the rows to update at once; session.get then finds them
            session.scalars(select(ImageRow).where(ImageRow.id.in_(existing[start : start + 500]))).all()
        rows: list[ImageRow] = []
        for item in batch.prepared:
            c, info = item.candidate, item.info
            values = dict(
                path=c.path, root=c.root, size=c.size, mtime_ns=c.mtime_ns, content_hash=item.content_hash,
                width=info.width, height=info.height, format=info.format, taken_at=info.taken_at,
                status=STATUS_OK, error=None, updated_at=now,
            )
            if c.existing_id is not None:
                row = session.get(ImageRow, c.existing_id)
                for key, value in values.items():
                    setattr(row, key, value)
                self.report.updated += 1
            else:
                row = ImageRow(**values, indexed_at=now)
                session.add(row)
                self.report.added += 1
            rows.append(row)
            self.report.decode_seconds += item.decode_seconds
        session.flush()  # the new rows in multi-row INSERT ... RETURNING statements: their ids
        embedded_ids = [row.id for row in rows]
        upsert_rows(session.connection(), EmbeddingRow.__table__, ("image_id",), ("image_id", "model", "vector"),
                    [(image_id, model_id, vector_to_blob(vectors[n])) for n, image_id in enumerate(embedded_ids)])
        self.report.embedded += len(batch.prepared)
        for failure in batch.failed:
            self._record_failure(session, failure, now)
        touch_images(session, [(u.candidate.existing_id, {"size": u.candidate.size, "mtime_ns": u.candidate.mtime_ns})
                               for u in batch.unchanged])
        self.report.unchanged += len(batch.unchanged)
        for moved, row_id in batch.moved:
            c = moved.candidate
            touch_images(session, [(row_id, {"path": c.path, "root": c.root, "size": c.size, "mtime_ns": c.mtime_ns})])
            self.report.moved += 1
        return embedded_ids

    def _label(self, image_ids: list[int]) -> None:
        """Give newly embedded photos their labels (sets applied before); never stops indexing."""
        if not image_ids:
            return
        from clipsearch.search.labels import apply_new

        try:
            apply_new(self.catalog, image_ids)
        except Exception as e:  # labels are derived: `clipsearch labels apply` recomputes them
            log.warning("could not label %d new photos (%s); run `clipsearch labels apply`", len(image_ids), e)

    def _label_uncalibrated(self) -> None:
        """Label the library with sets never applied with this model (after --reembed): new photos alone cannot."""
        from clipsearch.search.labels import apply_uncalibrated

        try:
            # The encoder only when a set needs new classifiers: a run with nothing to embed never waits for it.
            for report in apply_uncalibrated(self.catalog, lambda: self.encoder):
                log.info("labels: applied %s to %d photos", report.set_name, report.images)
        except Exception as e:  # labels are derived: `clipsearch labels apply` recomputes them
            log.warning("could not apply the label sets (%s); run `clipsearch labels apply`", e)

    def _record_failure(self, session, failure: Failed, now) -> None:
        c = failure.candidate
        self.report.failed.append((c.path, failure.reason))
        if failure.reason == VANISHED:
            # No row for a file that no longer exists: keep "catalog rows = image files" true.
            if c.existing_id is not None:
                session.execute(delete(ImageRow).where(ImageRow.id == c.existing_id))
            return
        values = dict(size=c.size, mtime_ns=c.mtime_ns, content_hash=failure.content_hash,
                      status=STATUS_FAILED, error=failure.reason, updated_at=now)
        if c.existing_id is not None:
            session.execute(delete(EmbeddingRow).where(EmbeddingRow.image_id == c.existing_id))
            touch_images(session, [(c.existing_id, values)])
        else:
            session.add(ImageRow(path=c.path, root=c.root, indexed_at=now, **values))

    def _remove_gone(self) -> None:
        gone_ids = [row_id for row_id in self._gone.values() if row_id not in self._claimed]
        with self.catalog.write() as session:
            for start in range(0, len(gone_ids), 500):
                session.execute(delete(ImageRow).where(ImageRow.id.in_(gone_ids[start : start + 500])))
        self.report.removed = len(gone_ids)

    def _touch_roots(self, roots: list[str]) -> None:
        with self.catalog.write() as session:
            for root in roots:
                session.merge(RootRow(path=root, last_indexed_at=utcnow()))

    def _sync_store(self) -> None:
        if self.sync_store:
            self.report.vectors = sync_vector_store(self.library)


def sync_vector_store(library: Library, prune: bool = True) -> int:
    """Bring the saved vector file up to date with the catalog (prune: forget the change log it covers); its count."""
    store = library.open_store()
    if store is None:
        return 0
    if prune and store.saved_generation is not None:
        # Readers reload the saved file before catching up, so the log before it is no longer needed.
        library.catalog.prune_changes(store.saved_generation)
    return store.count


def prepare_library_model(library: Library, encoder: Encoder, model: str, pretrained: str) -> None:
    """Record the encoder as the library's model, dropping vectors of any previous model (--reembed)."""
    recorded = library.catalog.library_model()
    if recorded is not None and recorded["model_id"] == encoder.model_id:
        return
    with library.catalog.write() as session:
        if recorded is not None:
            log.warning("re-embedding the library: dropping vectors of %s", recorded["model_id"])
            delete_embeddings(session)
        library.catalog.set_library_model(session, encoder.model_id, model, pretrained, encoder.dim)


def load_model(settings: Settings, model: str, pretrained: str) -> Encoder:
    """Load a model to index with, on the settings' device and precision, ready to embed images."""
    encoder = load_encoder(EncoderSpec(model, pretrained, settings.device, settings.precision, settings.model_cache_dir,
                                       settings.runtime))
    encoder.prepare_images()  # now, not when the first photo arrives (a watcher's first photo would wait for it)
    return encoder


def index_folders(
    settings: Settings,
    folders: Sequence[str | Path],
    *,
    reembed: bool = False,
    progress: IndexProgress | None = None,
    encoder: Encoder | None = None,
    stop: threading.Event | None = None,
) -> IndexReport:
    """Index folders into the settings' library (one writer at a time); the main entry point of indexing."""
    library = Library(settings)
    try:
        with library.writer_lock():
            model, pretrained = library.resolve_model(allow_change=reembed)
            # Loads while the folders are walked and the first photos decoded; not waited for if nothing needs it.
            source = encoder or BackgroundEncoder(EncoderSpec(model, pretrained, settings.device, settings.precision,
                                                              settings.model_cache_dir, settings.runtime))
            recorded = library.catalog.library_model()
            indexer = Indexer(library, source, progress, stop,
                              on_encoder=lambda loaded: prepare_library_model(library, loaded, model, pretrained))
            # A new or re-embedded library records its model even when there is no photo to embed.
            indexer.require_encoder = recorded is None or recorded["model_id"] != indexer.model_id
            return indexer.run(folders)
    finally:
        library.close()
