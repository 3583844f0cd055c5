"""Label assignment benchmark (run by hand, not a test): prints one JSON object to stdout, logs to stderr.

For each size it builds a synthetic catalog in a temporary folder: N 512-d unit vectors tagged with a model id,
30% of them drawn near one of the labels (so about that many photos get a label, as in a real library) and the
rest random, and a 100-label set whose text classifiers come from a deterministic fake text encoder (random unit
vectors per text; no model is loaded). It reports, on CPU:
  classify_s / classify_vectors_per_s   calibration + matmul + softmax + strengths + cuts, in-memory vectors
  apply_s / apply_vectors_per_s         clipsearch.search.labels.apply_set end to end: reading the vectors from
                                        SQLite in chunks, classifying, replacing the set's members in one write
  reapply_s                             the same again (classifiers cached, old members deleted first)
  apply_new_1000_s                      labelling 1000 "new" photos incrementally (the indexer/watcher hook)
  review_s                              confirming one photo: the review is stored and the set relabelled
  overview_s                            the /labels page's queries: every label's count and top 6 photos
  assigned, build_s (synthetic catalog, not part of any figure), catalog_mb
and peak RSS (ru_maxrss) before and after the first apply of each size (the apply's own memory: vectors are read
100k at a time), and for the whole run (the classify-only timing holds every vector in memory at once).

    python bench/labels.py                          # 100k and 1M vectors (~3 GB disk for 1M, a few minutes)
    python bench/labels.py --sizes 100000,300000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from clipsearch.catalog import Catalog
from clipsearch.search import label_feedback, label_sets, labels

log = logging.getLogger("bench.labels")
MODEL_ID = "bench-random/v1"
DIM = 512


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class HashTextEncoder:
    """Deterministic random unit vector per text (a stand-in for a CLIP text tower)."""

    model_id = MODEL_ID
    dim = DIM
    logit_scale = 100.0

    def encode_texts(self, texts):
        out = np.empty((len(texts), DIM), np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            out[row] = np.random.default_rng(seed).standard_normal(DIM)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def build(folder: Path, n: int, n_labels: int, seed: int = 0) -> tuple[Catalog, np.ndarray]:
    """A catalog of n vectors and a set "bench" of n_labels labels; returns (catalog, label vectors)."""
    catalog = Catalog(folder / "catalog.sqlite")
    with catalog.write() as session:
        catalog.set_library_model(session, MODEL_ID, "bench-random", "v1", DIM)
    for i in range(n_labels):
        label_sets.add_label(catalog, "bench", f"label {i:03d}")
    (label_set,) = label_sets.label_sets(catalog, "bench")
    classifier = labels.set_classifier(catalog, label_set, MODEL_ID, HashTextEncoder())
    rng = np.random.default_rng(seed)
    raw = catalog.engine.raw_connection()
    try:
        cursor = raw.cursor()
        step = 50_000
        for start in range(0, n, step):
            m = min(step, n - start)
            vectors = rng.standard_normal((m, DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            near = rng.random(m) < 0.3
            which = rng.integers(0, n_labels, m)
            vectors[near] = 0.35 * classifier.matrix[which[near]] + 0.9 * vectors[near]
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            ids = range(start + 1, start + m + 1)
            now = datetime.now(timezone.utc).replace(tzinfo=None).isoformat(" ")
            cursor.executemany(
                "INSERT INTO images (id, path, root, size, mtime_ns, status, indexed_at, updated_at) "
                "VALUES (?, ?, '/bench', 1000, 0, 'ok', ?, ?)",
                ((i, f"/bench/{i:08d}.jpg", now, now) for i in ids))
            cursor.executemany("INSERT INTO embeddings (image_id, model, vector) VALUES (?, ?, ?)",
                               ((i, MODEL_ID, vectors[k].astype("<f4").tobytes()) for k, i in enumerate(ids)))
            raw.commit()
        cursor.execute("DELETE FROM vector_changes")
        raw.commit()
    finally:
        raw.close()
    return catalog, classifier.matrix


def classify_only(catalog: Catalog, n_labels: int) -> tuple[float, int]:
    """Seconds to score every stored vector already in memory (calibration + matmul + softmax + strengths + cuts)."""
    (label_set,) = label_sets.label_sets(catalog, "bench")
    classifier = labels.set_classifier(catalog, label_set, MODEL_ID, None)
    chunks = list(catalog.vector_chunks(MODEL_ID))
    started = time.perf_counter()
    cal = labels.calibrate(catalog, classifier, MODEL_ID, {})
    found = 0
    for _, vectors in chunks:
        probs, z = cal.score(vectors, classifier)
        found += int(((probs >= classifier.thresholds) & (z >= cal.cutoff)).sum())
    return time.perf_counter() - started, found


def run_size(n: int, n_labels: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-labels-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        catalog, _ = build(folder, n, n_labels)
        build_s = time.perf_counter() - started
        log.info("built %d vectors in %.1f s", n, build_s)
        rss_before = peak_rss_mb()
        report = labels.apply_set(catalog, "bench")  # first, so the peak RSS after it is the apply's own
        rss_apply = peak_rss_mb()
        log.info("apply %.2f s", report.seconds)
        classify_s, candidates = classify_only(catalog, n_labels)
        log.info("classify %.2f s", classify_s)
        again = labels.apply_set(catalog, "bench")
        new_ids = list(range(n - 999, n + 1))
        tick = time.perf_counter()
        labels.apply_new(catalog, new_ids)
        apply_new_s = time.perf_counter() - tick
        tick = time.perf_counter()  # the /labels page: counts of every label and the top photos of each
        (bench_set,) = label_sets.label_sets(catalog, "bench")
        label_sets.top_photo_ids(catalog, [label.id for label in bench_set.labels], 6)
        overview_s = time.perf_counter() - tick
        # A review on a label page: record it and relabel the set with the confirmed photo's prototype blended in.
        top = label_sets.label_photos(catalog, "bench", "label 000", k=1)
        tick = time.perf_counter()
        if top:
            label_feedback.review(catalog, "bench", "label 000", top[0]["id"], "confirm")
        review_s = time.perf_counter() - tick
        size_mb = (folder / "catalog.sqlite").stat().st_size / 1e6
        catalog.close()
    assigned = sum(report.assigned.values())
    return {
        "vectors": n, "labels": n_labels, "dim": DIM,
        "classify_s": round(classify_s, 3), "classify_vectors_per_s": round(n / classify_s),
        "apply_s": round(report.seconds, 3), "apply_vectors_per_s": round(n / report.seconds),
        "apply_classify_part_s": round(report.classify_seconds, 3),
        "reapply_s": round(again.seconds, 3), "apply_new_1000_s": round(apply_new_s, 4),
        "review_s": round(review_s, 3), "overview_s": round(overview_s, 3), "assigned": assigned, "classify_only_members": candidates, "unlabelled": report.unlabelled,
        "build_s": round(build_s, 1), "catalog_mb": round(size_mb, 1),
        "peak_rss_mb_before_apply": rss_before, "peak_rss_mb_after_apply": rss_apply,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="Comma-separated vector counts.")
    parser.add_argument("--labels", type=int, default=100, help="Labels in the set.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    results = [run_size(int(size), args.labels) for size in args.sizes.split(",")]
    print(json.dumps({
        "bench": "labels", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__},
        "results": results, "peak_rss_mb": peak_rss_mb(),
    }, indent=2))


if __name__ == "__main__":
    main()
