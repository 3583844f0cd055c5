"""The vector store: a FAISS index derived from the catalog, saved atomically and rebuilt when stale or corrupt.

Small libraries use exact search; past IVF_THRESHOLD vectors an approximate IVF-SQ8 index takes over (see
bench/query_latency.py for the measurements behind the numbers). Rebuilds can run in a background thread while
searches keep using the current index. The `disk` kind keeps IVF-SQ8 inverted lists in memory-mapped shard files
beside the store file, for libraries past the machine's RAM (clipsearch.ann_disk; bench/large_index.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from pathlib import Path

import numpy as np

from clipsearch import ann, ann_disk
from clipsearch.catalog import Catalog
from clipsearch.errors import LibraryError
from clipsearch.store_gpu import GpuMirror, gpu_count
from clipsearch.store_files import (HEADER_LENGTH_BYTES, MAGIC, MissingShardError, StoreFileError, missing_shards,
                                     newer_saved_generation, read_header, remove_unused_shards, save_lock)

log = logging.getLogger(__name__)


KINDS = ("auto", "exact", "ivf", "disk")
# bench/query_latency.py, 2 cores, 512-d: exact p50 4.2 ms at 40k vectors and 6.2 ms at 50k (passes 5 ms at ~44k),
# 16 ms at 100k, 166 ms at 1M; IVF-SQ8 0.34 ms at 40k and 2 ms at 1M, recall@10 ~0.98. Back to exact below half.
IVF_THRESHOLD = 40_000
IVF_MIN_VECTORS = 1_000  # even a forced `ivf` stays exact below this: too few vectors to train lists on
RETRAIN_GROWTH = 4  # retrain once the library holds this many times the vectors the lists were trained for
REBUILD_ATTEMPTS = 3
# disk: changes since the shards were written are held in RAM (delta + tombstones) until they pass this share of the
# shard vectors (and COMPACT_MIN), then fresh shards are built from the catalog, reusing the trained lists.
COMPACT_FRACTION = 0.1
COMPACT_MIN = 20_000


def _faiss():
    return ann.faiss_module()


def new_flat_index(dim: int):
    """An exact inner-product index addressed by catalog ids."""
    faiss = _faiss()
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def target_kind(requested: str, count: int, built: str = "exact") -> str:
    """The index kind ('exact', 'ivf' or 'disk') that `count` vectors call for under the `vector_index` setting."""
    if requested not in KINDS:
        raise ValueError(f"unknown vector index kind {requested!r}: expected one of {', '.join(KINDS)}")
    if requested == "exact" or count < IVF_MIN_VECTORS:
        return "exact"
    if requested in ("ivf", "disk"):
        return requested
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


def shard_folder(path: Path) -> Path:
    """Where a store file's disk-index shards live: a folder beside it."""
    path = Path(path)
    return path.with_name(path.name + ".shards")


def build_from_catalog(path: Path, catalog: Catalog, model_id: str, dim: int, requested: str, built: str = "exact",
                       forced: str | None = None, trained=None):
    """(index, params) for the model's vectors: a disk index streams them from the catalog, others read them all."""
    if (forced or requested) == "disk":
        count = ann_disk.count_vectors(catalog, model_id)
        if (forced or target_kind(requested, count, built)) == "disk":
            token = f"{catalog.generation()}-{secrets.token_hex(4)}"
            return ann_disk.build_from_catalog(catalog, model_id, dim, shard_folder(path), token, trained)
    ids, vectors = catalog.vectors(model_id)
    return build_index(dim, ids, vectors, forced or target_kind(requested, len(ids), built))


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
        self._swaps = 0  # indexes swapped in by rebuilds: with generation and count, the version a GPU copy reflects
        self._gpu: GpuMirror | None | bool = None  # None: not looked for yet; False: no GPU

    @property
    def count(self) -> int:
        """Number of vectors held."""
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        """The kind of index held now: 'exact', 'ivf' or 'disk'."""
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
        # Not for disk: an exact copy is what a library past RAM cannot hold.
        first_kind = "exact" if background and kind != "disk" else kind
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
            store.save_quietly(catalog)
        return store

    @classmethod
    def rebuild(cls, path: Path, catalog: Catalog, model_id: str, dim: int, kind: str = "auto") -> "VectorStore":
        """Build a fresh store from every vector the catalog holds for the model."""
        generation = catalog.generation()
        index, params = build_from_catalog(path, catalog, model_id, dim, kind)
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
            self._rebuild(catalog, "exact" if self.background and self.requested_kind != "disk" else None)
            changed = True
        return self._maybe_rebuild(catalog) or changed or unsaved

    def _catch_up(self, catalog: Catalog) -> bool | None:
        """Apply logged changes to this index (caller holds the lock or owns the store); None if the log cannot tell."""
        newest, changed_ids = catalog.changes_since(self.generation)
        # Checked after reading the log: a prune committed before that read shows here, so the read was complete.
        floor, generation = catalog.log_state()
        if self.generation < floor or self.generation > generation:
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
        if kind in ("ivf", "disk") and count > RETRAIN_GROWTH * self.params.get("trained_on", 0):
            return f"{count} vectors, IVF lists trained for {self.params.get('trained_on')}"
        if kind == "disk" and self.index.pending > max(COMPACT_MIN, COMPACT_FRACTION * self.index.sealed_count):
            return f"{self.index.pending} changes held in RAM beside {self.index.sealed_count} shard vectors"
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
                self.save_quietly(catalog)
        except Exception as e:  # searches keep the current index; logged rather than lost in a thread
            self._failed_at = (reason, self.count)
            log.warning("background rebuild of the vector index failed (%s); keeping the current index", e, exc_info=True)

    def _rebuild(self, catalog: Catalog, kind: str | None = None) -> None:
        """Build a fresh index from the catalog outside the lock, catch it up with changes made meanwhile, swap it in."""
        for _ in range(REBUILD_ATTEMPTS):
            generation = catalog.generation()
            # Compacting a disk index keeps its trained lists unless the library outgrew them.
            reuse = self.kind == "disk" and self.count <= RETRAIN_GROWTH * self.params.get("trained_on", 0)
            index, params = build_from_catalog(self.path, catalog, self.model_id, self.dim, self.requested_kind, self.kind,
                                               kind, self.index.trained if reuse else None)
            if params["kind"] == "disk" and "trained_on" not in params:
                params["trained_on"] = self.params["trained_on"]
            fresh = VectorStore(self.path, self.model_id, self.dim, index=index, generation=generation, params=params)
            # Catch up outside the lock first (a long build may have missed many changes), then again under it
            # so the swapped-in index is current and the lock is held only for the last few changes.
            if fresh._catch_up(catalog) is None:
                continue  # the log was pruned past our snapshot while we built: build again
            with self._lock:
                if fresh._catch_up(catalog) is None:
                    continue
                self.index, self.params, self.generation = fresh.index, fresh.params, fresh.generation
                self._swaps += 1
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
            if self.kind == "disk":
                return self.index.search(queries, k, allowed_ids, self._nprobe_for(allowed_ids))
            params = self._search_params(allowed_ids)
            if params is None:
                found = self._gpu_search(queries, k)
                return found if found is not None else self.index.search(queries, k)
            return self.index.search(queries, k, params=params)

    def _gpu_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """An unfiltered search on the GPU copy of the index when faiss has a GPU and the copy is current; else None."""
        if self._gpu is None:
            faiss = _faiss()
            self._gpu = GpuMirror(faiss) if gpu_count(faiss) else False
        if not self._gpu:
            return None
        return self._gpu.search(self._version(), self.kind, self.count, queries, k, self.nprobe, self._copy_under_lock)

    def _version(self) -> tuple[int, int, int]:
        return self._swaps, self.generation, self.count

    def _copy_under_lock(self, clone):
        with self._lock:
            return self._version(), clone(self.index)

    def range_search(self, query: np.ndarray, min_score: float, allowed_ids: np.ndarray | None = None,
                     limit: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of every vector scoring above min_score for one query, best first, at most `limit`."""
        query = self._check_queries(query)[:1]
        with self._lock:
            if self.count == 0 or (allowed_ids is not None and len(allowed_ids) == 0):
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            if self.kind == "disk":
                scores, ids = self.index.range_search(query, float(min_score), allowed_ids, self._nprobe_for(allowed_ids))
            else:
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
        return faiss.SearchParametersIVF(sel=selector, nprobe=self._nprobe_for(allowed_ids))

    def _nprobe_for(self, allowed_ids: np.ndarray | None) -> int:
        """IVF lists to probe for a search restricted to allowed_ids (None: unrestricted)."""
        nprobe = self.params.get("nprobe", 16)
        if allowed_ids is None:
            return nprobe
        # A narrow filter leaves few candidates in the probed lists: probe more lists, in proportion, so a
        # filtered search finds as many of its matches as an unfiltered one does.
        widen = max(1.0, self.count / max(1, len(allowed_ids)))
        return int(min(self.index.nlist, np.ceil(nprobe * widen)))

    def sample_ids(self, n: int, seed: int = 0) -> np.ndarray:
        """Up to n ids held by the store, drawn at random (reproducibly)."""
        faiss = _faiss()
        with self._lock:
            if self.kind == "disk":
                return self.index.sample_ids(n, seed)
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
            if self.kind == "disk":
                return self.index.reconstruct(int(image_id))
            if self.kind == "ivf":
                return ann.ivf_reconstruct(self.index, int(image_id))
            try:
                return self.index.reconstruct(int(image_id))
            except RuntimeError as e:
                raise KeyError(image_id) from e

    def memory_bytes_per_vector(self) -> float:
        """Index bytes per vector held in RAM (serialized size / count, disk: lists excluded; 0 when empty)."""
        with self._lock:
            size = self.index.ram_bytes() if self.kind == "disk" else ann.serialized_size(self.index)
            return size / self.count if self.count else 0.0

    # --- files ----------------------------------------------------------------------------------
    def save(self, catalog: Catalog | None = None) -> None:
        """Write the store atomically: a temp file in the same folder, fsync, then rename over the old one.

        A disk index's shard files are written once when built; this file names them and holds its in-RAM part.
        Processes saving at once (server workers, a watcher) take turns under a lock file; given the catalog, a
        saved file of a newer generation that the catalog can still catch up from is kept, so a slow save never
        puts an older index back.
        """
        faiss = _faiss()
        with self._lock:  # a consistent snapshot; the disk write happens outside the lock
            disk = self.kind == "disk"
            payload = self.index.state_bytes() if disk else faiss.serialize_index(self.index)
            generation = self.generation
            header = {"model_id": self.model_id, "dim": self.dim, "generation": generation, "count": self.count}
            header.update(self.params)
        folder = shard_folder(self.path)
        if disk:
            missing = missing_shards(folder, header)
            if missing:  # another process saved a newer build and removed these: its file is the one to keep
                raise FileNotFoundError(f"shard files {missing} of this index are gone from {folder}")
        header["sha256"] = hashlib.sha256(payload).hexdigest()
        header_bytes = json.dumps(header).encode()
        with save_lock(self.path):
            newer = newer_saved_generation(self.path, self.model_id, generation, catalog)
            if newer is not None:
                log.debug("vector index %s already holds generation %d, newer than %d: kept", self.path, newer, generation)
                self.saved_generation = newer
                return
            replaced = read_header(self.path) if folder.is_dir() else None
            ann_disk.write_atomically(self.path, lambda name: Path(name).write_bytes(
                MAGIC + len(header_bytes).to_bytes(HEADER_LENGTH_BYTES, "little") + header_bytes + memoryview(payload)
            ))
            self.saved_generation = generation
            if folder.is_dir():
                remove_unused_shards(folder, header, replaced)

    def save_quietly(self, catalog: Catalog | None = None) -> bool:
        """Save, but only log when the disk refuses: the store is derived and rebuilt on the next open."""
        try:
            self.save(catalog)
            return True
        except OSError as e:
            log.warning("could not save the vector index %s (%s); it will be rebuilt next time", self.path, e)
            return False

    @classmethod
    def load(cls, path: Path) -> "VectorStore":
        """Read a saved store; FileNotFoundError if absent, StoreFileError if damaged."""
        try:
            return cls._decode(path, Path(path).read_bytes())
        except MissingShardError:
            # A save by another process may have replaced the file and removed its shards after we read it.
            return cls._decode(path, Path(path).read_bytes())

    @classmethod
    def _decode(cls, path: Path, data: bytes) -> "VectorStore":
        faiss = _faiss()
        if not data.startswith(MAGIC):
            raise StoreFileError("not a clipsearch vector index")
        start = len(MAGIC) + HEADER_LENGTH_BYTES
        header_length = int.from_bytes(data[len(MAGIC) : start], "little")
        try:
            header = json.loads(data[start : start + header_length])
            payload = memoryview(data)[start + header_length :]
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise StoreFileError("checksum mismatch")
            if header.get("kind") == "disk":
                folder = shard_folder(path)
                if missing_shards(folder, header):
                    raise MissingShardError(f"shard files {missing_shards(folder, header)} are missing from {folder}")
                index = ann_disk.ShardedIVF.from_files(folder, header["shards"], header["ids_file"], bytes(payload),
                                                       int(header["nprobe"]))
            else:
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
    expected = ann_disk.ShardedIVF if kind == "disk" else faiss.IndexIVF
    if kind not in ("ivf", "disk") or not isinstance(index, expected) or index.nlist != int(header["nlist"]):
        raise StoreFileError(f"header kind {kind!r} does not match the index in the file")
    index.nprobe = int(header["nprobe"])
    keys = ("kind", "nlist", "nprobe", "trained_on", "recall", "shards", "ids_file")
    return {key: header[key] for key in keys if key in header}


def store_size_bytes(path: Path) -> int:
    """Size of the store file on disk with its shard files, 0 when absent."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return 0
    return size + ann_disk.folder_bytes(shard_folder(path))
