"""The vector store: a FAISS index derived from the catalog, saved atomically and rebuilt when stale or corrupt."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from clipsearch.catalog import Catalog
from clipsearch.errors import LibraryError

log = logging.getLogger(__name__)

MAGIC = b"CLIPSEARCH-FAISS\x01"
HEADER_LENGTH_BYTES = 8


class StoreFileError(Exception):
    """The store file is missing, damaged or of another format (the caller rebuilds it)."""


def _faiss():
    import faiss  # lazy: heavy, and `clipsearch --help` must stay light

    return faiss


def new_flat_index(dim: int):
    """An exact inner-product index addressed by catalog ids."""
    faiss = _faiss()
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class VectorStore:
    """Catalog ids -> vectors in FAISS, stamped with the model and catalog generation it reflects."""

    def __init__(self, path: Path, model_id: str, dim: int, index=None, generation: int = 0):
        self.path = Path(path)
        self.model_id = model_id
        self.dim = dim
        self.index = index if index is not None else new_flat_index(dim)
        self.generation = generation
        self._unsaved = False  # built in memory and never saved
        self.saved_generation: int | None = None  # generation of the file on disk, when known

    @property
    def count(self) -> int:
        """Number of vectors held."""
        return int(self.index.ntotal)

    # --- building and syncing -------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, catalog: Catalog, save: bool = True) -> "VectorStore | None":
        """Load the store for the catalog's model, catching up or rebuilding as needed; None if no model yet."""
        model = catalog.library_model()
        if model is None:
            return None
        model_id, dim = model["model_id"], int(model["dim"])
        try:
            store = cls.load(path)
            if store.model_id != model_id or store.dim != dim:
                log.info("vector index %s was built for %s: rebuilding it for %s", path, store.model_id, model_id)
                store = cls.rebuild(path, catalog, model_id, dim)
        except FileNotFoundError:
            log.info("no vector index at %s yet: building it from the catalog", path)
            store = cls.rebuild(path, catalog, model_id, dim)
        except StoreFileError as e:
            log.warning("vector index %s is unusable (%s): rebuilding it from the catalog", path, e)
            store = cls.rebuild(path, catalog, model_id, dim)
        changed = store.sync(catalog)
        if save and changed:
            store.save_quietly()
        return store

    @classmethod
    def rebuild(cls, path: Path, catalog: Catalog, model_id: str, dim: int) -> "VectorStore":
        """Build a fresh store from every vector the catalog holds for the model."""
        generation = catalog.generation()
        ids, vectors = catalog.vectors(model_id)
        store = cls(path, model_id, dim, generation=generation)
        if len(ids):
            store.index.add_with_ids(vectors, ids)
        store._unsaved = True
        return store

    def sync(self, catalog: Catalog) -> bool:
        """Apply the catalog's vector changes since this store's generation; True if anything changed."""
        unsaved, self._unsaved = self._unsaved, False
        if self.generation < catalog.log_floor() or self.generation > catalog.generation():
            # The change log no longer covers our stamp (pruned, or the catalog was replaced): start over.
            fresh = VectorStore.rebuild(self.path, catalog, self.model_id, self.dim)
            self.index, self.generation = fresh.index, fresh.generation
            return True
        newest, changed_ids = catalog.changes_since(self.generation)
        if not changed_ids:
            return unsaved
        id_array = np.fromiter(changed_ids, dtype=np.int64, count=len(changed_ids))
        self.index.remove_ids(id_array)  # remove before re-add: IndexIDMap would keep duplicates
        ids, vectors = catalog.vectors(self.model_id, changed_ids)
        if len(ids):
            self.index.add_with_ids(vectors, ids)
        self.generation = newest
        return True

    # --- search ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k'], ids [q, k']) by inner product, best first; k' = min(k, count)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query has {queries.shape[1]} dimensions, the store holds {self.dim}")
        k = min(k, self.count)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.index.search(queries, k)
        return scores, ids

    def reconstruct(self, image_id: int) -> np.ndarray:
        """The stored vector of one id."""
        return self.index.reconstruct(int(image_id))

    # --- files ----------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the store atomically: a temp file in the same folder, fsync, then rename over the old one."""
        faiss = _faiss()
        payload = faiss.serialize_index(self.index).tobytes()
        header = json.dumps(
            {
                "model_id": self.model_id,
                "dim": self.dim,
                "generation": self.generation,
                "count": self.count,
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        ).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(MAGIC)
                out.write(len(header).to_bytes(HEADER_LENGTH_BYTES, "little"))
                out.write(header)
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, self.path)
            self.saved_generation = self.generation
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
            payload = data[start + header_length :]
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise StoreFileError("checksum mismatch")
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except StoreFileError:
            raise
        except Exception as e:  # faiss raises RuntimeError; a truncated header raises ValueError/KeyError
            raise StoreFileError(f"cannot be read: {e}") from e
        store = cls(path, header["model_id"], int(header["dim"]), index=index, generation=int(header["generation"]))
        if store.count != int(header["count"]):
            raise StoreFileError("vector count does not match its header")
        store.saved_generation = store.generation
        return store


def store_size_bytes(path: Path) -> int:
    """Size of the store file on disk, 0 when absent."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def require_store(path: Path, catalog: Catalog) -> VectorStore:
    """Open the store or raise LibraryError when the library has no vectors yet."""
    store = VectorStore.open(path, catalog)
    if store is None:
        raise LibraryError("the library holds no vectors yet", "run `clipsearch index DIR` first")
    return store
