"""Reference points for the indexing benchmark, measured in the same run: a plain open_clip loop, and rclip."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RCLIP_TOOL = Path(__file__).resolve().parents[1].parent / "shared/tools/rclip_random_weights.py"


def plain_openclip(files: list[str], model_name: str, batch_size: int = 32) -> dict:
    """What a plain script does: open_clip fp32, full Pillow decode, batches of 32, one process, no threads."""
    import open_clip
    import torch
    from PIL import Image, ImageOps

    from clipsearch.encoders.openclip import register_model_configs

    register_model_configs()
    started = time.perf_counter()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    batch, embedded = [], 0

    def flush() -> int:
        with torch.no_grad():
            features = model.encode_image(torch.stack(batch))
            torch.nn.functional.normalize(features, dim=-1)
        count = len(batch)
        batch.clear()
        return count

    for path in files:
        try:
            with Image.open(path) as image:
                batch.append(preprocess(ImageOps.exif_transpose(image).convert("RGB")))
        except Exception:  # the plain loop just skips what it cannot read
            continue
        if len(batch) == batch_size:
            embedded += flush()
    if batch:
        embedded += flush()
    seconds = time.perf_counter() - started
    return {"images_per_s": round(embedded / seconds, 2), "seconds": round(seconds, 3), "embedded": embedded,
            "model_load_s": round(load_s, 3)}


def clipsearch_whole_process(folder: Path, model: str, pretrained: str, extra: list[str]) -> dict:
    """Wall time of `clipsearch index FOLDER` as a user runs it (interpreter start, imports, model load, indexing),
    then of the same command again on the unchanged folder."""
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-cli-") as data_dir:
        command = [sys.executable, "-m", "clipsearch", "index", str(folder), "--data-dir", data_dir,
                   "--model", model, "--pretrained", pretrained, *extra]
        seconds = [_timed_run(command, "clipsearch index") for _ in range(2)]
    return {"seconds": round(seconds[0], 3), "unchanged_seconds": round(seconds[1], 3)}


def _timed_run(command: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env=env or {**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed: {result.stderr[-2000:]}")
    return time.perf_counter() - started


def rclip_offline_env(datadir: Path, arch: str = "ViT-B-32-256") -> dict:
    """Environment for rclip 3.3 to run offline with random weights written into `datadir` (shared/tools)."""
    if not RCLIP_TOOL.is_file():
        raise FileNotFoundError(f"{RCLIP_TOOL} is missing")
    subprocess.run([sys.executable, str(RCLIP_TOOL), str(datadir), arch], check=True, capture_output=True)
    return {**os.environ, "RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}


def rclip_whole_process(rclip: str, folder: Path, files: int, arch: str = "ViT-B-32-256") -> dict:
    """rclip 3.3 indexing the same folder offline with random weights (shared/tools), timed as a whole process.

    Start-up is measured on an empty folder and subtracted to estimate its images/s once started.
    """
    with tempfile.TemporaryDirectory(prefix="rclip-bench-") as scratch:
        scratch = Path(scratch)
        env = rclip_offline_env(scratch / "rclip-data", arch)

        def timed(cwd: Path) -> float:
            return _timed_run([rclip, "-f", "a dog"], "rclip", cwd=cwd, env=env)

        empty = scratch / "empty"
        empty.mkdir()
        startup = timed(empty)
        whole = timed(folder)  # a folder rclip's database has never seen: a full index
        unchanged = timed(folder)  # again: nothing new to index (rclip also answers its query)
    running = max(whole - startup, 1e-9)
    return {"seconds": round(whole, 3), "startup_s": round(startup, 3), "unchanged_seconds": round(unchanged, 3),
            "images_per_s": round(files / running, 2), "arch": arch}
