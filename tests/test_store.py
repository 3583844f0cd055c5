"""Vector store: FAISS results equal a brute-force numpy reference; saved atomically; rebuilt when stale or corrupt."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.catalog import Catalog, EmbeddingRow, ImageRow, vector_to_blob
from clipsearch.store import VectorStore
from sqlalchemy import delete

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def fill_catalog(catalog: Catalog, vectors: np.ndarray, model_id: str = "m/1") -> list[int]:
    ids = []
    with catalog.write() as session:
        catalog.set_library_model(session, model_id, "m", "1", vectors.shape[1])
        for n, vector in enumerate(vectors):
            row = ImageRow(path=f"/photos/{n}.jpg", root="/photos", size=1, mtime_ns=1, status="ok")
            session.add(row)
            session.flush()
            session.add(EmbeddingRow(image_id=row.id, model=model_id, vector=vector_to_blob(vector)))
            ids.append(row.id)
    return ids


def test_search_matches_brute_force(tmp_path, catalog):
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(300, 32)))
    ids = np.array(fill_catalog(catalog, vectors))
    store = VectorStore.open(tmp_path / "v.faiss", catalog)
    queries = unit(rng.normal(size=(5, 32)))
    scores, found = store.search(queries, 10)
    reference = queries @ vectors.T
    for q in range(5):
        order = np.argsort(-reference[q])[:10]
        np.testing.assert_array_equal(found[q], ids[order])
        np.testing.assert_allclose(scores[q], reference[q][order], rtol=1e-5, atol=1e-5)
    assert store.search(queries, 1000)[1].shape == (5, 300)


def test_saved_store_round_trips_and_catches_up(tmp_path, catalog):
    rng = np.random.default_rng(1)
    ids = fill_catalog(catalog, unit(rng.normal(size=(20, 8))))
    path = tmp_path / "v.faiss"
    store = VectorStore.open(path, catalog)
    assert path.exists() and store.count == 20
    with catalog.write() as session:
        session.execute(delete(ImageRow).where(ImageRow.id.in_(ids[:5])))  # cascades to embeddings
        session.get(EmbeddingRow, ids[5]).vector = vector_to_blob(np.eye(8, dtype=np.float32)[0])
    reopened = VectorStore.open(path, catalog)
    assert reopened.count == 15
    np.testing.assert_allclose(reopened.reconstruct(ids[5]), np.eye(8)[0])
    _, found = reopened.search(np.eye(8, dtype=np.float32)[:1], 1)
    assert found[0][0] == ids[5]
    assert VectorStore.load(path).generation == catalog.generation()


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "flip"])
def test_corrupt_store_is_rebuilt(tmp_path, catalog, damage):
    rng = np.random.default_rng(2)
    fill_catalog(catalog, unit(rng.normal(size=(10, 8))))
    path = tmp_path / "v.faiss"
    VectorStore.open(path, catalog)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not faiss at all")
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(data[:-20] + bytes(b ^ 0xFF for b in data[-20:]))
    store = VectorStore.open(path, catalog)
    assert store.count == 10
    assert VectorStore.load(path).count == 10


def test_pruned_log_forces_rebuild(tmp_path, catalog):
    rng = np.random.default_rng(3)
    fill_catalog(catalog, unit(rng.normal(size=(6, 8))))
    path = tmp_path / "v.faiss"
    old = VectorStore.open(path, catalog)
    stale_copy = VectorStore(path, old.model_id, old.dim, generation=0)  # as a reader that loaded long ago
    catalog.prune_changes(catalog.generation())
    assert stale_copy.sync(catalog) and stale_copy.count == 6


def test_store_for_other_model_is_rebuilt(tmp_path, catalog):
    rng = np.random.default_rng(4)
    fill_catalog(catalog, unit(rng.normal(size=(4, 8))))
    path = tmp_path / "v.faiss"
    VectorStore(path, "other/model", 8).save()
    store = VectorStore.open(path, catalog)
    assert store.model_id == "m/1" and store.count == 4


def test_no_model_means_no_store(tmp_path, catalog):
    assert VectorStore.open(tmp_path / "v.faiss", catalog) is None
