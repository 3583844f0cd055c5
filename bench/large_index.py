"""Large-library index benchmark (run by hand, not a test): memory, latency and recall per index kind; JSON on stdout.

For each size it generates clustered 512-d unit vectors (bench/query_latency.py's generator), trains one coarse
quantizer (the store's IVF settings: ~4*sqrt(n) lists, k-means on 40 vectors per list) and assigns every vector
once, then writes to files:
  exact      IndexIDMap2(IndexFlatIP), what `vector_index = exact` holds
  ivf_flat   IndexIVFFlat: float32 vectors in the lists
  ivf_sq8    IndexIVFScalarQuantizer 8-bit, what `vector_index = ivf` holds
  disk       the same lists split into --shard-size shard files read with faiss.IO_FLAG_MMAP and searched together
             (clipsearch.ann_disk.ShardedIVF, what `vector_index = disk` holds)
  ivf_pq     IndexIVFPQ, --pq-m bytes per vector (residual product quantization)
Each kind is then loaded in a fresh process, which reports:
  file_bytes_per_vector       size on disk / n
  ram_mb_per_million          growth of the process's private (anonymous) memory from loading and searching,
                              per million vectors: what the index needs in RAM
  page_cache_mb_per_million   file pages mapped by the process after the searches (RssFile): the OS cache, which
                              it shrinks under memory pressure (disk only: lists are read from the files)
  nprobe, calibration_recall  lists probed, chosen as the store does (recall@10 >= 0.97 on calibration queries
                              from the library, else the plateau) -- not tuned on the measured queries
  recall_at_10                against exact search, queries from the library's distribution ("near") and pushed
                              away from it like text queries ("far")
  single_p50/p95_ms, cold_single_p50_ms   one query at a time, warm, and the first queries after load (disk: the
                              shard files were dropped from the page cache first with posix_fadvise, so they
                              are read from the disk)
Machines are shared and noisy; compare figures from the same run.

    python bench/large_index.py                                   # 200k and 1M vectors (~10 min, ~5 GB RAM, ~5 GB disk)
    python bench/large_index.py --sizes 50000 --queries 100       # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query_latency import clustered, load_average, percentile_ms  # noqa: E402

from clipsearch import ann, ann_disk, store  # noqa: E402

log = logging.getLogger("bench.large_index")
KINDS = ("exact", "ivf_flat", "ivf_sq8", "disk", "ivf_pq")


def memory_mb() -> dict:
    """This process's resident memory split into private (anonymous) and file-backed pages, in MB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    return fields


def drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the OS to forget cached pages of these files (only these: the rest of the machine is untouched)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- building (parent process) ---------------------------------------------------------------------------------
def write_index(index, path: Path) -> list[str]:
    ann.faiss_module().write_index(index, str(path))
    return [path.name]


def build_all(n: int, args, folder: Path) -> dict:
    """Write every kind's files for n vectors; {kind: {files, build_s, ...}} plus shared timings."""
    faiss = ann.faiss_module()
    log.info("size %d: generating vectors and exact answers", n)
    vectors = clustered(n, args.dim, args.clusters, seed=0)
    ids = np.arange(n, dtype=np.int64)
    near = clustered(args.queries, args.dim, args.clusters, seed=1)
    far = clustered(args.queries, args.dim, args.clusters, seed=2, noise=3.0)
    calib_near, calib_ids, calib_far = ann.calibration_queries(vectors, ids)
    truth = {}
    for name, queries, k in (("near", near, 10), ("far", far, 10), ("calib_near", calib_near, 11), ("calib_far", calib_far, 10)):
        truth[name] = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    np.savez(folder / "queries.npz", near=near, far=far, calib_near=calib_near, calib_ids=calib_ids,
             calib_far=calib_far, **{f"truth_{k}": v for k, v in truth.items()})
    kinds: dict = {}

    started = time.perf_counter()
    exact, _ = store.build_index(args.dim, ids, vectors, "exact")
    kinds["exact"] = {"files": write_index(exact, folder / "exact.faiss"), "build_s": round(time.perf_counter() - started, 2)}
    del exact

    nlist = ann.choose_nlist(n)
    log.info("size %d: training %d lists", n, nlist)
    started = time.perf_counter()
    sample = ann.training_sample(vectors, nlist)
    sq8 = ann.new_ivf(args.dim, nlist)
    sq8.train(sample)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    assign = np.ascontiguousarray(sq8.quantizer.search(vectors, 1)[1].ravel())  # once, for every IVF kind
    assign_s = time.perf_counter() - started
    shared = {"nlist": nlist, "kmeans_train_s": round(train_s, 2), "assign_s": round(assign_s, 2)}

    def fill(index, rows: np.ndarray) -> float:
        """Add every vector with its precomputed list: no quantizer search per kind."""
        started = time.perf_counter()
        index.add_core(n, faiss.swig_ptr(rows), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        return round(time.perf_counter() - started, 2)

    trained_empty = faiss.clone_index(sq8)
    kinds["ivf_sq8"] = {"add_s": fill(sq8, vectors), "files": write_index(sq8, folder / "ivf_sq8.faiss")}
    log.info("size %d: writing disk shards of %d", n, args.shard_size)
    started = time.perf_counter()
    names = ann_disk.shard_names("bench", -(-n // args.shard_size))
    for number, name in enumerate(names):  # id ranges: the same shards build_shards writes from an id-ordered stream
        shard = faiss.clone_index(trained_empty)
        sq8.copy_subset_to(shard, faiss.InvertedLists.SUBSET_TYPE_ID_RANGE, number * args.shard_size,
                           (number + 1) * args.shard_size)
        ann_disk.write_shard(shard, folder / name)
        del shard
    np.save(folder / f"bench{ann_disk.IDS_SUFFIX}", ids)
    write_index(trained_empty, folder / "disk-trained.faiss")
    kinds["disk"] = {"split_s": round(time.perf_counter() - started, 2),
                     "files": [*names, f"bench{ann_disk.IDS_SUFFIX}", "disk-trained.faiss"]}
    del sq8

    flat = faiss.IndexIVFFlat(faiss.clone_index(trained_empty.quantizer), args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    kinds["ivf_flat"] = {"add_s": fill(flat, vectors), "files": write_index(flat, folder / "ivf_flat.faiss")}
    del flat

    log.info("size %d: training PQ%d", n, args.pq_m)
    pq = faiss.IndexIVFPQ(faiss.clone_index(trained_empty.quantizer), args.dim, nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    pq.train(sample)  # the coarse quantizer is trained already: this trains the PQ codebooks only
    pq_train_s = round(time.perf_counter() - started, 2)
    kinds["ivf_pq"] = {"pq_train_s": pq_train_s, "add_s": fill(pq, vectors), "files": write_index(pq, folder / "ivf_pq.faiss")}
    del pq, vectors, sample
    return {"shared": shared, "kinds": kinds}


def measure_in_child(kind: str, n: int, folder: Path, files: list[str], args) -> dict:
    if kind == "disk":
        drop_from_page_cache([folder / name for name in files])
    spec = {"kind": kind, "n": n, "folder": str(folder), "files": files, "latency_queries": args.latency_queries,
            "threads": args.threads}
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {kind} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


# --- measuring (child process) ---------------------------------------------------------------------------------
def open_kind(kind: str, folder: Path, files: list[str]):
    """(search(queries, k, nprobe) -> (scores, ids), nlist or None) for a kind's files."""
    faiss = ann.faiss_module()
    if kind == "disk":
        trained = faiss.read_index(str(folder / "disk-trained.faiss"))
        shards = [ann_disk.read_shard(folder / name) for name in files if name.endswith(".faiss") and name != "disk-trained.faiss"]
        index = ann_disk.ShardedIVF(trained, shards, np.load(folder / files[-2], mmap_mode="r"))
        return (lambda q, k, nprobe: index.search(q, k, nprobe=nprobe)), index.nlist, index
    index = faiss.read_index(str(folder / files[0]))
    if kind == "exact":
        return (lambda q, k, nprobe: index.search(q, k)), None, index
    return (lambda q, k, nprobe: index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))), index.nlist, index


def time_single(search, queries: np.ndarray, nprobe: int | None) -> list[float]:
    seconds = []
    for query in queries:
        started = time.perf_counter()
        search(query[None], 10, nprobe)
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(spec: dict) -> dict:
    kind, n, folder = spec["kind"], spec["n"], Path(spec["folder"])
    data = dict(np.load(folder / "queries.npz"))
    if spec["threads"]:
        ann.faiss_module().omp_set_num_threads(spec["threads"])
    before = memory_mb()
    started = time.perf_counter()
    search, nlist, _index = open_kind(kind, folder, spec["files"])
    load_s = time.perf_counter() - started
    loaded = memory_mb()
    default_probe = min(nlist, 16) if nlist else None
    cold = time_single(search, data["near"][:20], default_probe)  # first queries after load (disk: cold cache)
    result: dict = {"load_s": round(load_s, 3), "cold_single_p50_ms": percentile_ms(cold, 50)}
    nprobe = None
    if nlist:
        nprobe, recall = ann.choose_nprobe(
            lambda q, k, p: search(q, k, p)[1], nlist,
            (data["calib_near"], data["calib_ids"], data["truth_calib_near"]), (data["calib_far"], data["truth_calib_far"]),
        )
        result.update(nprobe=nprobe, calibration_recall=round(recall, 4))
    warm = time_single(search, data["near"][: spec["latency_queries"]], nprobe)
    result.update(single_p50_ms=percentile_ms(warm, 50), single_p95_ms=percentile_ms(warm, 95))
    result["recall_at_10"] = {
        name: round(ann.recall_at(search(data[name], 10, nprobe)[1], data[f"truth_{name}"]), 4) for name in ("near", "far")
    }
    after = memory_mb()
    file_bytes = sum((folder / name).stat().st_size for name in spec["files"])
    result.update(
        file_bytes_per_vector=round(file_bytes / n, 1),
        ram_mb_per_million=round((after["RssAnon"] - before["RssAnon"]) * 1e6 / n, 1),
        page_cache_mb_per_million=round((after["RssFile"] - before["RssFile"]) * 1e6 / n, 1),
        memory_mb={"before_load": before, "after_load": loaded, "after_searches": after},
    )
    return result


# --- report ----------------------------------------------------------------------------------------------------
def summary_table(sizes: list[dict]) -> list[dict]:
    """One row per kind at the largest size: the README table."""
    largest = max(sizes, key=lambda s: s["n"])
    rows = []
    for kind in KINDS:
        m = largest["kinds"][kind]
        rows.append({
            "kind": kind, "n": largest["n"], "file_bytes_per_vector": m["file_bytes_per_vector"],
            "ram_mb_per_million": m["ram_mb_per_million"], "page_cache_mb_per_million": m["page_cache_mb_per_million"],
            "nprobe": m.get("nprobe"), "recall_near": m["recall_at_10"]["near"], "recall_far": m["recall_at_10"]["far"],
            "single_p50_ms": m["single_p50_ms"], "cold_single_p50_ms": m["cold_single_p50_ms"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="200000,1000000", help="comma-separated library sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=256, help="queries for recall")
    parser.add_argument("--latency-queries", type=int, default=100, help="single queries timed one by one")
    parser.add_argument("--shard-size", type=int, default=250_000, help="vectors per disk shard file")
    parser.add_argument("--pq-m", type=int, default=64, help="IVF-PQ bytes per vector (sub-quantizers of 8 bits)")
    parser.add_argument("--threads", type=int, default=0,
                        help="faiss OpenMP threads (0: faiss's default, every core); 1 is steadier on a shared machine")
    parser.add_argument("--workdir", help="where index files are written (default: a temp folder, removed after)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one kind in this fresh process
    args = parser.parse_args()
    if args.measure:
        json.dump(measure(json.loads(args.measure)), sys.stdout)
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[bench] %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    faiss = ann.faiss_module()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="clipsearch-large-", dir=args.workdir))
    sizes = []
    try:
        for n in [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]:
            folder = root / str(n)
            folder.mkdir()
            entry = {"n": n, "load_average_before": load_average(), **build_all(n, args, folder)}
            for kind in KINDS:
                log.info("size %d: measuring %s", n, kind)
                entry["kinds"][kind].update(measure_in_child(kind, n, folder, entry["kinds"][kind]["files"], args))
                log.info("size %d: %s %s", n, kind, {k: v for k, v in entry["kinds"][kind].items() if k != "memory_mb"})
            entry["load_average_after"] = load_average()
            sizes.append(entry)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "faiss": faiss.__version__, "faiss_omp_threads": faiss.omp_get_max_threads(),
                    "load_average_end": load_average()},
        "data": {"dim": args.dim, "clusters": args.clusters, "queries": args.queries, "shard_size": args.shard_size,
                 "pq_m": args.pq_m},
        "sizes": sizes,
        "table": summary_table(sizes),
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
