"""Distributed indexing benchmark (run by hand, not a test): images/s with 1 and 2 torchrun processes, side by side.

Each configuration indexes the same folder into a fresh library in a subprocess:
  single       `python -m clipsearch index` (the single-process indexer, for reference)
  torchrun-N   `torchrun --nproc_per_node=N -m clipsearch.indexer.distributed` (gloo on the CPU, nccl on CUDA)
and reports the run's own images/s (rank 0's report: walk, embedding on every rank, merge and vector-store sync;
model loading excluded) and the wall-clock images/s of the whole command (interpreter start and model load
included). On CPUs each process gets cores/N decoding threads and cores/N torch threads, so N processes share
the machine rather than oversubscribe it: the speed-up measures the sharding, not extra hardware. Machines are
shared and noisy: compare the ratios of one run, not absolute figures across runs.

    python bench/distributed_index.py                         # 200 generated 1280x960 JPEGs, tiny model, 1 vs 2
    python bench/distributed_index.py --count 1000 --processes 1 2 4 --model ViT-B-32 --pretrained none

Prints one JSON object to stdout and writes it to bench/results/distributed_index-<timestamp>.json too (or --out
FILE); progress goes to stderr. Weights are never downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from report import save_report


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def generate_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """Photo-like JPEGs (smooth gradients plus noise, so they compress and decode like photos) in subfolders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    for i in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        channels = [a * x + (1 - a) * y, b * y + (1 - b) * (1 - x), 0.5 + 0.5 * np.sin(6.0 * c * (x + y))]
        rgb = np.stack([255.0 * ch for ch in np.broadcast_arrays(*channels)], axis=-1)
        rgb += rng.integers(-10, 11, size=rgb.shape, dtype=np.int8)
        target = folder / f"roll{i % 4}" / f"IMG_{i:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(target, quality=90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(name: str, processes: int, folder: Path, work: Path, args: argparse.Namespace) -> dict:
    """Index folder into a fresh library with one configuration; its report and timings."""
    cores = os.cpu_count() or 1
    per_process = max(1, cores // processes)
    data_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    common = [str(folder), "--data-dir", str(data_dir), "--model", args.model, "--pretrained", args.pretrained,
              "--batch-size", str(args.batch_size), "--workers", str(per_process), "--device", args.device, "--json"]
    if name == "single":
        command = [sys.executable, "-m", "clipsearch", "index", *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", "-m", "clipsearch.indexer.distributed", *common,
                   "--shard-size", str(args.shard_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    return {
        "run_seconds": report["seconds"], "images_per_second": report["images_per_second"],
        "wall_seconds": round(wall, 3), "wall_images_per_second": round(report["embedded"] / wall, 2),
        "embedded": report["embedded"], "failed": report["failed"], "vectors": report["vectors"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", type=Path, help="photos to index (default: generated JPEGs)")
    p.add_argument("--count", type=int, default=200, help="generated photos (without FOLDER)")
    p.add_argument("--size", default="1280x960", help="generated photo size WxH")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="torchrun process counts to compare")
    p.add_argument("--no-single", action="store_true", help="skip the single-process `clipsearch index` reference")
    p.add_argument("--model", default="clipsearch-tiny")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=50, help="files per shard (small here so every rank gets several)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (the median is reported)")
    p.add_argument("--out", type=Path, help="write the JSON here instead of bench/results/")
    args = p.parse_args()

    import torch

    with tempfile.TemporaryDirectory(prefix="clipsearch-dist-bench-") as tmp:
        work = Path(tmp)
        folder = args.folder
        if folder is None:
            folder = work / "photos"
            width, height = (int(v) for v in args.size.lower().split("x"))
            log(f"generating {args.count} {width}x{height} JPEGs in {folder}")
            generate_jpegs(folder, args.count, (width, height))
        configs = ([] if args.no_single else [("single", 1)]) + [(f"torchrun-{n}", n) for n in args.processes]
        results = {}
        for name, processes in configs:
            runs = []
            for attempt in range(args.repeat):
                log(f"{name}: run {attempt + 1}/{args.repeat}")
                runs.append(run_once(name, processes, folder, work, args))
            middle = sorted(runs, key=lambda r: r["run_seconds"])[len(runs) // 2]
            results[name] = {"processes": processes, **middle,
                             "images_per_second_runs": [r["images_per_second"] for r in runs]}
            log(f"{name}: {middle['images_per_second']} images/s in the run, {middle['wall_images_per_second']} wall")
    baseline = results.get(f"torchrun-{args.processes[0]}")
    speedups = {name: round(r["images_per_second"] / baseline["images_per_second"], 2)
                for name, r in results.items() if baseline and baseline["images_per_second"]}
    now = datetime.now(timezone.utc)
    report = {
        "benchmark": "distributed_index",
        "when": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda_devices": torch.cuda.device_count()},
        "photos": {"folder": str(args.folder) if args.folder else None,
                   "indexed": next(iter(results.values()))["embedded"] if results else 0,
                   "size": None if args.folder else args.size},
        "model": f"{args.model}/{args.pretrained}", "batch_size": args.batch_size, "shard_size": args.shard_size,
        "results": results,
        "speedup_vs_first_torchrun": speedups,
        "median_of": args.repeat,
        "argv": sys.argv[1:],
        "note": "run images/s excludes interpreter start and model load; wall includes them",
    }
    log(f"wrote {save_report('distributed_index', report, now, args.out)}")


if __name__ == "__main__":
    main()
