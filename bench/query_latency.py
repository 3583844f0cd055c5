"""Query latency benchmark for the vector store (run by hand, not a test): prints one JSON object to stdout, logs to stderr.

For each size it generates clustered 512-d unit vectors (1000 Gaussian clusters of log-normal sizes), then builds
the store's two index kinds exactly as the store does (clipsearch.store.build_index) and reports:
  build_s               wall seconds to build (IVF: k-means training, adding, nprobe calibration)
  single_p50/p95_ms     one query at a time (what a search box does)
  batch64_ms_per_query  batches of 64 queries, per query
  recall_at_10          IVF against exact, for queries from the library's distribution ("near") and for queries
                        pushed away from it, top-1 cosine ~0.3 like a CLIP text query ("far")
  bytes_per_vector      serialized index size / count
  nprobe_sweep          recall and p50 at other nprobe values, to show what the calibrated one trades
and the process peak RSS. threshold recommends where auto should switch to IVF: the largest library whose exact
p50 stays within --exact-budget-ms, interpolated between the sizes measured (include sizes around it).
Machines are shared and noisy: load_average is reported before and after; compare figures from the same run.
This times the index alone; bench/api_latency.py times whole searches (GET /api/search under waitress, text
encoding, filters, date order) against text encoding alone.

    python bench/query_latency.py                                  # 100k and 1M vectors (~6 GB RAM, ~5 min)
    python bench/query_latency.py --sizes 10000,30000 --queries 100 # quick
    python bench/query_latency.py --text-model ViT-B-32            # also time a text query, torch and OpenVINO (random weights)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights

import numpy as np  # noqa: E402

from clipsearch import ann, store  # noqa: E402

log = logging.getLogger("bench.query_latency")


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float = 1.0) -> np.ndarray:
    """Unit vectors around fixed cluster centres (shared by every seed); noise is the noise norm relative to 1."""
    centre_rng = np.random.default_rng(12345)
    centres = centre_rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = centre_rng.lognormal(0.0, 1.0, clusters)  # uneven clusters, like bursts of photos of one scene
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: keeps the temporaries small at 1M
        rows = min(100_000, n - start)
        chunk = rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
        chunk += centres[rng.choice(clusters, rows, p=weights)]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start : start + rows] = chunk
    return out


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1e3, 3)


def time_single(index, queries: np.ndarray, k: int = 10) -> dict:
    index.search(queries[:2], k)  # warm-up
    seconds = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], k)
        seconds.append(time.perf_counter() - started)
    return {"single_p50_ms": percentile_ms(seconds, 50), "single_p95_ms": percentile_ms(seconds, 95)}


def time_batches(index, queries: np.ndarray, batch: int = 64, k: int = 10) -> float:
    batches = [queries[i : i + batch] for i in range(0, len(queries) - batch + 1, batch)] or [queries]
    started = time.perf_counter()
    for chunk in batches:
        index.search(chunk, k)
    return round((time.perf_counter() - started) / sum(len(c) for c in batches) * 1e3, 3)


def measure_size(n: int, args) -> dict:
    faiss = ann.faiss_module()
    log.info("size %d: generating %d x %d vectors", n, n, args.dim)
    vectors = clustered(n, args.dim, args.clusters, seed=0)
    ids = np.arange(n, dtype=np.int64)
    near = clustered(args.queries, args.dim, args.clusters, seed=1)
    far = clustered(args.queries, args.dim, args.clusters, seed=2, noise=3.0)
    result: dict = {"n": n, "load_average_before": load_average()}

    started = time.perf_counter()
    exact, _ = store.build_index(args.dim, ids, vectors, "exact")
    exact_build = time.perf_counter() - started
    query_sets = {"near": near, "far": far}
    truth = {name: exact.search(q, 10)[1] for name, q in query_sets.items()}
    result["top1_cosine"] = {name: round(float(exact.search(q, 1)[0].mean()), 3) for name, q in query_sets.items()}
    result["exact"] = {
        "build_s": round(exact_build, 2),
        **time_single(exact, near[: args.latency_queries]),
        "batch64_ms_per_query": time_batches(exact, near),
        "bytes_per_vector": round(ann.serialized_size(exact) / n, 1),
    }
    log.info("size %d: exact %s", n, result["exact"])

    log.info("size %d: building IVF-SQ8", n)
    started = time.perf_counter()
    ivf, params = store.build_index(args.dim, ids, vectors, "ivf")
    ivf_build = time.perf_counter() - started
    del vectors  # keep peak memory to what the store itself needs
    result["ivf"] = {
        "build_s": round(ivf_build, 2),
        "params": params,
        **time_single(ivf, near[: args.latency_queries]),
        "batch64_ms_per_query": time_batches(ivf, near),
        "recall_at_10": {name: round(ann.recall_at(ivf.search(q, 10)[1], truth[name]), 4) for name, q in query_sets.items()},
        "bytes_per_vector": round(ann.serialized_size(ivf) / n, 1),
    }
    sweep = []
    for nprobe in (16, 32, 64, 128):
        if nprobe > ivf.nlist:
            break
        ivf.nprobe = nprobe
        sweep.append({
            "nprobe": nprobe,
            "single_p50_ms": time_single(ivf, near[: args.latency_queries // 2])["single_p50_ms"],
            "recall_near": round(ann.recall_at(ivf.search(near, 10)[1], truth["near"]), 4),
            "recall_far": round(ann.recall_at(ivf.search(far, 10)[1], truth["far"]), 4),
        })
    ivf.nprobe = params["nprobe"]
    result["ivf"]["nprobe_sweep"] = sweep
    log.info("size %d: ivf %s", n, result["ivf"])

    # One OpenMP thread against all cores, for single queries (what a search box sends).
    threads = {}
    default_threads = faiss.omp_get_max_threads()
    for count in sorted({1, default_threads}):
        faiss.omp_set_num_threads(count)
        threads[str(count)] = {
            "exact_single_p50_ms": time_single(exact, near[: args.latency_queries // 2])["single_p50_ms"],
            "ivf_single_p50_ms": time_single(ivf, near[: args.latency_queries // 2])["single_p50_ms"],
        }
    faiss.omp_set_num_threads(default_threads)
    result["omp_threads"] = threads
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_average_after"] = load_average()
    return result


def threshold_recommendation(sizes: list[dict], budget_ms: float) -> dict:
    """Library size where exact p50 reaches the budget: interpolated between measured sizes, else extrapolated.

    Exact search costs more per vector as the index outgrows the CPU caches, so the nearest measured sizes
    are used rather than one per-vector cost.
    """
    points = sorted((s["n"], s["exact"]["single_p50_ms"]) for s in sizes)
    below = [p for p in points if p[1] <= budget_ms]
    above = [p for p in points if p[1] > budget_ms]
    if below and above:
        (n0, t0), (n1, t1) = below[-1], above[0]
        raw = n0 + (budget_ms - t0) * (n1 - n0) / max(t1 - t0, 1e-9)
    else:
        n, t = (below[-1] if below else above[0])
        raw = n * budget_ms / t  # linear in n beyond the measured range
    step = 10_000 if raw >= 20_000 else 1_000
    return {
        "exact_budget_ms": budget_ms,
        "exact_p50_ms_by_size": {str(n): t for n, t in points},
        "exact_p50_within_budget_up_to": int(raw),
        "recommended_ivf_threshold": int(max(step, step * (raw // step))),  # rounded down: stay within budget
        "current_ivf_threshold": store.IVF_THRESHOLD,
    }


def time_text_query(model: str, runs: int = 30) -> dict:
    """One short text query timed with each runtime side by side (torch, and OpenVINO where auto would pick it)."""
    from clipsearch.encoders import EncoderSpec, load_encoder

    report: dict = {"model": model, "weights": "random"}
    for runtime in ("torch", "openvino"):
        started = time.perf_counter()
        try:
            encoder = load_encoder(EncoderSpec(model, "none", "cpu", runtime=runtime))
        except Exception as e:  # OpenVINO missing or not for this model: torch's figures still count
            report[runtime] = {"error": str(e)}
            continue
        encoder.encode_texts(["warm-up"])
        load_s = time.perf_counter() - started  # model load plus the first text (tokenizer, text tower)
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            encoder.encode_texts(["a dog on the beach"])
            seconds.append(time.perf_counter() - started)
        report[runtime] = {"precision": encoder.precision, "load_and_first_text_s": round(load_s, 2),
                           "p50_ms": percentile_ms(seconds, 50), "p95_ms": percentile_ms(seconds, 95)}
        del encoder
    if "p50_ms" in report["torch"] and "p50_ms" in report["openvino"]:
        report["openvino_speedup_p50"] = round(report["torch"]["p50_ms"] / report["openvino"]["p50_ms"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated library sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=256, help="queries for recall and batches")
    parser.add_argument("--latency-queries", type=int, default=100, help="single queries timed one by one")
    parser.add_argument("--exact-budget-ms", type=float, default=5.0, help="exact search p50 allowed before IVF")
    parser.add_argument("--text-model", help="also time encoding one text query with this open_clip model (random weights)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[bench] %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs each missing SIMD variant

    faiss = ann.faiss_module()
    sizes = [measure_size(int(s.replace("_", "")), args) for s in args.sizes.split(",") if s.strip()]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "faiss": faiss.__version__, "faiss_omp_threads": faiss.omp_get_max_threads()},
        "data": {"dim": args.dim, "clusters": args.clusters, "queries": args.queries},
        "sizes": sizes,
        "threshold": threshold_recommendation(sizes, args.exact_budget_ms),
    }
    if args.text_model:
        try:
            report["text_query"] = time_text_query(args.text_model)
        except Exception as e:  # the index figures above are still worth printing
            log.warning("could not time a text query with %s: %s", args.text_model, e)
            report["text_query"] = {"model": args.text_model, "error": str(e)}
    report["peak_rss_mb"] = peak_rss_mb()
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
