"""Approximate nearest-neighbour helpers: small functions over arrays that build and tune a FAISS IVF-SQ8 index."""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

MAX_NLIST = 4096  # 4*sqrt(1M) = 4000: enough lists for a few million photos
TRAIN_PER_LIST = 40  # faiss warns below 39 points per centroid; 64 measured no better recall, twice the time
KMEANS_ITERATIONS = 10  # 25 gave the same recall@10 at 100k (0.989): SQ8 precision limits it, not k-means polish
SEED = 1234  # training sample and k-means: the same library gives the same index
# From 16: fewer lists save little time (1M vectors: 1.35 ms at 8, 1.6 ms at 16) and leave no margin for odd queries.
NPROBE_CHOICES = (16, 32, 64, 128, 256)
TARGET_RECALL = 0.97  # margin over the 0.95 goal: calibration queries come from the library itself
CALIBRATION_QUERIES = 256
FAR_QUERY_NOISE = 2.0  # noise norm relative to the unit vector: cosine 1/sqrt(1+2**2) ~ 0.45

_configured = False


def faiss_module():
    """faiss, imported lazily (heavy; `clipsearch --help` must stay light) and configured once."""
    global _configured
    import faiss

    if not _configured:
        # BLAS for query batches of any size, not only from 20 queries up (faiss's default). With faiss 1.15.1
        # on 2 cores it measured the same either way for IndexFlatIP (100k: 15.7 vs 15.9 ms single, 0.54 vs
        # 0.57 ms/query in 64s); kept because it reportedly helped small batches elsewhere and costs nothing.
        faiss.cvar.distance_compute_blas_threshold = 1
        _configured = True
    return faiss


def choose_nlist(n: int) -> int:
    """Number of IVF lists for n vectors: ~4*sqrt(n), capped, with at least 39 vectors per list to train on."""
    return int(max(1, min(MAX_NLIST, round(4 * math.sqrt(n)), n // 39)))


def training_sample(vectors: np.ndarray, nlist: int, seed: int = SEED) -> np.ndarray:
    """A reproducible random subset (in stored order) big enough to train nlist centroids."""
    size = min(len(vectors), TRAIN_PER_LIST * nlist)
    if size == len(vectors):
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return vectors[rows]


def new_ivf(dim: int, nlist: int):
    """An untrained IVF-SQ8 index (inner product) with the store's k-means settings."""
    faiss = faiss_module()
    index = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = SEED
    return index


def build_ivf(vectors: np.ndarray, ids: np.ndarray, nlist: int | None = None):
    """An IVF index with 8-bit scalar quantization (inner product), trained on a sample and filled with every vector."""
    nlist = nlist or choose_nlist(len(vectors))
    index = new_ivf(vectors.shape[1], nlist)
    index.train(training_sample(vectors, nlist))
    index.add_with_ids(vectors, ids)
    return index


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of truth (ids) that appears in the same row of found."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def calibration_queries(vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(near, near_ids, far): library vectors as queries, and the same pushed away from the data (cosine ~0.45)."""
    rng = np.random.default_rng(SEED)
    rows = rng.choice(len(vectors), min(CALIBRATION_QUERIES, len(vectors)), replace=False)
    near, near_ids = vectors[rows], ids[rows]
    far = near + rng.standard_normal(near.shape, dtype=np.float32) * np.float32(FAR_QUERY_NOISE / math.sqrt(near.shape[1]))
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    return near, near_ids, far


def calibrate_nprobe(index, vectors: np.ndarray, ids: np.ndarray, k: int = 10,
                     target: float = TARGET_RECALL) -> tuple[int, float]:
    """(nprobe, recall@k): the fewest lists to probe whose recall@k vs exact search meets the target.

    Two query sets, and the worse recall counts: library vectors (self-match dropped), and library vectors
    pushed away from the data (cosine ~0.45 to their source), standing in for text queries that fall between
    photo clusters and need more lists probed. When SQ8 precision caps recall below the target, the fewest
    lists within 0.005 of the best recall seen (more probing would only cost time).
    """
    faiss = faiss_module()
    near, near_ids, far = calibration_queries(vectors, ids)
    _, near_rows = faiss.knn(near, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    _, far_rows = faiss.knn(far, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)

    def search(queries, wanted, nprobe):
        index.nprobe = nprobe
        return index.search(queries, wanted)[1]

    nprobe, recall = choose_nprobe(search, index.nlist, (near, near_ids, ids[near_rows]), (far, ids[far_rows]), k, target)
    index.nprobe = nprobe
    return nprobe, recall


def choose_nprobe(search, nlist: int, near: tuple, far: tuple, k: int = 10,
                  target: float = TARGET_RECALL) -> tuple[int, float]:
    """(nprobe, recall@k) from exact answers: near = (queries, their own ids, top k+1 ids), far = (queries, top k ids).

    search(queries, k, nprobe) returns ids; it may search one index or several shards together.
    """
    (near_queries, near_ids, near_top), (far_queries, far_top) = near, far
    near_truth = _drop_self(near_top, near_ids, k)
    measured = []
    choices = sorted({p for p in NPROBE_CHOICES if p < nlist} | {min(nlist, NPROBE_CHOICES[-1])})
    for nprobe in choices:
        near_found = _drop_self(search(near_queries, k + 1, nprobe), near_ids, k)
        far_found = search(far_queries, k, nprobe)
        recall = min(recall_at(near_found, near_truth), recall_at(far_found, far_top))
        measured.append((nprobe, round(recall, 4)))
        if recall >= target:
            break
    if measured[-1][1] >= target:
        nprobe, recall = measured[-1]
    else:
        best = max(r for _, r in measured)
        nprobe, recall = next((p, r) for p, r in measured if r >= best - 0.005)
    log.info("IVF nprobe %d of %d lists: recall@%d %.3f (measured %s)", nprobe, nlist, k, recall, measured)
    return nprobe, recall


def _drop_self(found: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without its query's own id, cut to k columns (padded with -1)."""
    rows = [row[row != qid][:k] for row, qid in zip(found, query_ids)]
    return np.array([np.pad(r, (0, k - len(r)), constant_values=-1) for r in rows])


def ivf_reconstruct(index, image_id: int) -> np.ndarray:
    """The (decoded, approximate) vector of one id in an IVF index, found by scanning the list ids; KeyError if absent."""
    faiss = faiss_module()
    invlists = index.invlists
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        # No direct map is kept: it would cost ~16 bytes per vector and updates, to speed up a rare call.
        offsets = np.flatnonzero(faiss.rev_swig_ptr(invlists.get_ids(list_no), size) == image_id)
        if offsets.size:
            vector = np.empty(index.d, dtype=np.float32)
            index.reconstruct_from_offset(list_no, int(offsets[0]), faiss.swig_ptr(vector))
            return vector
    raise KeyError(image_id)


def serialized_size(index) -> int:
    """Bytes the index takes once serialized (close to its memory footprint)."""
    return int(faiss_module().serialize_index(index).nbytes)
