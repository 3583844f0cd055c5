"""The GPU copy of the vector index, exercised on the CPU with a stand-in for faiss-gpu.

faiss-gpu cannot run here, so index_cpu_to_gpu is replaced by a counted CPU clone: what is tested is the logic
around it (when the copy is used, refreshed, bypassed or given up), with results checked against the CPU index.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sqlalchemy import delete

from clipsearch import store as store_module
from clipsearch import store_gpu
from clipsearch.ann import faiss_module
from clipsearch.catalog import EmbeddingRow, ImageRow, vector_to_blob
from clipsearch.store import VectorStore
from tests.test_store import fill_catalog, unit


class CountedCopy:
    """A CPU clone standing in for a GPU index: it counts the searches it answers."""

    def __init__(self, index, owner):
        self._index, self._owner = index, owner
        self.nprobe_seen = []

    @property
    def ntotal(self):
        return self._index.ntotal

    @property
    def nprobe(self):
        return getattr(self._index, "nprobe", None)

    @nprobe.setter
    def nprobe(self, value):
        self.nprobe_seen.append(value)
        self._index.nprobe = value

    def search(self, queries, k):
        self._owner.gpu_searches += 1
        if self._owner.fail_search:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self._index.search(queries, k)


class OneGpuFaiss:
    """faiss with one pretend GPU."""

    def __init__(self):
        self._real = faiss_module()
        self.copies = self.gpu_searches = 0
        self.fail_copy = self.fail_search = False

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return 1

    def StandardGpuResources(self):
        return object()

    def index_cpu_to_gpu(self, resources, device, index):
        if self.fail_copy:
            raise RuntimeError("out of memory on device 0")
        self.copies += 1
        return CountedCopy(self._real.clone_index(index), self)


@pytest.fixture
def gpu_faiss(monkeypatch):
    fake = OneGpuFaiss()
    monkeypatch.setattr(store_module, "_faiss", lambda: fake)
    monkeypatch.setattr(store_gpu, "MIN_VECTORS", 100)
    return fake


def settled_search(store, queries, k):
    """Search, let a started copy finish, and search again (the second may use the GPU copy)."""
    store.search(queries, k)
    if store._gpu:
        store._gpu.wait(30)
    return store.search(queries, k)


def brute_force(vectors, ids, queries, k):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_unfiltered_searches_use_a_current_gpu_copy(tmp_path, catalog, gpu_faiss):
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(400, 16)))
    ids = np.array(fill_catalog(catalog, vectors))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)
    queries = unit(rng.normal(size=(4, 16)))
    first = store.search(queries, 10)  # no copy yet: answered on the CPU while one is made
    assert gpu_faiss.gpu_searches == 0
    store._gpu.wait(30)
    scores, found = store.search(queries, 10)
    assert gpu_faiss.copies == 1 and gpu_faiss.gpu_searches == 1
    expected_scores, expected_ids = brute_force(vectors, ids, queries, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    np.testing.assert_array_equal(first[1], found)


def test_a_change_sends_searches_to_the_cpu_until_the_copy_is_made_again(tmp_path, catalog, gpu_faiss):
    rng = np.random.default_rng(1)
    ids = fill_catalog(catalog, unit(rng.normal(size=(300, 8))))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)
    target = np.eye(8, dtype=np.float32)[:1]
    settled_search(store, target, 1)
    with catalog.write() as session:
        session.get(EmbeddingRow, ids[7]).vector = vector_to_blob(target[0])
        session.execute(delete(ImageRow).where(ImageRow.id.in_(ids[:3])))
    store.sync(catalog)
    searches = gpu_faiss.gpu_searches
    _, found = store.search(target, 1)  # the copy is stale: the CPU answers, and sees the change
    assert found[0][0] == ids[7] and gpu_faiss.gpu_searches == searches
    store._gpu.wait(30)
    _, found = store.search(target, 300)
    assert gpu_faiss.copies == 2 and gpu_faiss.gpu_searches == searches + 1
    assert found[0][0] == ids[7] and not set(ids[:3]) & set(found[0].tolist()) and store.count == 297


def test_filtered_and_range_searches_stay_on_the_cpu(tmp_path, catalog, gpu_faiss):
    # GPU indexes ignore IDSelectors (faiss#3924) and cannot range_search.
    rng = np.random.default_rng(2)
    ids = np.array(fill_catalog(catalog, unit(rng.normal(size=(300, 8)))))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)
    queries = unit(rng.normal(size=(2, 8)))
    settled_search(store, queries, 5)
    searches = gpu_faiss.gpu_searches
    allowed = ids[::10]
    _, found = store.search(queries, 5, allowed_ids=allowed)
    assert set(found.ravel().tolist()) <= set(allowed.tolist())
    store.range_search(queries[:1], 0.2)
    assert gpu_faiss.gpu_searches == searches


def test_small_libraries_and_disk_indexes_are_not_copied(tmp_path, catalog, gpu_faiss, monkeypatch):
    rng = np.random.default_rng(3)
    fill_catalog(catalog, unit(rng.normal(size=(50, 8))))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)
    settled_search(store, unit(rng.normal(size=(1, 8))), 3)
    assert gpu_faiss.copies == 0
    mirror = store_gpu.GpuMirror(gpu_faiss, min_vectors=1)
    assert mirror.search((0, 0, 50), "disk", 5_000, np.zeros((1, 8), np.float32), 3, 8, lambda clone: None) is None
    assert gpu_faiss.copies == 0


def test_ivf_copies_get_the_calibrated_nprobe(tmp_path, catalog, gpu_faiss, monkeypatch):
    monkeypatch.setattr(store_module, "IVF_THRESHOLD", 1_000)
    monkeypatch.setattr(store_module, "IVF_MIN_VECTORS", 1_000)
    rng = np.random.default_rng(4)
    centres = unit(rng.normal(size=(20, 16)))
    vectors = unit(centres[rng.integers(0, 20, 2_000)] + 0.3 * rng.normal(size=(2_000, 16)))
    ids = np.array(fill_catalog(catalog, vectors))
    store = VectorStore.open(tmp_path / "v.faiss", catalog, kind="ivf")
    assert store.kind == "ivf"
    queries = vectors[:20]
    _, found = settled_search(store, queries, 10)
    copy = store._gpu._copy
    assert gpu_faiss.gpu_searches == 1 and copy.nprobe_seen[-1] == store.nprobe
    _, truth = brute_force(vectors, ids, queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert recall >= 0.95


@pytest.mark.parametrize("failure", ["fail_copy", "fail_search"])
def test_a_gpu_failure_falls_back_to_the_cpu_for_good(tmp_path, catalog, gpu_faiss, failure, caplog):
    rng = np.random.default_rng(5)
    vectors = unit(rng.normal(size=(200, 8)))
    ids = np.array(fill_catalog(catalog, vectors))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)
    setattr(gpu_faiss, failure, True)
    queries = unit(rng.normal(size=(3, 8)))
    with caplog.at_level(logging.WARNING, logger="clipsearch.store_gpu"):
        _, found = settled_search(store, queries, 5)
        _, again = store.search(queries, 5)
    assert "searching on the CPU from now on" in caplog.text and store._gpu.disabled
    np.testing.assert_array_equal(found, brute_force(vectors, ids, queries, 5)[1])
    np.testing.assert_array_equal(again, found)
    copies = gpu_faiss.copies
    store.search(queries, 5)
    assert gpu_faiss.copies == copies  # no copy is tried again


def test_without_gpus_nothing_is_copied(tmp_path, catalog):
    rng = np.random.default_rng(6)
    fill_catalog(catalog, unit(rng.normal(size=(30, 8))))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)
    store.search(unit(rng.normal(size=(1, 8))), 3)
    assert store._gpu is False  # faiss-cpu has no get_num_gpus, or it says 0
    assert store_gpu.gpu_count(object()) == 0
