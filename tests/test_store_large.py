"""Large indexes: memory-mapped IVF shards searched together, against brute-force numpy and against one in-RAM index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch import ann, ann_disk
from clipsearch import store as store_module
from clipsearch.config import load_settings
from clipsearch.store import VectorStore, shard_folder, store_size_bytes
from tests.test_store_ann import bulk_fill, clustered, delete_ids, recall_at_10, set_vector


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 6,000 vectors, so a few thousand vectors already make several shard files."""
    monkeypatch.setattr(ann_disk, "SHARD_SIZE", 6_000)


def trained_ivf(vectors: np.ndarray, nlist: int = 64):
    index = ann.new_ivf(vectors.shape[1], nlist)
    index.train(vectors)
    return index


def chunks(ids: np.ndarray, vectors: np.ndarray, size: int = 1_000):
    return ((ids[i : i + size], vectors[i : i + size]) for i in range(0, len(ids), size))


def brute_force(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int = 10) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]


def test_disk_store_recall_against_brute_force(tmp_path, catalog, small_shards):
    vectors = clustered(20_000, 64)
    ids = bulk_fill(catalog, vectors)
    store = VectorStore.open(tmp_path / "v.faiss", catalog, kind="disk")
    assert store.kind == "disk" and store.count == 20_000 and len(store.index.shards) == 4
    faiss = ann.faiss_module()
    for shard in store.index.shards:  # lists mapped from the files, not read into RAM
        lists = faiss.downcast_InvertedLists(shard.invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    for queries in (clustered(200, 64, seed=7), clustered(200, 64, seed=8, noise=2.0)):
        scores, found = store.search(queries, 10)
        assert recall_at_10(found, brute_force(queries, vectors, ids)) >= 0.95
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # The same through the saved file, loaded again (memory-mapped).
    reopened = VectorStore.load(tmp_path / "v.faiss")
    queries = clustered(50, 64, seed=9)
    np.testing.assert_array_equal(reopened.search(queries, 10)[1], store.search(queries, 10)[1])


def test_mmap_loading_gives_the_same_results_as_ram(tmp_path):
    vectors = clustered(5_000, 32)
    ids = np.arange(100, 5_100, dtype=np.int64)
    index = trained_ivf(vectors)
    index.add_with_ids(vectors, ids)
    ann_disk.write_shard(index, tmp_path / "one.faiss")
    in_ram, mapped = ann_disk.read_shard(tmp_path / "one.faiss", mmap=False), ann_disk.read_shard(tmp_path / "one.faiss")
    queries = clustered(50, 32, seed=3)
    for nprobe in (4, 64):
        in_ram.nprobe = mapped.nprobe = nprobe
        ram_scores, ram_ids = in_ram.search(queries, 10)
        map_scores, map_ids = mapped.search(queries, 10)
        np.testing.assert_array_equal(map_ids, ram_ids)
        np.testing.assert_array_equal(map_scores, ram_scores)


def test_sharded_search_equals_one_index_holding_every_vector(tmp_path):
    vectors = clustered(9_000, 32)
    ids = np.arange(1, 9_001, dtype=np.int64) * 3  # sparse ids, as a catalog with deletions has
    trained = trained_ivf(vectors)
    names, sealed = ann_disk.build_shards(trained, chunks(ids, vectors), tmp_path, "t", shard_size=2_500)
    assert len(names) == 4 and np.array_equal(sealed, ids)
    sharded = ann_disk.ShardedIVF(trained, [ann_disk.read_shard(tmp_path / n) for n in names], sealed)
    whole = ann.faiss_module().clone_index(trained)
    whole.add_with_ids(vectors, ids)
    queries = clustered(40, 32, seed=5)
    allowed = ids[::7]
    faiss = ann.faiss_module()
    shards = faiss.IndexShards(32, False, False)  # faiss's own way of searching shards together
    for name in names:
        shards.add_shard(ann_disk.read_shard(tmp_path / name))
    for nprobe in (2, 16, 64):
        scores, found = sharded.search(queries, 10, nprobe=nprobe)
        whole_scores, whole_found = whole.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
        np.testing.assert_array_equal(found, whole_found)
        np.testing.assert_allclose(scores, whole_scores, rtol=1e-6)
        np.testing.assert_array_equal(found, shards.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))[1])
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=faiss.IDSelectorBatch(allowed))
        np.testing.assert_array_equal(sharded.search(queries, 10, allowed, nprobe)[1], whole.search(queries, 10, params=params)[1])
    lims, _, whole_ids = whole.range_search(queries[:1], 0.6, params=faiss.SearchParametersIVF(nprobe=64))
    assert set(sharded.range_search(queries[0], 0.6, nprobe=64)[1].tolist()) == set(whole_ids[lims[0] : lims[1]].tolist())
    # At nprobe = nlist the IVF scan is exhaustive: the true top 10 up to 8-bit rounding.
    found = sharded.search(queries, 10, nprobe=64)[1]
    assert recall_at_10(found, brute_force(queries, vectors, ids)) >= 0.95


def test_sharded_index_applies_removals_and_additions():
    vectors = clustered(3_000, 16)
    ids = np.arange(3_000, dtype=np.int64)
    trained = trained_ivf(vectors, nlist=16)
    shard = ann.faiss_module().clone_index(trained)
    shard.add_with_ids(vectors, ids)
    index = ann_disk.ShardedIVF(trained, [shard], ids, nprobe=16)
    index.remove_ids(ids[:10])
    index.remove_ids(ids[:10])  # twice: counted once
    moved = np.eye(16, dtype=np.float32)[:1]
    index.remove_ids(ids[20:21])
    index.add_with_ids(moved, ids[20:21])  # an update: the shard copy is dead, the delta holds the new one
    assert index.ntotal == 2_990 and index.pending == 12
    _, found = index.search(vectors[:30], 5)
    assert not set(found.ravel().tolist()) & set(range(10))
    assert index.search(moved, 1)[1][0, 0] == 20
    assert 20 not in index.search(vectors[20:21], 5)[1][0]  # its old vector no longer finds it
    np.testing.assert_allclose(index.reconstruct(20), moved[0], atol=0.02)
    with pytest.raises(KeyError):
        index.reconstruct(5)
    assert not set(index.sample_ids(3_000).tolist()) & set(range(10))


def test_disk_store_follows_deletions_updates_and_compacts(tmp_path, catalog, small_shards, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_MIN", 500)
    vectors = clustered(8_000, 32)
    ids = bulk_fill(catalog, vectors)
    path = tmp_path / "v.faiss"
    store = VectorStore.open(path, catalog, kind="disk")
    first_files = set(store.params["shards"])
    delete_ids(catalog, ids[:100])
    target = np.eye(32, dtype=np.float32)[3]  # far from every cluster: only the updated vector matches it
    set_vector(catalog, ids[500], target)
    added = bulk_fill(catalog, clustered(50, 32, seed=4), first_id=50_000)
    assert store.sync(catalog) and store.count == 7_950 and store.params["shards"] == sorted(first_files)
    assert not set(store.search(vectors[:100], 50)[1].ravel().tolist()) & set(ids[:100].tolist())
    assert store.search(target, 1)[1][0, 0] == ids[500]
    assert set(added.tolist()) <= set(store.search(clustered(50, 32, seed=4), 5)[1].ravel().tolist())
    # Saved and reopened: the changes held in RAM come back from the store file.
    store.save()
    reopened = VectorStore.open(path, catalog, kind="disk")
    assert reopened.count == 7_950 and reopened.index.pending == store.index.pending == 152
    assert reopened.search(target, 1)[1][0, 0] == ids[500]
    # Past COMPACT_FRACTION of the shard vectors, fresh shards are built (with the same trained lists).
    delete_ids(catalog, ids[1_000:1_800])
    reopened.sync(catalog)
    assert reopened.index.pending == 0 and reopened.count == 7_150
    assert reopened.params["trained_on"] == 8_000 and reopened.params["nlist"] == store.params["nlist"]
    assert not first_files & set(reopened.params["shards"])
    reopened.save()
    on_disk = {p.name for p in shard_folder(path).iterdir()}
    assert not first_files & on_disk and set(reopened.params["shards"]) <= on_disk  # the old shards were removed
    assert reopened.search(target, 1)[1][0, 0] == ids[500]
    assert not set(reopened.search(vectors[1_000:1_800], 20)[1].ravel().tolist()) & set(ids[1_000:1_800].tolist())
    assert store_size_bytes(path) > path.stat().st_size


@pytest.mark.parametrize("kind", ["exact", "disk"])
def test_crash_mid_save_leaves_the_previous_index_usable(tmp_path, catalog, monkeypatch, kind):
    vectors = clustered(2_000, 16)
    ids = bulk_fill(catalog, vectors)
    path = tmp_path / "v.faiss"
    store = VectorStore.open(path, catalog, kind=kind)
    queries = clustered(20, 16, seed=2)
    before = store.search(queries, 5)
    delete_ids(catalog, ids[:500])
    store.sync(catalog)
    real = ann_disk.write_atomically

    def crash_midway(target: Path, write):
        def half_then_crash(name: str) -> None:
            write(name)
            data = Path(name).read_bytes()
            Path(name).write_bytes(data[: len(data) // 2])  # the disk got half of it, then the process died
            raise KeyboardInterrupt("killed mid-save")

        real(target, half_then_crash)

    monkeypatch.setattr(ann_disk, "write_atomically", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        store.save()
    monkeypatch.setattr(ann_disk, "write_atomically", real)
    assert not list(tmp_path.glob("*.tmp")) and not list(shard_folder(path).glob("*.tmp"))
    previous = VectorStore.load(path)
    assert previous.kind == kind and previous.count == 2_000
    np.testing.assert_array_equal(previous.search(queries, 5)[1], before[1])
    assert VectorStore.open(path, catalog, kind=kind).count == 1_500  # and it catches up from the change log


def test_crash_while_writing_new_shards_keeps_the_saved_index(tmp_path, catalog, small_shards, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_MIN", 500)
    vectors = clustered(9_000, 16)
    ids = bulk_fill(catalog, vectors)
    path = tmp_path / "v.faiss"
    VectorStore.open(path, catalog, kind="disk")
    written = []
    real = ann_disk.write_shard

    def fail_second(index, target):
        if written:
            raise OSError("disk full")
        written.append(target)
        real(index, target)

    monkeypatch.setattr(ann_disk, "write_shard", fail_second)
    delete_ids(catalog, ids[:1_000])  # due a compaction (into two shards) on the next open
    with pytest.raises(OSError, match="disk full"):
        VectorStore.open(path, catalog, kind="disk")
    monkeypatch.setattr(ann_disk, "write_shard", real)
    saved = VectorStore.load(path)
    assert saved.count == 9_000 and saved.search(vectors[:1], 1)[1][0, 0] == ids[0]
    assert written[0].exists()  # the failed build's shard is left for a day: another process may be building
    reopened = VectorStore.open(path, catalog, kind="disk")
    assert reopened.count == 8_000 and reopened.index.pending == 0


def test_settings_choose_the_disk_index_end_to_end(tmp_path, fake_encoder, monkeypatch):
    from clipsearch.indexer.run import index_folders
    from clipsearch.library import Library
    from clipsearch.search.searcher import Searcher
    from tests.fakes import make_image

    monkeypatch.setattr(store_module, "IVF_MIN_VECTORS", 10)  # approximate from 10 photos, so a few dozen do
    colours = ["red", "blue", "green", "yellow"] * 8
    for n, colour in enumerate(colours):
        make_image(tmp_path / "photos" / f"{colour}{n}.png", colour, size=(16, 12), noise=n + 1)
    settings = load_settings({"data_dir": tmp_path / "library", "model": "test-colors", "pretrained": "v1",
                              "vector_index": "disk", "workers": 1, "batch_size": 8}, env={})
    index_folders(settings, [tmp_path / "photos"], encoder=fake_encoder)
    saved = VectorStore.load(settings.vector_store_path)
    assert saved.kind == "disk" and saved.count == len(colours) and saved.params["shards"]
    library = Library(settings)
    try:
        hits = Searcher(library, encoder=fake_encoder).search_text("a red photo", 5)
        assert len(hits) == 5 and all(Path(hit.path).name.startswith("red") for hit in hits)
    finally:
        library.close()


def test_disk_kind_rules_and_setting(monkeypatch):
    monkeypatch.setattr(store_module, "IVF_MIN_VECTORS", 1_000)
    assert store_module.target_kind("disk", 999) == "exact"  # too few vectors to train lists on
    assert store_module.target_kind("disk", 1_000) == "disk" and store_module.target_kind("disk", 10**8) == "disk"
    assert load_settings(env={"CLIPSEARCH_VECTOR_INDEX": "Disk"}).vector_index == "disk"
