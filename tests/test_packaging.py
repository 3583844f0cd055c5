"""Packaging: a normal (non-editable) wheel holds every subpackage under clipsearch.*, the model config and the script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_the_whole_layout(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("clipsearch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "clipsearch/cli.py",
        "clipsearch/__main__.py",
        "clipsearch/search/searcher.py",
        "clipsearch/indexer/run.py",
        "clipsearch/indexer/walk.py",
        "clipsearch/webui/__init__.py",
        "clipsearch/training/__init__.py",
        "clipsearch/model_configs/clipsearch-tiny.json",
        "clipsearch/migrations/env.py",  # Alembic finds the migrations by path: the folder must be installed whole
        "clipsearch/migrations/script.py.mako",
        "clipsearch/migrations/versions/0001_baseline.py",
    ):
        assert expected in names, expected
    assert not any(name.startswith(("search/", "indexer/", "tests/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "clipsearch = clipsearch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
