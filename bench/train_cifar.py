"""CIFAR-10 training benchmark (run by hand, not a test): clipsearch train vs open_clip_train on the same CPU job.

The one documented small config (both trainers get exactly these settings):
  model clipsearch-tiny (ViT 2 layers x 64 wide, 16 px patches on 64 px images, text 2 x 64, 64-d embedding), from
  scratch (random init, seed 0); data ../shared/datasets/cifar10/train-{0000..0004}.tar.gz (WebDataset, gzipped),
  each image captioned with its class name (the shards' KEY.txt, what open_clip_train reads; clipsearch gets the
  same text through the template "{}"); global batch 64, 300 optimiser steps, AdamW lr 5e-4 (betas 0.9/0.98,
  eps 1e-6, weight decay 0.2 except gains/biases/temperature), 30 warm-up steps then cosine; fp32; 1 DataLoader
  worker; CPU.
Then each trained model is scored with `clipsearch eval`'s code (clipsearch.search.evaluation.evaluate_zeroshot
through OpenClipEncoder, the 14 default prompt templates) on ../shared/datasets/cifar10/test (10,000 images).

Figures per trainer: zero-shot top-1/top-5, training samples/s over the steps after the first 10 (each step timed
from the end of the previous one, data loading included, as both trainers log it): overall, and from the median step
time and from the 10th-percentile step time (both robust to other processes on a shared machine), wall time of the whole training process, final training loss.

open_clip_train runs as `python -m open_clip_train.main` would, through a two-line launcher that first registers
clipsearch-tiny with open_clip (open_clip_train cannot see clipsearch's model configs otherwise). It needs
webdataset, braceexpand and pandas: `pip install webdataset braceexpand pandas` (bench only, not dependencies).

    python bench/train_cifar.py                       # ~15 min on 2 CPU cores
    python bench/train_cifar.py --steps 100 --seeds 0,1
Writes bench/results/train_cifar-<UTC time>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
SHARDS = "train-{0000..0004}.tar.gz"
N_SHARD_SAMPLES = 50_000
WARM_STEPS = 10  # steps left out of the steady-state samples/s (start-up, worker spin-up)

log = logging.getLogger("bench.train_cifar")

OPEN_CLIP_LAUNCHER = (
    "import sys; from clipsearch.encoders.openclip import register_model_configs; register_model_configs(); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)
OURS_LAUNCHER = (
    "import json, sys, logging; logging.basicConfig(level=logging.WARNING); "
    "from clipsearch.training.config import load_config; from clipsearch.training import train; "
    "print('RUN', train(load_config(None, json.loads(sys.argv[1]))))"
)


def speed(step_seconds: list[float], batch: int) -> dict:
    """Samples/s over the steps after the first WARM_STEPS: overall (samples over summed step times) and from the
    median step time, which other processes on a shared machine disturb far less."""
    steady = step_seconds[WARM_STEPS:]
    if not steady or sum(steady) <= 0:
        return {"samples_per_s": None, "samples_per_s_median_step": None, "samples_per_s_p10_step": None}
    return {"samples_per_s": round(batch * len(steady) / sum(steady), 2),
            "samples_per_s_median_step": round(batch / statistics.median(steady), 2),
            # the fastest tenth of steps: closest to the trainer's own speed when other jobs share the cores
            "samples_per_s_p10_step": round(batch / sorted(steady)[len(steady) // 10], 2)}


def run_ours(args, seed: int, out: Path) -> dict:
    settings = {
        "model": "clipsearch-tiny", "pretrained": "", "seed": seed,
        "data": {"path": str(CIFAR / SHARDS), "kind": "webdataset", "templates": ["{}"]},
        "batch_size": args.batch_size, "steps": args.steps, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": 0.2, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "precision": "fp32", "workers": args.workers,
        "output": str(out), "name": f"clipsearch-seed{seed}", "checkpoint_every": 0, "progress": False,
        "tensorboard": False, "log_every": 1,
    }
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", OURS_LAUNCHER, json.dumps(settings)], cwd=ROOT, text=True,
                          capture_output=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"clipsearch train failed:\n{proc.stderr[-3000:]}")
    run = Path(re.search(r"^RUN (.+)$", proc.stdout, re.M).group(1))
    from clipsearch.training.logs import read_csv_rows

    rows = read_csv_rows(run / "train.csv")
    seconds = [args.batch_size / float(r["samples_per_s"]) for r in rows]
    return {"trainer": "clipsearch", "seed": seed, "run_dir": str(run), "wall_s": round(wall, 1),
            "steps": len(rows), "final_loss": float(rows[-1]["loss"]),
            **speed(seconds, args.batch_size), "weights": f"local-dir:{run / 'export'}"}


def run_open_clip(args, seed: int, out: Path) -> dict:
    name = f"open_clip-seed{seed}"
    argv = [
        "--model", "clipsearch-tiny", "--seed", str(seed), "--device", "cpu", "--precision", "fp32",
        "--dataset-type", "webdataset", "--train-data", str(CIFAR / SHARDS),
        "--train-num-samples", str(args.steps * args.batch_size), "--epochs", "1",
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup", str(args.warmup), "--wd", "0.2",
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--workers", str(args.workers),
        "--logs", str(out), "--name", name, "--save-frequency", "1", "--zeroshot-frequency", "0",
        "--log-every-n-steps", "1", "--report-to", "",
    ]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_LAUNCHER, *argv], cwd=ROOT, text=True, capture_output=True)
    wall = time.perf_counter() - started
    log_file = out / name / "out.log"
    text = log_file.read_text() if log_file.is_file() else proc.stderr
    if proc.returncode:
        raise RuntimeError(f"open_clip_train failed:\n{(proc.stderr or text)[-3000:]}")
    # "Train Epoch: 0 [...] Data (t): 0.01 Batch (t): 0.95, 67.3/s, ... Loss: 3.9 (4.0)"
    steps = re.findall(r"Batch \(t\): ([\d.]+),.*?Loss: ([\d.]+)", text)
    seconds = [float(s) for s, _ in steps]
    checkpoint = out / name / "checkpoints" / "epoch_1.pt"
    return {"trainer": "open_clip_train", "seed": seed, "run_dir": str(out / name), "wall_s": round(wall, 1),
            "steps": len(steps), "final_loss": float(steps[-1][1]) if steps else None,
            **speed(seconds, args.batch_size), "weights": str(checkpoint)}


def zero_shot(weights: str, limit: int | None) -> dict:
    """`clipsearch eval`'s zero-shot on cifar10/test for a local-dir export or an open_clip_train checkpoint."""
    from clipsearch.encoders import EncoderSpec
    from clipsearch.encoders.openclip import OpenClipEncoder
    from clipsearch.search.evaluation import evaluate_zeroshot

    encoder = OpenClipEncoder(EncoderSpec(model="clipsearch-tiny", pretrained=weights, device="cpu", precision="fp32"))
    report = evaluate_zeroshot(encoder, CIFAR / "test", CIFAR / "test" / "labels.csv",
                               classes_file=CIFAR / "test" / "classes.txt", limit=limit, workers=2)
    return {"top1": round(report["metrics"]["top1"], 4), "top5": round(report["metrics"]["top5"], 4),
            "n_evaluated": report["n_evaluated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each trainer runs once per seed")
    parser.add_argument("--eval-limit", type=int, default=0, help="test images (0: all 10,000)")
    parser.add_argument("--trainers", default="clipsearch,open_clip_train")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/clipsearch-bench-train-cifar"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not (CIFAR / "train-0000.tar.gz").is_file():
        sys.exit(f"{CIFAR} is absent: this benchmark needs the shared CIFAR-10 shards")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = args.work_dir / stamp
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for trainer in args.trainers.split(","):
            log.info("training with %s, seed %d, %d steps of %d", trainer, seed, args.steps, args.batch_size)
            result = (run_ours if trainer == "clipsearch" else run_open_clip)(args, seed, work)
            log.info("evaluating %s", result["weights"])
            result["zeroshot"] = zero_shot(result["weights"], args.eval_limit or None)
            log.info("%s", json.dumps(result))
            runs.append(result)
    summary = {}
    for trainer in {r["trainer"] for r in runs}:
        mine = [r for r in runs if r["trainer"] == trainer]
        summary[trainer] = {
            "top1_mean": round(statistics.mean(r["zeroshot"]["top1"] for r in mine), 4),
            "top5_mean": round(statistics.mean(r["zeroshot"]["top5"] for r in mine), 4),
            "samples_per_s_mean": round(statistics.mean(r["samples_per_s"] for r in mine), 2),
            "samples_per_s_median_step_mean": round(statistics.mean(r["samples_per_s_median_step"] for r in mine), 2),
            "samples_per_s_p10_step_mean": round(statistics.mean(r["samples_per_s_p10_step"] for r in mine), 2),
            "wall_s_mean": round(statistics.mean(r["wall_s"] for r in mine), 1),
        }
    import torch

    result = {
        "benchmark": "train_cifar", "time": stamp, "host": platform.node(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "config": {"model": "clipsearch-tiny", "pretrained": None, "data": str(CIFAR / SHARDS),
                   "captions": "class name (KEY.txt)", "steps": args.steps, "batch_size": args.batch_size,
                   "lr": args.lr, "warmup": args.warmup, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6,
                   "precision": "fp32", "workers": args.workers, "device": "cpu",
                   "eval": "cifar10/test zero-shot, 14 default templates", "eval_limit": args.eval_limit or None},
        "runs": runs, "summary": summary,
    }
    out = args.out or ROOT / "bench" / "results" / f"train_cifar-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
