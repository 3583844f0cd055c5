"""IVF indexes larger than RAM: immutable shard files memory-mapped from disk and searched together.

A disk index is a trained IVF-SQ8 index split into shards of at most SHARD_SIZE vectors, each a plain faiss file
read with IO_FLAG_MMAP: faiss keeps the centroids and list sizes in RAM and maps the inverted lists (codes and ids)
from the file, so the OS page cache holds the lists and can drop them under memory pressure. Shard files are never
modified (they are written to a temp name, fsynced and renamed), which keeps saves atomic and lets several server
processes share one copy in the page cache. Changes since the shards were built live in RAM: a small IVF "delta"
index sharing the trained quantizer, and tombstones (sorted ids whose shard copy is dead); the store compacts
them into fresh shards by a rebuild once they grow (see clipsearch.store).

Searching the parts together is what faiss's IndexShardsIVF does: the shared coarse quantizer ranks the lists
once per query, then each part scans its own copy of those lists (search_preassigned) and the top k are merged.
It is done here rather than with IndexShardsIVF, which in faiss 1.15.1 ignores the IDSelector of the search
parameters (tombstones and filters would leak through), and rather than with IndexShards, which gives the same
results (tested) but runs the coarse quantizer again for every shard: 4 shards, 2,000 lists of 512-d, one thread,
4.6 ms a query against 1.2 ms.

faiss.contrib.ondisk.merge_ondisk (OnDiskInvertedLists) was not used: its index file names its .ivfdata file by
path and adds or removes write into that file in place, so a crash mid-change could leave the two inconsistent.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from sqlalchemy import func, select

from clipsearch import ann
from clipsearch.catalog import Catalog, EmbeddingRow

log = logging.getLogger(__name__)

SHARD_SIZE = 1_000_000  # vectors per shard file: a build holds one shard's codes in RAM (~0.5 GB at 512-d SQ8)
READ_CHUNK = 50_000  # rows per catalog read while streaming (100 MB of float32 at 512-d)
IDS_SUFFIX = "-ids.npy"


def faiss_mmap_flag() -> int:
    """read_index flags that map IVF inverted lists from the file instead of reading them into RAM."""
    return ann.faiss_module().IO_FLAG_MMAP


# --- reading the catalog in bounded memory ------------------------------------------------------------------
def count_vectors(catalog: Catalog, model_id: str) -> int:
    """Number of stored vectors of a model (without reading them)."""
    with catalog.read() as session:
        return int(session.scalar(select(func.count()).select_from(EmbeddingRow).where(EmbeddingRow.model == model_id)))


def all_ids(catalog: Catalog, model_id: str, chunk: int = 1_000_000) -> np.ndarray:
    """Sorted ids of every vector of a model (8 bytes each; the vectors are not read)."""
    parts, last = [], -1
    while True:
        with catalog.read() as session:
            query = select(EmbeddingRow.image_id).where(EmbeddingRow.model == model_id, EmbeddingRow.image_id > last)
            rows = session.scalars(query.order_by(EmbeddingRow.image_id).limit(chunk)).all()
        if not rows:
            break
        parts.append(np.asarray(rows, dtype=np.int64))
        last = int(rows[-1])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# --- files ----------------------------------------------------------------------------------------------------
def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call write(temp_name) for a temp file beside path, fsync it, then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        with open(tmp_name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_shard(index, path: Path) -> None:
    """Write one shard index file atomically."""
    write_atomically(path, lambda name: ann.faiss_module().write_index(index, name))


def read_shard(path: Path, mmap: bool = True):
    """A shard index: inverted lists memory-mapped (mmap=True, read-only) or read into RAM."""
    faiss = ann.faiss_module()
    index = faiss.read_index(str(path), faiss_mmap_flag() if mmap else 0)
    if mmap:
        # faiss would start prefetch_nthread (32) threads per search to read the probed lists ahead; with the
        # lists mapped the kernel reads them on demand, and those threads cost more than the search (measured on
        # 2 busy cores, 512-d, nprobe 64: one 5k-vector shard 2.35 -> 1.81 ms a query, four shards 11.7 -> 7.7 ms).
        ann.faiss_module().downcast_InvertedLists(index.invlists).prefetch_nthread = 0
    return index


def shard_names(token: str, count: int) -> list[str]:
    """File names of a build's shards (the token keeps builds apart in one folder)."""
    return [f"{token}-{n:04d}.faiss" for n in range(count)]


def build_shards(trained, chunks: Iterable[tuple[np.ndarray, np.ndarray]], folder: Path, token: str,
                 shard_size: int | None = None, on_chunk: Callable[[np.ndarray, np.ndarray], None] | None = None
                 ) -> tuple[list[str], np.ndarray]:
    """Fill copies of a trained empty IVF index from (ids, vectors) chunks in id order, writing a shard file every
    shard_size vectors; (file names, sorted ids of all vectors written). Holds one shard in RAM at a time."""
    faiss = ann.faiss_module()
    shard_size = shard_size or SHARD_SIZE
    names: list[str] = []
    id_parts: list[np.ndarray] = []
    shard = faiss.clone_index(trained)

    def flush():
        nonlocal shard
        name = shard_names(token, len(names) + 1)[-1]
        write_shard(shard, folder / name)
        names.append(name)
        shard = faiss.clone_index(trained)

    for ids, vectors in chunks:
        if on_chunk is not None:
            on_chunk(ids, vectors)
        id_parts.append(ids)
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, shard_size - shard.ntotal)
            shard.add_with_ids(vectors[start : start + take], ids[start : start + take])
            start += take
            if shard.ntotal >= shard_size:
                flush()
    if shard.ntotal or not names:
        flush()
    sealed = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
    if np.any(np.diff(sealed) <= 0):
        raise ValueError("chunks must come in increasing id order")
    write_atomically(folder / f"{token}{IDS_SUFFIX}", lambda name: _save_array(name, sealed))
    return names, sealed


def _save_array(name: str, array: np.ndarray) -> None:
    with open(name, "wb") as out:  # a file object: np.save would append .npy to a bare name
        np.save(out, array)


# --- the index ------------------------------------------------------------------------------------------------
class ShardedIVF:
    """Memory-mapped IVF shards + an in-RAM delta index + tombstones, searched as one index by catalog id."""

    def __init__(self, trained, shards: list, sealed_ids: np.ndarray, delta=None, tombstones: np.ndarray | None = None,
                 nprobe: int = 16):
        faiss = ann.faiss_module()
        self.trained = trained  # empty, trained: the quantizer and SQ ranges every part shares
        self.shards = shards
        self.sealed_ids = sealed_ids  # sorted ids held by the shards (a memory-mapped .npy once saved)
        self.delta = delta if delta is not None else faiss.clone_index(trained)
        self.tombstones = np.zeros(0, np.int64) if tombstones is None else np.asarray(tombstones, np.int64)
        self.nprobe = nprobe

    @property
    def nlist(self) -> int:
        """Number of inverted lists (the same in every part)."""
        return int(self.trained.nlist)

    @property
    def d(self) -> int:
        """Vector dimension."""
        return int(self.trained.d)

    @property
    def sealed_count(self) -> int:
        """Vectors held by the shard files, dead ones included."""
        return len(self.sealed_ids)

    @property
    def ntotal(self) -> int:
        """Live vectors: shard vectors not tombstoned, plus the delta."""
        return self.sealed_count - len(self.tombstones) + int(self.delta.ntotal)

    @property
    def pending(self) -> int:
        """Changes held in RAM since the shards were written (delta vectors + tombstones)."""
        return int(self.delta.ntotal) + len(self.tombstones)

    def _in_sealed(self, ids: np.ndarray) -> np.ndarray:
        positions = np.searchsorted(self.sealed_ids, ids)
        inside = positions < len(self.sealed_ids)
        found = np.zeros(len(ids), bool)
        found[inside] = np.asarray(self.sealed_ids[positions[inside]]) == ids[inside]
        return found

    def remove_ids(self, ids: np.ndarray) -> None:
        """Forget these ids: removed from the delta, tombstoned in the shards."""
        ids = np.unique(np.asarray(ids, np.int64))
        self.delta.remove_ids(ids)
        self.tombstones = np.union1d(self.tombstones, ids[self._in_sealed(ids)])

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors (ids not held already: remove them first) to the in-RAM delta."""
        self.delta.add_with_ids(vectors, np.asarray(ids, np.int64))

    def _params(self, selector, nprobe: int | None):
        """IVF search parameters probing nprobe lists, restricted to the ids a selector accepts (None: all)."""
        faiss = ann.faiss_module()
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(nprobe or self.nprobe)) if selector is not None \
            else faiss.SearchParametersIVF(nprobe=int(nprobe or self.nprobe))

    def _selectors(self, allowed_ids: np.ndarray | None):
        """(selector for the shards, selector for the delta): tombstones mask shard copies only."""
        faiss = ann.faiss_module()
        allowed = None if allowed_ids is None else faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, np.int64))
        if not len(self.tombstones):
            return allowed, allowed
        live = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.tombstones))  # faiss's wrapper keeps the inner one alive
        if allowed is None:
            return live, None
        return faiss.IDSelectorAnd(allowed, live), allowed

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [q, k] by inner product, best first, padded with id -1, over the shards and the delta."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nprobe = int(min(self.nlist, nprobe or self.nprobe))
        sealed_sel, delta_sel = self._selectors(allowed_ids)
        coarse_scores, coarse_lists = self.trained.quantizer.search(queries, nprobe)  # once for every part
        parts = [(shard, sealed_sel) for shard in self.shards] + [(self.delta, delta_sel)]
        results = [
            search_preassigned(part, queries, k, coarse_lists, coarse_scores, self._params(selector, nprobe))
            for part, selector in parts if part.ntotal
        ]
        if not results:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        return merge_results(results, k)

    def range_search(self, query: np.ndarray, threshold: float, allowed_ids: np.ndarray | None = None,
                     nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the vectors scoring above threshold for one query, unordered."""
        query = np.ascontiguousarray(np.atleast_2d(query)[:1], dtype=np.float32)
        sealed_sel, delta_sel = self._selectors(allowed_ids)
        scores, ids = [], []
        parts = [(shard, sealed_sel) for shard in self.shards] + [(self.delta, delta_sel)]
        for part, selector in parts:  # one query: each part ranks its own lists
            if part.ntotal:
                lims, part_scores, part_ids = part.range_search(query, float(threshold), params=self._params(selector, nprobe))
                scores.append(part_scores[lims[0] : lims[1]])
                ids.append(part_ids[lims[0] : lims[1]])
        if not scores:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return np.concatenate(scores), np.concatenate(ids)

    def live_sealed(self, ids: np.ndarray) -> np.ndarray:
        """Which of these ids are held by a shard and not tombstoned."""
        return self._in_sealed(ids) & ~np.isin(ids, self.tombstones)

    def reconstruct(self, image_id: int) -> np.ndarray:
        """The decoded (8-bit, approximate) vector of one id; KeyError if absent."""
        try:
            return ann.ivf_reconstruct(self.delta, image_id)
        except KeyError:
            pass
        if not self.live_sealed(np.array([image_id], np.int64))[0]:
            raise KeyError(image_id)
        # Shards hold consecutive runs of the sorted ids: the position tells which shard.
        position = int(np.searchsorted(self.sealed_ids, image_id))
        ends = np.cumsum([shard.ntotal for shard in self.shards])
        return ann.ivf_reconstruct(self.shards[int(np.searchsorted(ends, position, side="right"))], image_id)

    def sample_ids(self, n: int, seed: int = 0) -> np.ndarray:
        """Up to n live ids drawn at random (reproducibly)."""
        rng = np.random.default_rng(seed)
        picked = self.sealed_ids[np.sort(rng.choice(self.sealed_count, min(n, self.sealed_count), replace=False))]
        picked = np.asarray(picked)[~np.isin(picked, self.tombstones)]
        faiss = ann.faiss_module()
        invlists = self.delta.invlists
        delta_ids = [faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
                     for lst in range(self.nlist) if invlists.list_size(lst)]
        ids = np.concatenate([picked, *delta_ids])
        return ids if len(ids) <= n else rng.choice(ids, n, replace=False)

    def ram_bytes(self) -> int:
        """Approximate bytes this index keeps in RAM (centroids per shard, the delta, tombstones); lists excluded."""
        centroids = self.nlist * self.d * 4
        return centroids * (1 + len(self.shards)) + ann.serialized_size(self.delta) + self.tombstones.nbytes

    # --- state kept beside the shard files -----------------------------------------------------------------------
    def state_bytes(self) -> bytes:
        """The in-RAM part (delta index with its trained quantizer, tombstones) as bytes for the store file."""
        delta = ann.faiss_module().serialize_index(self.delta).tobytes()
        return len(delta).to_bytes(8, "little") + delta + self.tombstones.astype("<i8").tobytes()

    @classmethod
    def from_files(cls, folder: Path, names: list[str], ids_name: str, state: bytes, nprobe: int) -> "ShardedIVF":
        """Open shards (memory-mapped), their id list and the saved in-RAM state."""
        faiss = ann.faiss_module()
        length = int.from_bytes(state[:8], "little")
        delta = faiss.deserialize_index(np.frombuffer(state[8 : 8 + length], dtype=np.uint8))
        tombstones = np.frombuffer(state[8 + length :], dtype="<i8").astype(np.int64)
        trained = faiss.clone_index(delta)
        trained.reset()
        shards = [read_shard(folder / name) for name in names]
        sealed_ids = np.load(folder / ids_name, mmap_mode="r")
        if sum(shard.ntotal for shard in shards) != len(sealed_ids):
            raise ValueError("shard files do not match their id list")
        for shard in shards:
            if shard.nlist != trained.nlist or shard.d != trained.d:
                raise ValueError("a shard file was built with other lists")
        return cls(trained, shards, sealed_ids, delta, tombstones, nprobe)


def search_preassigned(index, queries: np.ndarray, k: int, coarse_lists: np.ndarray, coarse_scores: np.ndarray,
                       params) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of an IVF index scanning the given lists per query (faiss's python wrapper drops params)."""
    faiss = ann.faiss_module()
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    coarse_lists = np.ascontiguousarray(coarse_lists, dtype=np.int64)
    coarse_scores = np.ascontiguousarray(coarse_scores, dtype=np.float32)
    index.search_preassigned_c(len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(coarse_lists),
                               faiss.swig_ptr(coarse_scores), faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)
    return scores, ids


def merge_results(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) by inner product over several (scores, ids) results of the same queries; -1 ids last."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores, top_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if top_ids.shape[1] < k:  # fewer candidates than k in all: pad as faiss does
        pad = k - top_ids.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
    return top_scores, top_ids


# --- building from the catalog -----------------------------------------------------------------------------------
def train_from_catalog(catalog: Catalog, model_id: str, dim: int, ids: np.ndarray) -> tuple[object, np.ndarray, np.ndarray]:
    """(trained empty IVF-SQ8, sample ids, sample vectors): k-means on a random sample read by id, not on everything."""
    nlist = ann.choose_nlist(len(ids))
    size = min(len(ids), ann.TRAIN_PER_LIST * nlist)
    sample_ids = np.sort(np.random.default_rng(ann.SEED).choice(ids, size, replace=False))
    sample_ids, sample = catalog.vectors(model_id, sample_ids.tolist())
    trained = ann.new_ivf(dim, nlist)
    trained.train(sample)
    return trained, sample_ids, sample


def build_from_catalog(catalog: Catalog, model_id: str, dim: int, folder: Path, token: str, trained=None,
                       k: int = 10) -> tuple[ShardedIVF, dict]:
    """(index, params): shards streamed from the catalog, nprobe calibrated against exact answers gathered on the way.

    RAM: one shard of codes, one read chunk, the training sample and 16 bytes of ids per vector; never every
    vector at once.
    """
    faiss = ann.faiss_module()
    ids = all_ids(catalog, model_id)
    if trained is None or len(ids) < trained.nlist:
        trained, sample_ids, sample = train_from_catalog(catalog, model_id, dim, ids)
        trained_on = len(ids)
    else:
        rows = np.sort(np.random.default_rng(ann.SEED).choice(len(ids), min(len(ids), ann.CALIBRATION_QUERIES), replace=False))
        sample_ids, sample = catalog.vectors(model_id, ids[rows].tolist())
        trained_on = None
    del ids
    near, near_ids, far = ann.calibration_queries(sample, sample_ids)
    near_heap, far_heap = faiss.ResultHeap(len(near), k + 1, keep_max=True), faiss.ResultHeap(len(far), k, keep_max=True)

    def exact_answers(chunk_ids, vectors):  # brute force over each chunk as it streams by: exact top-k in one pass
        for heap, queries in ((near_heap, near), (far_heap, far)):
            scores, rows = faiss.knn(queries, vectors, min(heap.k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, chunk_ids[rows])

    names, sealed_ids = build_shards(trained, catalog.vector_chunks(model_id, READ_CHUNK), folder, token, on_chunk=exact_answers)
    near_heap.finalize()
    far_heap.finalize()
    index = ShardedIVF(trained, [read_shard(folder / name) for name in names], np.load(folder / f"{token}{IDS_SUFFIX}", mmap_mode="r"))
    nprobe, recall = ann.choose_nprobe(
        lambda queries, wanted, probe: index.search(queries, wanted, nprobe=probe)[1],
        index.nlist, (near, near_ids, near_heap.I), (far, far_heap.I), k,
    )
    index.nprobe = nprobe
    params = {"kind": "disk", "nlist": index.nlist, "nprobe": nprobe, "recall": round(recall, 4),
              "shards": names, "ids_file": f"{token}{IDS_SUFFIX}"}
    if trained_on is not None:
        params["trained_on"] = trained_on
    log.info("disk index built: %d vectors in %d shards, %s", len(sealed_ids), len(names), params)
    return index, params


def missing_files(folder: Path, names: list[str]) -> list[str]:
    """The names that are not files in folder."""
    return [name for name in names if not (folder / name).is_file()]


def remove_unused_files(folder: Path, keep: set[str], dropped: set[str], orphan_seconds: float) -> None:
    """Delete the files in folder named in dropped, and any other not in keep older than orphan_seconds.

    Files of a build still under way in another process are young and named by no store file yet, so they stay.
    Processes that mapped a removed file keep reading it (POSIX keeps unlinked files open).
    """
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        try:
            if entry.name in dropped or time.time() - entry.stat().st_mtime > orphan_seconds:
                entry.unlink()
        except OSError as e:  # e.g. Windows refuses to delete a mapped file: tried again at the next save
            log.debug("could not remove %s: %s", entry, e)


def folder_bytes(folder: Path) -> int:
    """Total size of the files in a folder (0 when absent)."""
    try:
        return sum(entry.stat().st_size for entry in folder.iterdir() if entry.is_file())
    except OSError:
        return 0
