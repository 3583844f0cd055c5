"""Approximate vector search: IVF-SQ8 recall against brute force, change-log sync, auto switching, background rebuilds."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from sqlalchemy import delete, insert, update

from clipsearch import store as store_module
from clipsearch.catalog import Catalog, EmbeddingRow, ImageRow, vector_to_blob
from clipsearch.config import load_settings
from clipsearch.errors import ConfigError
from clipsearch.store import MAGIC, HEADER_LENGTH_BYTES, VectorStore, target_kind

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


def clustered(n: int, dim: int, clusters: int = 200, seed: int = 0, noise: float = 1.0) -> np.ndarray:
    """Unit vectors around fixed random cluster centres (the same centres for every seed)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    rows = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32) * (noise / np.sqrt(dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def bulk_fill(catalog: Catalog, vectors: np.ndarray, first_id: int = 1, model_id: str = "m/1") -> np.ndarray:
    """Insert images with these vectors in one transaction (Core executemany: tens of thousands of rows per second)."""
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    with catalog.write() as session:
        catalog.set_library_model(session, model_id, "m", "1", vectors.shape[1])
        session.execute(insert(ImageRow), [
            {"id": int(i), "path": f"/photos/{i}.jpg", "root": "/photos", "size": 1, "mtime_ns": 1, "status": "ok"}
            for i in ids
        ])
        session.execute(insert(EmbeddingRow), [
            {"image_id": int(i), "model": model_id, "vector": vector_to_blob(v)} for i, v in zip(ids, vectors)
        ])
    return ids


def delete_ids(catalog: Catalog, ids) -> None:
    with catalog.write() as session:
        session.execute(delete(ImageRow).where(ImageRow.id.in_([int(i) for i in ids])))  # cascades to embeddings


def set_vector(catalog: Catalog, image_id: int, vector: np.ndarray) -> None:
    with catalog.write() as session:
        row = update(EmbeddingRow).where(EmbeddingRow.image_id == int(image_id))
        session.execute(row.values(vector=vector_to_blob(vector)))


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / t.size for f, t in zip(found, truth)]))


@pytest.fixture
def low_threshold(monkeypatch):
    """auto switches to IVF from 2,000 vectors (and back below 1,000) so tests stay small."""
    monkeypatch.setattr(store_module, "IVF_THRESHOLD", 2_000)
    monkeypatch.setattr(store_module, "IVF_MIN_VECTORS", 1_000)


def test_ivf_recall_against_brute_force(tmp_path, catalog):
    vectors = clustered(30_000, 96)
    ids = bulk_fill(catalog, vectors)
    store = VectorStore.open(tmp_path / "v.faiss", catalog, kind="ivf")
    assert store.kind == "ivf" and store.count == 30_000
    assert 16 <= store.nprobe <= store.params["nlist"] and store.params["trained_on"] == 30_000
    # Fresh queries from the library's distribution, and ones pushed away from it (like text queries).
    for queries in (clustered(200, 96, seed=7), clustered(200, 96, seed=8, noise=2.0)):
        truth = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
        scores, found = store.search(queries, 10)
        assert recall_at_10(found, truth) >= 0.95
        assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert store.memory_bytes_per_vector() < 96 + 40  # 8-bit codes + id, against 4 * 96 + 8 for exact


def test_ivf_follows_deletions_and_updates(tmp_path, catalog):
    vectors = clustered(3_000, 32)
    ids = bulk_fill(catalog, vectors)
    path = tmp_path / "v.faiss"
    store = VectorStore.open(path, catalog, kind="ivf")
    assert store.kind == "ivf"
    gone = ids[:100]
    delete_ids(catalog, gone)
    target = np.eye(32, dtype=np.float32)[3]  # far from every cluster: only the updated vector matches it
    set_vector(catalog, ids[500], target)
    assert store.sync(catalog) and store.count == 2_900 and store.kind == "ivf"
    _, found = store.search(vectors[:100], 50)  # the deleted vectors themselves as queries
    assert not set(found.ravel().tolist()) & set(gone.tolist())
    assert store.search(target, 1)[1][0][0] == ids[500]
    np.testing.assert_allclose(store.reconstruct(ids[700]), vectors[700], atol=0.02)  # decoded from 8 bits
    with pytest.raises(KeyError):
        store.reconstruct(gone[0])
    # The same through a saved file reopened later.
    store.save()
    delete_ids(catalog, ids[100:200])
    reopened = VectorStore.open(path, catalog, kind="ivf")
    assert reopened.count == 2_800 and reopened.kind == "ivf"
    assert not set(reopened.search(vectors[100:200], 50)[1].ravel().tolist()) & set(ids[100:200].tolist())


def test_auto_switches_to_ivf_and_back(tmp_path, catalog, low_threshold):
    first = bulk_fill(catalog, clustered(1_500, 32))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)  # default kind: auto
    assert store.kind == "exact"
    second = bulk_fill(catalog, clustered(1_000, 32, seed=1), first_id=10_000)
    assert store.sync(catalog) and store.kind == "ivf" and store.count == 2_500
    assert VectorStore.load(tmp_path / "v.faiss").kind == "exact"  # sync alone never writes the file
    delete_ids(catalog, first[:1_000])  # 1,500 left: not below half the threshold, so no back-and-forth
    store.sync(catalog)
    assert store.kind == "ivf" and store.count == 1_500
    delete_ids(catalog, second[:600])
    store.sync(catalog)
    assert store.kind == "exact" and store.count == 900
    exact = VectorStore.open(tmp_path / "other.faiss", catalog, kind="exact")
    bulk_fill(catalog, clustered(2_000, 32, seed=2), first_id=20_000)
    exact.sync(catalog)
    assert exact.kind == "exact"  # never approximate when asked for exact


def test_ivf_is_retrained_after_growth(tmp_path, catalog, monkeypatch):
    monkeypatch.setattr(store_module, "RETRAIN_GROWTH", 2)
    bulk_fill(catalog, clustered(1_200, 32))
    store = VectorStore.open(tmp_path / "v.faiss", catalog, kind="ivf")
    assert store.params["trained_on"] == 1_200
    bulk_fill(catalog, clustered(1_000, 32, seed=1), first_id=10_000)
    store.sync(catalog)
    assert store.params["trained_on"] == 1_200  # 2,200 is not yet twice 1,200
    bulk_fill(catalog, clustered(300, 32, seed=2), first_id=20_000)
    store.sync(catalog)
    assert store.params["trained_on"] == 2_500 and store.count == 2_500


class BlockedBuilds:
    """Holds every IVF build until released, so a test can act while a rebuild is under way."""

    def __init__(self, monkeypatch):
        self.started = threading.Event()
        self.release = threading.Event()
        self.builds = 0
        real = store_module.build_index

        def build_index(dim, ids, vectors, kind):
            if kind == "ivf":
                self.builds += 1
                self.started.set()
                assert self.release.wait(20)
            return real(dim, ids, vectors, kind)

        monkeypatch.setattr(store_module, "build_index", build_index)


def test_background_rebuild_serves_searches_and_catches_up(tmp_path, catalog, low_threshold, monkeypatch):
    blocked = BlockedBuilds(monkeypatch)
    vectors = clustered(1_500, 32)
    ids = bulk_fill(catalog, vectors)
    path = tmp_path / "v.faiss"
    store = VectorStore.open(path, catalog, background=True)
    added = bulk_fill(catalog, clustered(1_000, 32, seed=1), first_id=10_000)
    store.sync(catalog)  # past the threshold: the IVF build starts in a thread
    assert blocked.started.wait(10) and store.rebuilding and store.kind == "exact"
    # Searches keep working on the current index, and changes keep flowing into it.
    assert store.search(vectors[:5], 1)[1][:, 0].tolist() == ids[:5].tolist()
    delete_ids(catalog, ids[:50])
    target = np.eye(32, dtype=np.float32)[5]
    set_vector(catalog, ids[60], target)
    late = bulk_fill(catalog, clustered(10, 32, seed=3), first_id=30_000)
    store.sync(catalog)
    assert store.count == 2_460 and store.search(target, 1)[1][0][0] == ids[60]
    assert not store.wait_for_rebuild(0.05)
    blocked.release.set()
    assert store.wait_for_rebuild(30)
    # The swapped-in index includes the changes made during the build.
    assert store.kind == "ivf" and store.count == 2_460 and store.generation == catalog.generation()
    assert not set(store.search(vectors[:50], 50)[1].ravel().tolist()) & set(ids[:50].tolist())
    assert store.search(target, 1)[1][0][0] == ids[60]
    assert {int(i) for i in late} <= set(store.search(clustered(10, 32, seed=3), 5)[1].ravel().tolist())
    assert added[0] in store.search(clustered(1_000, 32, seed=1)[:1], 5)[1][0]
    saved = VectorStore.load(path)  # saved by the thread, since open() was asked to save
    assert saved.kind == "ivf" and saved.count == 2_460 and blocked.builds == 1


def test_background_rebuild_restarts_when_the_log_is_pruned_under_it(tmp_path, catalog, low_threshold, monkeypatch):
    blocked = BlockedBuilds(monkeypatch)
    ids = bulk_fill(catalog, clustered(2_500, 32))
    store = VectorStore.open(tmp_path / "v.faiss", catalog, background=True, save=False)
    assert blocked.started.wait(10) and store.kind == "exact"
    delete_ids(catalog, ids[:10])
    catalog.prune_changes(catalog.generation())  # as an indexer in another process would after saving
    blocked.release.set()
    assert store.wait_for_rebuild(30)
    assert blocked.builds == 2 and store.kind == "ivf" and store.count == 2_490
    assert store.generation == catalog.generation()


def test_save_load_keeps_kind_and_parameters(tmp_path, catalog):
    vectors = clustered(3_000, 32)
    bulk_fill(catalog, vectors)
    path = tmp_path / "v.faiss"
    store = VectorStore.open(path, catalog, kind="ivf")
    loaded = VectorStore.load(path)
    assert loaded.kind == "ivf" and loaded.params == store.params
    assert loaded.index.nprobe == store.nprobe
    queries = clustered(20, 32, seed=9)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], store.search(queries, 10)[1])
    header = json.loads(path.read_bytes()[len(MAGIC) + HEADER_LENGTH_BYTES :].split(b"}", 1)[0] + b"}")
    assert {"kind", "nlist", "nprobe", "trained_on"} <= set(header)


def test_old_header_without_kind_loads_as_exact(tmp_path, catalog):
    bulk_fill(catalog, clustered(50, 8))
    path = tmp_path / "v.faiss"
    VectorStore.open(path, catalog)
    data = path.read_bytes()
    start = len(MAGIC) + HEADER_LENGTH_BYTES
    length = int.from_bytes(data[len(MAGIC) : start], "little")
    header = json.loads(data[start : start + length])
    del header["kind"]
    old = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(old).to_bytes(HEADER_LENGTH_BYTES, "little") + old + data[start + length :])
    loaded = VectorStore.load(path)
    assert loaded.kind == "exact" and loaded.count == 50
    assert VectorStore.open(path, catalog).count == 50


def test_corrupt_ivf_file_is_rebuilt(tmp_path, catalog):
    bulk_fill(catalog, clustered(2_000, 32))
    path = tmp_path / "v.faiss"
    VectorStore.open(path, catalog, kind="ivf")
    data = path.read_bytes()
    path.write_bytes(data[:-20] + bytes(b ^ 0xFF for b in data[-20:]))
    store = VectorStore.open(path, catalog, kind="ivf")
    assert store.kind == "ivf" and store.count == 2_000
    assert VectorStore.load(path).kind == "ivf"


def test_kind_rules_and_setting(monkeypatch):
    monkeypatch.setattr(store_module, "IVF_THRESHOLD", 50_000)
    monkeypatch.setattr(store_module, "IVF_MIN_VECTORS", 1_000)
    assert target_kind("auto", 49_999) == "exact" and target_kind("auto", 50_000) == "ivf"
    assert target_kind("auto", 30_000, built="ivf") == "ivf" and target_kind("auto", 24_999, built="ivf") == "exact"
    assert target_kind("ivf", 999) == "exact" and target_kind("ivf", 1_000) == "ivf"
    assert target_kind("exact", 10**7) == "exact"
    with pytest.raises(ValueError, match="auto, exact, ivf"):
        target_kind("hnsw", 10)
    assert load_settings(env={}).vector_index == "auto"
    assert load_settings(env={"CLIPSEARCH_VECTOR_INDEX": "IVF"}).vector_index == "ivf"
    with pytest.raises(ConfigError, match="auto, exact, ivf"):
        load_settings(env={"CLIPSEARCH_VECTOR_INDEX": "hnsw"})
