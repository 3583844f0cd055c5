"""Command-line search benchmark (run by hand, not a test): one JSON object on stdout, logs on stderr.

What a person waits for when typing `clipsearch search "..."` in a terminal with no server running: the
whole process (interpreter start, imports, model load, query embedding, search, printing), timed --runs times
per case, side by side in one run:
  openvino   clipsearch search --runtime openvino (the default `auto` on an x86-64 CPU)
  torch      clipsearch search --runtime torch
  rclip      rclip 3.3 answering the same query with --no-indexing (with --rclip; offline, random weights, via
             ../shared/tools/rclip_random_weights.py; its model is ViT-B-32 at 256 px)
Each case reports median and min seconds and the peak RSS of its processes; ratios are medians over medians.
The library is indexed first (not timed), and one untimed search per case exports or builds the model, so the
timed runs see a warm model cache, as every search after a user's first does. Machines are shared and noisy:
compare the ratios from one run.

    python bench/cli_search.py --model ViT-B-32 --pretrained none --rclip ../rclip-venv/bin/rclip
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import rclip_offline_env  # noqa: E402

DEFAULT_FOLDER = Path(__file__).resolve().parents[1].parent / "shared/datasets/camera_roll"
QUERY = "a dog running on the beach"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_measured(command: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process; raises with its stderr when it fails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (Popen.wait would discard it)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} failed: {err.read().decode(errors='replace')[-2000:]}")
    return seconds, round(usage.ru_maxrss / 1024, 1)  # KiB on Linux


def timed_case(command: list[str], runs: int, cwd: Path | None = None, env: dict | None = None) -> dict:
    run_measured(command, cwd, env)  # untimed: builds or exports the model, fills the OS page cache
    seconds, peaks = [], []
    for _ in range(runs):
        wall, peak = run_measured(command, cwd, env)
        seconds.append(wall)
        peaks.append(peak)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "runs": [round(s, 3) for s in seconds], "peak_rss_mb": max(peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rclip", help="path to an rclip 3.3 executable (own venv) to time side by side")
    args = parser.parse_args()
    if args.rclip:  # rclip runs in the photo folder: a relative path must not move with it
        args.rclip = os.path.abspath(args.rclip)
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder} is not a folder: give one of photos to index")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version()},
                    "folder": str(args.folder), "model": args.model, "pretrained": args.pretrained, "query": QUERY}
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-search-") as scratch:
        scratch = Path(scratch)
        common = ["--data-dir", str(scratch / "library"), "--model", args.model, "--pretrained", args.pretrained]
        clipsearch = [sys.executable, "-m", "clipsearch"]
        log("indexing the folder (not timed)")
        subprocess.run([*clipsearch, "index", str(args.folder), *common], check=True, capture_output=True, env=env)
        # No server runs for this library, so --local only guards against one started meanwhile.
        for runtime in ("openvino", "torch"):
            log(f"timing clipsearch search --runtime {runtime}")
            report[runtime] = timed_case([*clipsearch, "search", QUERY, "--local", "--runtime", runtime, *common],
                                         args.runs, env=env)
        if args.rclip:
            rclip_env = rclip_offline_env(scratch / "rclip-data")
            log("indexing the folder with rclip (not timed)")
            subprocess.run([args.rclip, "-f", QUERY], cwd=args.folder, check=True, capture_output=True, env=rclip_env)
            log("timing rclip --no-indexing")
            report["rclip"] = timed_case([args.rclip, "-n", "-f", QUERY], args.runs, cwd=args.folder, env=rclip_env)
    report["torch_over_openvino"] = round(report["torch"]["median_s"] / report["openvino"]["median_s"], 2)
    if "rclip" in report:
        report["rclip_over_openvino"] = round(report["rclip"]["median_s"] / report["openvino"]["median_s"], 2)
        report["rclip_over_torch"] = round(report["rclip"]["median_s"] / report["torch"]["median_s"], 2)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
