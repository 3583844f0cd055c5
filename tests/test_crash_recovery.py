"""kill -9 a real `clipsearch index` mid-run, re-run it, and check the library is whole: no duplicates, nothing lost."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

FILES = 360


def make_photos(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for n in range(FILES):
        sub = folder / f"roll{n % 4}"
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{n:04d}.jpg", quality=90)


def catalog_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from images").fetchone()[0]
    except sqlite3.Error:
        return 0


def index_command(photos: Path, library: Path) -> list[str]:
    return [sys.executable, "-m", "clipsearch", "index", str(photos), "--data-dir", str(library),
            "--model", "clipsearch-tiny", "--pretrained", "none", "--batch-size", "8", "--workers", "2"]


def test_sigkill_mid_run_then_rerun_completes(tmp_path):
    photos, library = tmp_path / "photos", tmp_path / "library"
    make_photos(photos)
    db = library / "catalog.sqlite3"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed_at = []
    for threshold in (16, 150):  # two crashes at different points of the run
        process = subprocess.Popen(index_command(photos, library), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while catalog_rows(db) < threshold and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at.append(catalog_rows(db))
    assert killed_at[0] < FILES, "the first run finished before it could be killed"
    print("rows in the catalog when killed:", killed_at)

    result = subprocess.run(index_command(photos, library), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    with sqlite3.connect(db) as conn:
        paths = [p for (p,) in conn.execute("select path from images")]
        ids = [i for (i,) in conn.execute("select id from images")]
        embeddings = conn.execute("select count(*) from embeddings").fetchone()[0]
        failed = conn.execute("select count(*) from images where status != 'ok'").fetchone()[0]
        orphans = conn.execute("select count(*) from embeddings where image_id not in (select id from images)").fetchone()[0]
    on_disk = sorted(str(p) for p in photos.rglob("*.jpg"))
    assert sorted(paths) == on_disk
    assert len(set(ids)) == len(ids) == FILES and failed == 0 and orphans == 0
    assert embeddings == FILES

    status = subprocess.run([sys.executable, "-m", "clipsearch", "status", "--json", "--data-dir", str(library)],
                            env=env, capture_output=True, text=True, timeout=120)
    import json

    info = json.loads(status.stdout)
    assert info["vectors"] == FILES == info["counts"]["embeddings"]

    # A separate process loads the same (seeded) random tiny model and searches the library.
    found = subprocess.run([sys.executable, "-m", "clipsearch", "search", "a photo of noise", "--json", "-k", "5",
                            "--data-dir", str(library)], env=env, capture_output=True, text=True, timeout=120)
    hits = json.loads(found.stdout)
    assert len(hits) == 5 and all(Path(h["path"]).is_file() for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    from clipsearch.store import VectorStore

    store = VectorStore.load(library / "vectors.faiss")
    import faiss

    stored_ids = np.sort(faiss.vector_to_array(store.index.id_map))
    assert len(np.unique(stored_ids)) == len(stored_ids) == FILES
    assert set(stored_ids.tolist()) == set(ids)


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    photos, library = tmp_path / "photos", tmp_path / "library"
    make_photos(photos)
    db = library / "catalog.sqlite3"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(index_command(photos, library), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while catalog_rows(db) < 16 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "run the same command again" in err and "Traceback" not in err
    assert "added" in out  # the summary of what was done before the stop
    done = catalog_rows(db)
    assert 0 < done < FILES
    result = subprocess.run(index_command(photos, library) + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    import json

    summary = json.loads(result.stdout)
    assert summary["unchanged"] == done and summary["added"] == FILES - done and summary["vectors"] == FILES
