"""Catalog on SQLite vs PostgreSQL, side by side in one run (run by hand, not a test): one JSON object on stdout.

For each backend it builds the same synthetic library: N photos with 512-d vectors written the way the indexer
writes them (ORM rows, batches of 32 per transaction), in folders of 200, dated over ten years, then times what
the search server and the label pages do with a catalog:
  write_photos_per_s     writes as the indexer makes them (a batch's rows, then its vectors; change log, version)
  open_ms                opening an up-to-date catalog (schema check, no migration)
  vectors_ms             loading every vector (what a vector index rebuild reads)
  known_under_ms         the photos under one root (an incremental index run's plan)
  filter_ids_ms          a folder + date range + format filter
  date_keys_ms           every photo's date (sort by date)
  changes_ms             the change log since the store's generation, after 1,000 re-embedded photos
  label_apply_s          zero-shot label set of 20 labels applied to the whole library (random classifiers)
and each PostgreSQL figure as a ratio to SQLite's (>1: slower). PostgreSQL runs in a fresh database created on the
server --postgres names (default: the test server tests/install-postgres.sh sets up) and dropped afterwards; it
talks to it over TCP on loopback, so network round trips are the smallest they can be.

    python bench/catalog_backends.py                     # 20,000 photos
    python bench/catalog_backends.py --photos 100000 --postgres postgresql://USER:PW@HOST/postgres
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labels import HashTextEncoder  # noqa: E402  (bench/labels.py: the same stand-in text tower)
from report import save_report  # noqa: E402

from clipsearch.catalog import Catalog, EmbeddingRow, ImageRow, vector_to_blob  # noqa: E402
from clipsearch.catalog_sql import catalog_url, display_url, upsert_rows  # noqa: E402
from clipsearch.search import label_sets, labels  # noqa: E402

log = logging.getLogger("bench.catalog_backends")
DEFAULT_POSTGRES = "postgresql+psycopg://clipsearch_test:clipsearch_test@127.0.0.1:5432/postgres"
MODEL_ID = "bench-random/v1"
DIM = 512
BATCH = 32


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """(best wall seconds of `repeat` calls, last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def write_library(catalog: Catalog, n: int, seed: int = 0) -> float:
    """Write n photos the indexer's way; returns photos per second."""
    rng = np.random.default_rng(seed)
    start_ns = int(datetime(2015, 1, 1, tzinfo=timezone.utc).timestamp() * 1e9)
    span_ns = int(10 * 365.25 * 86400 * 1e9)
    with catalog.write() as session:
        catalog.set_library_model(session, MODEL_ID, "bench-random", "v1", DIM)
    started = time.perf_counter()
    for first in range(0, n, BATCH):
        vectors = rng.standard_normal((min(BATCH, n - first), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with catalog.write() as session:  # as Indexer._write_rows: the batch's rows in one flush, then its vectors
            rows = []
            for offset in range(len(vectors)):
                i = first + offset
                rows.append(ImageRow(path=f"/photos/{i // 200:05d}/img_{i:07d}.jpg", root="/photos", size=3_000_000 + i,
                                     mtime_ns=start_ns + int(rng.integers(span_ns)), content_hash=f"{i:016x}", width=4000,
                                     height=3000, format="JPEG" if i % 4 else "HEIF", status="ok"))
            session.add_all(rows)
            session.flush()
            upsert_rows(session.connection(), EmbeddingRow.__table__, ("image_id",), ("image_id", "model", "vector"),
                        [(row.id, MODEL_ID, vector_to_blob(vector)) for row, vector in zip(rows, vectors)])
    return n / (time.perf_counter() - started)


def measure(location, n: int) -> dict:
    """Every figure for one backend."""
    catalog = Catalog(location)
    try:
        photos_per_s = write_library(catalog, n)
        open_s, opened = timed(lambda: Catalog(location))
        opened.close()
        vectors_s, (ids, _) = timed(lambda: catalog.vectors(MODEL_ID))
        known_s, known = timed(lambda: catalog.known_under(["/photos"]))
        folder = f"/photos/{(n // 200) // 2:05d}"
        filter_s, _ = timed(lambda: catalog.filter_ids(folder="/photos", date_from=datetime(2018, 1, 1),
                                                       date_to=datetime(2019, 1, 1), formats=["jpeg"]))
        filter_folder_s, _ = timed(lambda: catalog.filter_ids(folder=folder))
        keys_s, _ = timed(lambda: catalog.date_keys())
        generation = catalog.generation()
        changed = np.random.default_rng(1).choice(ids, size=min(1000, len(ids)), replace=False)
        with catalog.write() as session:
            for image_id in changed.tolist():
                session.execute(update(EmbeddingRow).where(EmbeddingRow.image_id == image_id)
                                .values(vector=vector_to_blob(np.ones(DIM, np.float32) / np.sqrt(DIM))))
        changes_s, (_, changed_ids) = timed(lambda: catalog.changes_since(generation))
        for k in range(20):
            label_sets.add_label(catalog, "bench", f"label {k:02d}")
        started = time.perf_counter()
        report = labels.apply_set(catalog, "bench", HashTextEncoder())
        apply_s = time.perf_counter() - started
        return {
            "photos": len(known), "write_photos_per_s": round(photos_per_s), "open_ms": round(open_s * 1e3, 1),
            "vectors_ms": round(vectors_s * 1e3, 1), "known_under_ms": round(known_s * 1e3, 1),
            "filter_ids_ms": round(filter_s * 1e3, 1), "filter_folder_ms": round(filter_folder_s * 1e3, 2),
            "date_keys_ms": round(keys_s * 1e3, 1), "changes_ms": round(changes_s * 1e3, 2),
            "changed_found": len(changed_ids), "label_apply_s": round(apply_s, 2),
            "labelled_photos": report.images - report.unlabelled,
            "catalog_mb": round(catalog.size_bytes() / 1e6, 1),
        }
    finally:
        catalog.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=20_000, help="photos in the synthetic library")
    parser.add_argument("--postgres", default=os.environ.get("CLIPSEARCH_TEST_POSTGRES", DEFAULT_POSTGRES),
                        help="maintenance database URL on the PostgreSQL server (its user may CREATE DATABASE)")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of bench/results/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[bench] %(message)s")
    started_at = datetime.now(timezone.utc)

    admin = create_engine(catalog_url(args.postgres), isolation_level="AUTOCOMMIT")
    name = f"clipsearch_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        server_version = connection.execute(text("SHOW server_version")).scalar()
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        with tempfile.TemporaryDirectory(prefix="clipsearch-bench-catalog-") as scratch:
            log.info("SQLite: %d photos", args.photos)
            sqlite = measure(Path(scratch) / "catalog.sqlite3", args.photos)
            log.info("PostgreSQL %s: %d photos", server_version, args.photos)
            postgres = measure(make_url(catalog_url(args.postgres)).set(database=name).render_as_string(hide_password=False), args.photos)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    ratios = {key: round(postgres[key] / sqlite[key], 2) for key in sqlite
              if key.endswith(("_ms", "_s")) and isinstance(sqlite[key], (int, float)) and sqlite[key]}
    ratios["write_photos_per_s"] = round(sqlite["write_photos_per_s"] / postgres["write_photos_per_s"], 2)
    report = {
        "bench": "catalog_backends", "timestamp": started_at.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "postgres_server": {"url": display_url(catalog_url(args.postgres)), "version": server_version},
        "sqlite": sqlite, "postgresql": postgres,
        "postgresql_time_ratio": ratios,  # PostgreSQL time / SQLite time (writes: SQLite rate / PostgreSQL rate)
    }
    log.info("wrote %s", save_report("catalog_backends", report, started_at, args.out))


if __name__ == "__main__":
    main()
