"""The vector store: a FAISS index derived from the catalog, saved atomically and rebuilt when stale or corrupt.

Small libraries use exact search; past IVF_THRESHOLD vectors an approximate IVF-SQ8 index takes over (see
bench/query_latency.py for the measurements behind the numbers). Rebuilds can run in a background thread while
searches keep using the current index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from clipsearch import ann
from clipsearch.catalog import Catalog
from clipsearch.errors import LibraryError

log = logging.getLogger(__name__)

MAGIC = b"CLIPSEARCH-FAISS\x01"
HEADER_LENGTH_BYTES = 8

KINDS = ("auto", "exact", "ivf")
# bench/query_latency.py, 2 cores, 512-d: exact p50 4.2 ms at 40k vectors and 6.2 ms at 50k (passes 5 ms at ~44k),
# 16 ms at 100k, 166 ms at 1M; IVF-SQ8 0.34 ms at 40k and 2 ms at 1M, recall@10 ~0.98. Back to exact below half.
IVF_THRESHOLD = 40_000
IVF_MIN_VECTORS = 1_000  # even a forced `ivf` stays exact below this: too few vectors to train lists on
RETRAIN_GROWTH = 4  # retrain once the library holds this many times the vectors the lists were trained for
REBUILD_ATTEMPTS = 3


class StoreFileError(Exception):
    """The store file is missing, damaged or of another format (the caller rebuilds it)."""


def _faiss():
    return ann.faiss_module()


def new_flat_index(dim: int):
    """An exact inner-product index addressed by catalog ids."""
    faiss = _faiss()
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def target_kind(requested: str, count: int, built: str = "exact") -> str:
    """The index kind ('exact' or 'ivf') that `count` vectors call for under the `vector_index` setting."""
    if requested not in KINDS:
        raise ValueError(f"unknown vector index kind {requested!r}: expected one of {', '.join(KINDS)}")
    if requested == "exact" or count < IVF_MIN_VECTORS:
        return "exact"
    if requested == "ivf":
        return "ivf"
    # Back to exact only at half the threshold, so a library hovering around it is not rebuilt back and forth.
    return "ivf" if count >= (IVF_THRESHOLD // 2 if built == "ivf" else IVF_THRESHOLD) else "exact"


def build_index(dim: int, ids: np.ndarray, vectors: np.ndarray, kind: str):
    """(index, params) of the given kind holding the vectors; params go into the file header."""
    if kind == "exact":
        index = new_flat_index(dim)
        if len(ids):
            index.add_with_ids(vectors, ids)
        return index, {"kind": "exact"}
    index = ann.build_ivf(vectors, ids)
    nprobe, recall = ann.calibrate_nprobe(index, vectors, ids)
    params = {"kind": "ivf", "nlist": int(index.nlist), "nprobe": nprobe, "trained_on": len(ids), "recall": round(recall, 4)}
    return index, params


class VectorStore:
    """Catalog ids -> vectors in FAISS, stamped with the model and catalog generation it reflects."""

    def __init__(self, path: Path, model_id: str, dim: int, index=None, generation: int = 0, kind: str = "auto",
                 params: dict | None = None):
        target_kind(kind, 0)  # validates the kind
        self.path = Path(path)
        self.model_id = model_id
        self.dim = dim
        self.index = index if index is not None else new_flat_index(dim)
        self.params = dict(params or {"kind": "exact"})  # kind built and its parameters (nlist, nprobe, trained_on)
        self.generation = generation
        self.requested_kind = kind  # the `vector_index` setting: auto, exact or ivf
        self.background = False  # rebuild in a thread (True) or inline (False)
        self.autosave = False  # save after a background rebuild
        self._unsaved = False  # built in memory and never saved
        self.saved_generation: int | None = None  # generation of the file on disk, when known
        # One lock for the index: FAISS indexes are not safe to search while ids are added or removed.
        self._lock = threading.RLock()
        self._rebuild_thread: threading.Thread | None = None
        self._failed_at: tuple | None = None  # (reason, count) of a failed background rebuild: not retried as is

    @property
    def count(self) -> int:
        """Number of vectors held."""
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        """The kind of index held now: 'exact' or 'ivf'."""
        return self.params["kind"]

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query (None for exact search)."""
        return self.params.get("nprobe")

    @property
    def rebuilding(self) -> bool:
        """Whether a background rebuild is running."""
        thread = self._rebuild_thread
        return thread is not None and thread.is_alive()

    # --- building and syncing -------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, catalog: Catalog, save: bool = True, kind: str = "auto",
             background: bool = False) -> "VectorStore | None":
        """Load the store for the catalog's model, catching up or rebuilding as needed; None if no model yet.

        kind is the `vector_index` setting. With background=True an approximate index is built in a thread
        (searches meanwhile use the current index); otherwise inline, before this returns.
        """
        target_kind(kind, 0)
        model = catalog.library_model()
        if model is None:
            return None
        model_id, dim = model["model_id"], int(model["dim"])
        # In the background mode a missing file is first replaced by an exact index (a plain copy, quick) so
        # searches need not wait for IVF training; the approximate index follows from the thread.
        first_kind = "exact" if background else kind
        try:
            store = cls.load(path)
            if store.model_id != model_id or store.dim != dim:
                log.info("vector index %s was built for %s: rebuilding it for %s", path, store.model_id, model_id)
                store = cls.rebuild(path, catalog, model_id, dim, first_kind)
        except FileNotFoundError:
            log.info("no vector index at %s yet: building it from the catalog", path)
            store = cls.rebuild(path, catalog, model_id, dim, first_kind)
        except StoreFileError as e:
            log.warning("vector index %s is unusable (%s): rebuilding it from the catalog", path, e)
            store = cls.rebuild(path, catalog, model_id, dim, first_kind)
        store.requested_kind, store.background, store.autosave = kind, background, save
        changed = store.sync(catalog)
        # A background rebuild saves when it is done; writing the interim index too would only cost time.
        if save and changed and not store.rebuilding:
            store.save_quietly()
        return store

    @classmethod
    def rebuild(cls, path: Path, catalog: Catalog, model_id: str, dim: int, kind: str = "auto") -> "VectorStore":
        """Build a fresh store from every vector the catalog holds for the model."""
        generation = catalog.generation()
        ids, vectors = catalog.vectors(model_id)
        index, params = build_index(dim, ids, vectors, target_kind(kind, len(ids)))
        store = cls(path, model_id, dim, index=index, generation=generation, kind=kind, params=params)
        store._unsaved = True
        return store

    def sync(self, catalog: Catalog) -> bool:
        """Apply the catalog's vector changes since this store's generation, rebuilding when due; True if changed."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, False
            changed = self._catch_up(catalog)
        if changed is None:
            # The change log no longer covers our stamp (pruned, or the catalog was replaced): start over.
            self._rebuild(catalog, "exact" if self.background else None)
            changed = True
        return self._maybe_rebuild(catalog) or changed or unsaved

    def _catch_up(self, catalog: Catalog) -> bool | None:
        """Apply logged changes to this index (caller holds the lock or owns the store); None if the log cannot tell."""
        newest, changed_ids = catalog.changes_since(self.generation)
        # Checked after reading the log: a prune committed before that read shows here, so the read was complete.
        if self.generation < catalog.log_floor() or self.generation > catalog.generation():
            return None
        if not changed_ids:
            return False
        id_array = np.fromiter(changed_ids, dtype=np.int64, count=len(changed_ids))
        self.index.remove_ids(id_array)  # remove before re-add: FAISS would keep duplicates
        ids, vectors = catalog.vectors(self.model_id, changed_ids)
        if len(ids):
            self.index.add_with_ids(vectors, ids)
        self.generation = newest
        return True

    def rebuild_reason(self) -> str | None:
        """Why the index should be rebuilt now (kind change, or outgrown IVF lists), or None."""
        count, kind = self.count, self.kind
        wanted = target_kind(self.requested_kind, count, kind)
        if wanted != kind:
            return f"{count} vectors with vector_index={self.requested_kind}: {kind} -> {wanted}"
        if kind == "ivf" and count > RETRAIN_GROWTH * self.params.get("trained_on", 0):
            return f"{count} vectors, IVF lists trained for {self.params.get('trained_on')}"
        return None

    def _maybe_rebuild(self, catalog: Catalog) -> bool:
        """Rebuild when due: inline (True when done) or by starting a background thread (False)."""
        with self._lock:  # one check-and-start at a time, so concurrent syncs start one thread
            reason = self.rebuild_reason()
            if reason is None or self.rebuilding or self._failed_at == (reason, self.count):
                return False
            if self.background:
                log.info("rebuilding the vector index in the background: %s", reason)
                self._rebuild_thread = threading.Thread(
                    target=self._rebuild_in_background, args=(catalog, reason), name="clipsearch-index-rebuild", daemon=True
                )
                self._rebuild_thread.start()
                return False
        log.info("rebuilding the vector index: %s", reason)
        self._rebuild(catalog)
        return True

    def _rebuild_in_background(self, catalog: Catalog, reason: str) -> None:
        # Daemon thread: a process exiting mid-build loses only this in-memory work; the saved file stays valid.
        try:
            self._rebuild(catalog)
            if self.autosave:
                self.save_quietly()
        except Exception as e:  # searches keep the current index; logged rather than lost in a thread
            self._failed_at = (reason, self.count)
            log.warning("background rebuild of the vector index failed (%s); keeping the current index", e, exc_info=True)

    def _rebuild(self, catalog: Catalog, kind: str | None = None) -> None:
        """Build a fresh index from the catalog outside the lock, catch it up with changes made meanwhile, swap it in."""
        for _ in range(REBUILD_ATTEMPTS):
            generation = catalog.generation()
            ids, vectors = catalog.vectors(self.model_id)
            wanted = kind or target_kind(self.requested_kind, len(ids), self.kind)
            index, params = build_index(self.dim, ids, vectors, wanted)
            del ids, vectors  # the index holds its own copy; at 1M vectors this is 2 GB
            fresh = VectorStore(self.path, self.model_id, self.dim, index=index, generation=generation, params=params)
            # Catch up outside the lock first (a long build may have missed many changes), then again under it
            # so the swapped-in index is current and the lock is held only for the last few changes.
            if fresh._catch_up(catalog) is None:
                continue  # the log was pruned past our snapshot while we built: build again
            with self._lock:
                if fresh._catch_up(catalog) is None:
                    continue
                self.index, self.params, self.generation = fresh.index, fresh.params, fresh.generation
                self._unsaved = True
            log.info("vector index rebuilt: %d vectors, %s", self.count, self.params)
            return
        raise LibraryError("the vector index could not catch up with a catalog that kept changing", "try again")

    def wait_for_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a background rebuild to finish; True when none is running any more."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join(timeout)
        return not self.rebuilding

    # --- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k'], ids [q, k']) by inner product, best first; k' = min(k, count); may pad with id -1.

        allowed_ids restricts the search to those catalog ids (filters), inside FAISS rather than after it.
        """
        queries = self._check_queries(queries)
        with self._lock:
            k = min(k, self.count if allowed_ids is None else len(allowed_ids))
            if k <= 0:
                return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
            params = self._search_params(allowed_ids)
            if params is None:
                return self.index.search(queries, k)
            return self.index.search(queries, k, params=params)

    def range_search(self, query: np.ndarray, min_score: float, allowed_ids: np.ndarray | None = None,
                     limit: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of every vector scoring above min_score for one query, best first, at most `limit`."""
        query = self._check_queries(query)[:1]
        with self._lock:
            if self.count == 0 or (allowed_ids is not None and len(allowed_ids) == 0):
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            params = self._search_params(allowed_ids)
            if params is None:
                lims, scores, ids = self.index.range_search(query, float(min_score))
            else:
                lims, scores, ids = self.index.range_search(query, float(min_score), params=params)
        scores, ids = scores[lims[0] : lims[1]], ids[lims[0] : lims[1]]
        order = np.argsort(-scores, kind="stable")[:limit]
        return scores[order], ids[order]

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query has {queries.shape[1]} dimensions, the store holds {self.dim}")
        return queries

    def _search_params(self, allowed_ids: np.ndarray | None):
        """FAISS search parameters restricting results to allowed_ids (None: no restriction)."""
        if allowed_ids is None:
            return None
        faiss = _faiss()
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
        if self.kind != "ivf":
            return faiss.SearchParameters(sel=selector)
        # A narrow filter leaves few candidates in the probed lists: probe more lists, in proportion, so a
        # filtered search finds as many of its matches as an unfiltered one does.
        widen = max(1.0, self.count / max(1, len(allowed_ids)))
        nprobe = int(min(self.index.nlist, np.ceil(self.params.get("nprobe", 16) * widen)))
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)

    def sample_ids(self, n: int, seed: int = 0) -> np.ndarray:
        """Up to n ids held by the store, drawn at random (reproducibly)."""
        faiss = _faiss()
        with self._lock:
            if self.kind == "ivf":
                invlists = self.index.invlists
                ids = np.concatenate([
                    faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
                    for lst in range(self.index.nlist) if invlists.list_size(lst)
                ] or [np.zeros(0, np.int64)])
            else:
                ids = faiss.vector_to_array(self.index.id_map)
        if len(ids) <= n:
            return ids
        return np.random.default_rng(seed).choice(ids, n, replace=False)

    def reconstruct(self, image_id: int) -> np.ndarray:
        """The stored vector of one id (decoded from 8 bits, so approximate, for IVF); KeyError if absent."""
        with self._lock:
            if self.kind == "ivf":
                return ann.ivf_reconstruct(self.index, int(image_id))
            try:
                return self.index.reconstruct(int(image_id))
            except RuntimeError as e:
                raise KeyError(image_id) from e

    def memory_bytes_per_vector(self) -> float:
        """Index bytes per vector held (serialized size / count; 0 when empty)."""
        with self._lock:
            return ann.serialized_size(self.index) / self.count if self.count else 0.0

    # --- files ----------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the store atomically: a temp file in the same folder, fsync, then rename over the old one."""
        faiss = _faiss()
        with self._lock:  # a consistent snapshot; the disk write happens outside the lock
            payload = faiss.serialize_index(self.index)
            generation = self.generation
            header = {"model_id": self.model_id, "dim": self.dim, "generation": generation, "count": self.count}
            header.update(self.params)
        header["sha256"] = hashlib.sha256(payload).hexdigest()
        header_bytes = json.dumps(header).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(MAGIC)
                out.write(len(header_bytes).to_bytes(HEADER_LENGTH_BYTES, "little"))
                out.write(header_bytes)
                out.write(memoryview(payload))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, self.path)
            self.saved_generation = generation
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def save_quietly(self) -> bool:
        """Save, but only log when the disk refuses: the store is derived and rebuilt on the next open."""
        try:
            self.save()
            return True
        except OSError as e:
            log.warning("could not save the vector index %s (%s); it will be rebuilt next time", self.path, e)
            return False

    @classmethod
    def load(cls, path: Path) -> "VectorStore":
        """Read a saved store; FileNotFoundError if absent, StoreFileError if damaged."""
        faiss = _faiss()
        data = Path(path).read_bytes()
        if not data.startswith(MAGIC):
            raise StoreFileError("not a clipsearch vector index")
        start = len(MAGIC) + HEADER_LENGTH_BYTES
        header_length = int.from_bytes(data[len(MAGIC) : start], "little")
        try:
            header = json.loads(data[start : start + header_length])
            payload = memoryview(data)[start + header_length :]
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise StoreFileError("checksum mismatch")
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
            params = _params_from_header(header, index)
            store = cls(path, header["model_id"], int(header["dim"]), index=index, generation=int(header["generation"]),
                        params=params)
        except StoreFileError:
            raise
        except Exception as e:  # faiss raises RuntimeError; a truncated header raises ValueError/KeyError
            raise StoreFileError(f"cannot be read: {e}") from e
        if store.count != int(header["count"]):
            raise StoreFileError("vector count does not match its header")
        store.saved_generation = store.generation
        return store


def _params_from_header(header: dict, index) -> dict:
    """The index parameters a header records, checked against the index; files from before `kind` hold exact indexes."""
    faiss = _faiss()
    kind = header.get("kind", "exact")
    if kind == "exact":
        if not isinstance(index, faiss.IndexIDMap2):
            raise StoreFileError("header says exact, the file holds another index")
        return {"kind": "exact"}
    if kind != "ivf" or not isinstance(index, faiss.IndexIVF) or index.nlist != int(header["nlist"]):
        raise StoreFileError(f"header kind {kind!r} does not match the index in the file")
    index.nprobe = int(header["nprobe"])
    return {key: header[key] for key in ("kind", "nlist", "nprobe", "trained_on", "recall") if key in header}


def store_size_bytes(path: Path) -> int:
    """Size of the store file on disk, 0 when absent."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0

