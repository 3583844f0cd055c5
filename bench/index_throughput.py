"""Indexing throughput benchmark (run by hand, not a test): prints one JSON object to stdout, logs to stderr.

Measures, in one process and side by side:
  decode   single-threaded read + open_image(target_size=model size, i.e. JPEG draft) + preprocess, per image
           (mean/p50/p95 ms), and the same with a full decode (target_size=None); draft_speedup = full / draft
  model    encode_images on batches of preprocessed inputs only, after one warm-up batch; when the runtime
           is OpenVINO, the same inputs through the torch runtime too (over_torch)
  index    index_folders into a fresh temporary library (model loaded once beforehand and passed in, so
           model_load_s is reported apart and excluded), repeated --repeat times with the median
  gpu jpeg with --gpu-jpeg-decode and a CUDA model, the index runs again with JPEGs decoded on the GPU
           (index_gpu_jpeg_decode.over_decoding_threads: its images/s over the runs above)
  memory   peak resident set size of the process, also sampled after each phase
  whole    `clipsearch index` as a separate process (start-up included), then again on the unchanged folder;
           with --rclip, rclip 3.3 the same way (fresh index, then a rerun); when the runtime is OpenVINO,
           also `clipsearch index --runtime torch` (clipsearch_whole_process_torch)
Machines are shared and noisy: compare figures as ratios taken from the same run (draft_speedup,
index_vs_model), not absolute numbers across runs or machines. Weights are never downloaded.

    python bench/index_throughput.py                                   # tiny model on the camera roll
    python bench/index_throughput.py --model ViT-B-32 --pretrained none --limit 64   # ViT-B-32, random weights

FOLDER defaults to ../shared/datasets/camera_roll next to the project; when that is absent (or with
--synthetic) it generates photo-like JPEGs (half 4000x3000, half 1920x1080) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights (unless the user said otherwise)

import numpy as np  # noqa: E402

from clipsearch.config import load_settings  # noqa: E402
from clipsearch.encoders import encoder_spec_from_settings, load_encoder  # noqa: E402
from clipsearch.errors import ImageDecodeError  # noqa: E402
from clipsearch.images import open_image, read_image_bytes  # noqa: E402
from clipsearch.indexer.run import index_folders  # noqa: E402
from clipsearch.indexer.walk import walk_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import clipsearch_whole_process, plain_openclip, rclip_whole_process  # noqa: E402

DEFAULT_FOLDER = Path(__file__).resolve().parents[1].parent / "shared/datasets/camera_roll"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def generate_photos(folder: Path, count: int, seed: int = 0) -> None:
    """Photo-like JPEGs: smooth colour gradients plus sensor-like noise (so they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (4000, 3000) if i % 2 == 0 else (1920, 1080)
        x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
        y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
        a, b, c = rng.uniform(0.2, 1.0, 3)
        channels = [a * x + (1 - a) * y, b * y + (1 - b) * (1 - x), 0.5 + 0.5 * np.sin(6.0 * c * (x + y))]
        rgb = np.stack([255.0 * ch for ch in np.broadcast_arrays(*channels)], axis=-1)
        rgb += rng.integers(-10, 11, size=rgb.shape, dtype=np.int8)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"IMG_{i:04d}.jpg", quality=90)
        if (i + 1) % 20 == 0:
            log(f"generated {i + 1}/{count} photos")


def ms_stats(values: list[float]) -> dict:
    arr = np.asarray(values or [np.nan]) * 1000.0
    return {"mean": round(float(arr.mean()), 2), "p50": round(float(np.percentile(arr, 50)), 2),
            "p95": round(float(np.percentile(arr, 95)), 2)}


def decode_pass(files: list[str], encoder, max_pixels: int, target_size: int | None, keep: int):
    """Single-threaded read + decode + preprocess of every file: (seconds per image, megapixels, inputs kept)."""
    times, megapixels, kept, failed = [], 0.0, [], 0
    for path in files:
        started = time.perf_counter()
        try:
            image, info = open_image(read_image_bytes(path), max_pixels=max_pixels, target_size=target_size)
            model_input = encoder.preprocess(image)
        except ImageDecodeError:
            failed += 1
            continue
        times.append(time.perf_counter() - started)
        megapixels += info.width * info.height / 1e6
        if len(kept) < keep:
            kept.append(model_input)
    return times, megapixels, kept, failed


def model_pass(encoder, inputs: list, batch_size: int) -> dict:
    inputs = (inputs * (5 * batch_size // len(inputs) + 1))[:5 * batch_size]  # few files: reuse them
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    encoder.encode_images(batches[0])  # warm-up
    timed = batches[1:]
    started = time.perf_counter()
    for batch in timed:
        encoder.encode_images(batch)
    seconds = time.perf_counter() - started
    images = sum(len(b) for b in timed)
    return {"images": images, "batches": len(timed), "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 2)}


def index_runs(base: dict, folder: Path, encoder, repeat: int, label: str = "") -> list[dict]:
    """index_folders into a fresh temporary library `repeat` times, with the loaded encoder; one dict per run."""
    runs = []
    for i in range(repeat):
        with tempfile.TemporaryDirectory(prefix="clipsearch-bench-lib-") as data_dir:
            report = index_folders(load_settings({**base, "data_dir": data_dir}, env={}), [folder], encoder=encoder)
        runs.append({"images_per_s": round(report.images_per_second, 2), "seconds": round(report.seconds, 3),
                     "embedded": report.embedded, "failed": len(report.failed),
                     "decode_seconds": round(report.decode_seconds, 3),
                     "encode_seconds": round(report.encode_seconds, 3)})
        log(f"{label}index run {i + 1}/{repeat}: {runs[-1]}")
    return runs


def ratios(index_ips: float, references: dict) -> dict:
    """clipsearch relative to each reference measured in this run (higher is better for clipsearch)."""
    out = {}
    if "plain_openclip_fp32" in references:
        out["index_vs_plain_baseline"] = round(index_ips / references["plain_openclip_fp32"]["images_per_s"], 2)
    if "rclip" in references:
        out["index_vs_rclip"] = round(index_ips / references["rclip"]["images_per_s"], 2)
        if "clipsearch_whole_process" in references:
            whole = references["clipsearch_whole_process"]
            out["whole_process_rclip_over_clipsearch"] = round(references["rclip"]["seconds"] / whole["seconds"], 2)
            out["unchanged_rerun_rclip_over_clipsearch"] = round(
                references["rclip"]["unchanged_seconds"] / whole["unchanged_seconds"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", type=Path, help=f"photos to index (default: {DEFAULT_FOLDER})")
    for name, default in (("model", "clipsearch-tiny"), ("pretrained", "none"), ("device", "auto"), ("precision", "auto"),
                          ("runtime", "auto")):
        p.add_argument(f"--{name}", default=default)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="decoding threads for indexing (0 = one per core, max 8)")
    p.add_argument("--limit", type=int, help="use only N image files, evenly spaced in walk order")
    p.add_argument("--repeat", type=int, default=1, help="end-to-end indexing runs (fresh library each)")
    p.add_argument("--synthetic", action="store_true", help="generate photos even when FOLDER exists")
    p.add_argument("--generate", type=int, default=200, help="how many photos to generate (default 200)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain open_clip fp32 full-decode loop")
    p.add_argument("--no-whole-process", action="store_true", help="skip timing `clipsearch index` as a whole process")
    p.add_argument("--rclip", help="path to an rclip 3.3 executable (own venv) to time side by side")
    p.add_argument("--gpu-jpeg-decode", action="store_true",
                   help="on a CUDA model, also time indexing with JPEGs decoded on the GPU (setting gpu_jpeg_decode)")
    p.add_argument("--no-torch-reference", action="store_true",
                   help="when the runtime is OpenVINO, skip timing the torch runtime (model and whole process) beside it")
    args = p.parse_args()
    if args.rclip:  # rclip runs in the photo folder: a relative path must not move with it
        args.rclip = os.path.abspath(args.rclip)

    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as scratch:
        scratch = Path(scratch)
        folder = args.folder or DEFAULT_FOLDER
        dataset = str(folder)
        if args.synthetic or (args.folder is None and not folder.is_dir()):
            count = min(args.generate, args.limit or args.generate)
            folder, dataset = scratch / "photos", "generated"
            folder.mkdir()
            log(f"generating {count} synthetic photos in {folder}")
            generate_photos(folder, count)
        elif not folder.is_dir():
            sys.exit(f"error: folder {folder} does not exist")
        files = [f.path for f in walk_images(folder)]
        if args.limit and len(files) > args.limit:
            files = [files[i * len(files) // args.limit] for i in range(args.limit)]  # a spread, not one subfolder
            folder = scratch / "subset"  # index just these: symlink them together
            folder.mkdir()
            for i, path in enumerate(files):
                os.symlink(path, folder / f"{i:05d}_{Path(path).name}")
        total_mb = sum(len(read_image_bytes(f)) for f in files) / 1e6  # also warms the page cache
        log(f"{len(files)} files ({total_mb:.1f} MB) from {dataset}")

        base = {"model": args.model, "pretrained": args.pretrained, "device": args.device,
                "precision": args.precision, "runtime": args.runtime, "batch_size": args.batch_size,
                "workers": args.workers}
        settings = load_settings({**base, "data_dir": scratch / "unused"}, env={})
        rss = {"start": peak_rss_mb()}
        started = time.perf_counter()
        encoder = load_encoder(encoder_spec_from_settings(settings, settings.runtime))
        model_load_s = time.perf_counter() - started
        rss["after_model_load"] = peak_rss_mb()
        runtime = getattr(encoder, "runtime", "torch")
        log(f"loaded {encoder.model_id} on {encoder.device} ({runtime}) in {model_load_s:.2f}s")

        keep = args.batch_size * 5  # one warm-up batch + four timed ones
        draft, megapixels, inputs, decode_failed = decode_pass(files, encoder, settings.max_image_pixels,
                                                              encoder.image_size, keep)
        full, _, _, _ = decode_pass(files, encoder, settings.max_image_pixels, None, 0)
        rss["after_decode"] = peak_rss_mb()
        log(f"decode: draft {ms_stats(draft)['mean']} ms/image, full {ms_stats(full)['mean']} ms/image")
        if not inputs:
            sys.exit("error: no image could be decoded")
        model = model_pass(encoder, inputs, args.batch_size)
        rss["after_model"] = peak_rss_mb()
        log(f"model: {model['images_per_s']} images/s")
        compare_torch = runtime != "torch" and not args.no_torch_reference
        if compare_torch:  # the same inputs through torch: what the other runtime buys, side by side
            torch_encoder = load_encoder(encoder_spec_from_settings(settings, "torch"))
            import torch

            # Both runtimes preprocess identically (tested), so the same arrays feed torch.
            torch_inputs = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
            model["torch"] = model_pass(torch_encoder, torch_inputs, args.batch_size)
            model["over_torch"] = round(model["images_per_s"] / model["torch"]["images_per_s"], 2)
            log(f"model through torch: {model['torch']['images_per_s']} images/s")
            del torch_encoder, torch_inputs
        del inputs

        runs = index_runs(base, folder, encoder, args.repeat)
        gpu_jpeg = None
        if args.gpu_jpeg_decode:  # the same runs again, with JPEGs decoded on the GPU
            if encoder.decodes_jpegs():
                gpu_jpeg = index_runs({**base, "gpu_jpeg_decode": True}, folder, encoder, args.repeat, "gpu_jpeg_decode ")
            else:
                log("--gpu-jpeg-decode: the model does not run on a CUDA GPU with torchvision's JPEG decoder; skipped")
        rss["after_index"] = peak_rss_mb()

        references = {}
        if not args.no_baseline:
            references["plain_openclip_fp32"] = plain_openclip(files, args.model, args.batch_size)
            log(f"plain open_clip baseline: {references['plain_openclip_fp32']}")
        if not args.no_whole_process:
            extra = ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                     "--precision", args.precision]
            references["clipsearch_whole_process"] = clipsearch_whole_process(
                folder, args.model, args.pretrained, [*extra, "--runtime", args.runtime])
            log(f"clipsearch whole process: {references['clipsearch_whole_process']}")
            if compare_torch:
                references["clipsearch_whole_process_torch"] = clipsearch_whole_process(
                    folder, args.model, args.pretrained, [*extra, "--runtime", "torch"])
                log(f"clipsearch whole process, torch runtime: {references['clipsearch_whole_process_torch']}")
        if args.rclip:
            references["rclip"] = rclip_whole_process(args.rclip, folder, len(files))
            log(f"rclip: {references['rclip']}")

    import torch

    median_ips = statistics.median(r["images_per_s"] for r in runs)
    draft_mean, full_mean = ms_stats(draft)["mean"], ms_stats(full)["mean"]
    result = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset, "files": len(files), "total_mb": round(total_mb, 1),
        "total_megapixels": round(megapixels, 1), "decode_failed": decode_failed,
        "model_id": encoder.model_id, "dim": encoder.dim, "image_size": encoder.image_size,
        "device": encoder.device, "precision": getattr(encoder, "precision", settings.precision), "runtime": runtime,
        "batch_size": settings.batch_size, "workers": settings.resolved_workers,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "model_load_s": round(model_load_s, 3),
        "decode_ms_per_image": {"draft": ms_stats(draft), "full": ms_stats(full)},
        "draft_speedup": round(full_mean / draft_mean, 2) if draft_mean else None,
        "model_images_per_s": model["images_per_s"], "model": model,
        "index": {"images_per_s": median_ips, "runs": runs},
        "index_vs_model": round(median_ips / model["images_per_s"], 3),
        **({"index_gpu_jpeg_decode": {
            "images_per_s": statistics.median(r["images_per_s"] for r in gpu_jpeg), "runs": gpu_jpeg,
            "over_decoding_threads": round(statistics.median(r["images_per_s"] for r in gpu_jpeg) / median_ips, 2),
        }} if gpu_jpeg else {}),
        "references": references,
        "ratios": ratios(median_ips, references),
        "peak_rss_mb": peak_rss_mb(), "rss_mb_by_phase": rss,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "open_clip": pkg_version("open_clip_torch"), "pillow": pkg_version("pillow"),
                     "openvino": pkg_version("openvino")},
        "argv": sys.argv[1:],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
