"""Watch latency benchmark (run by hand, not a test): prints one JSON object to stdout, logs to stderr.

Runs a real Watcher (native observer, or --polling) on a temporary folder and a Searcher beside it, as
`clipsearch serve --watch` has them, and times:
  idle    file close -> searchable (in the Searcher's vector index) for photos written one at a time
  burst   the same for each of --burst photos written as fast as the disk takes them, plus the sustained rate
          (photos and recorded file system events per second) from the first close to the last photo searchable
  intake  file system events per second the observer side records (no indexing): --intake files written at once
  store   saving and loading the vector file once at --store-size vectors of --store-dim (why the watcher saves
          it at most once a minute instead of after every batch)
Photos are 1600x1200 JPEGs (a few distinct ones, each file made unique by bytes after its end marker).
Encoders: the tiny open_clip model with random weights (default: the real decode, preprocess and model costs)
or `--model fake` (the tests' colour encoder: the watcher's own overhead). The settle time is the setting's
default unless --settle says otherwise. Writes the JSON to bench/results/watch_latency-<timestamp>.json too.

    python bench/watch_latency.py                     # tiny model, native observer, 1,000-photo burst
    python bench/watch_latency.py --model fake --polling
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clipsearch.config import load_settings  # noqa: E402
from clipsearch.errors import EmptyLibraryError  # noqa: E402
from clipsearch.indexer.watch import Watcher  # noqa: E402
from clipsearch.library import Library  # noqa: E402
from clipsearch.search.searcher import Searcher  # noqa: E402
from report import save_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")


def photo_bytes(count: int, distinct: int = 16) -> list[bytes]:
    """count JPEG files' bytes: `distinct` real photos-like images, each copy made unique after its EOI marker."""
    rng = np.random.default_rng(0)
    bases = []
    for _ in range(distinct):
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)  # smooth colour fields, like a photo
        image = Image.fromarray(small).resize((1600, 1200), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        bases.append(buffer.getvalue())
    return [bases[n % distinct] + f"bench-{n}".encode() for n in range(count)]


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return {"count": 0}
    return {"count": len(ms), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], 1), "max_ms": round(ms[-1], 1)}


class Searchable:
    """When each path first became searchable: its catalog id is in the Searcher's (synced) vector index."""

    def __init__(self, settings, encoder, folder: Path):
        self.library = Library(settings)
        self.searcher = Searcher(self.library, encoder)
        self.folder = str(folder)
        self.seen: dict[str, float] = {}

    def poll(self) -> None:
        """Record the paths searchable now (a server's next query would find them)."""
        try:
            held = set(self.searcher.store().sample_ids(10**9).tolist())  # every id the index holds
        except EmptyLibraryError:
            return
        now = time.monotonic()
        for path, row in self.library.catalog.known_under([self.folder]).items():
            if path not in self.seen and row.id in held:
                self.seen[path] = now

    def close(self) -> None:
        self.library.close()


def write(path: Path, data: bytes) -> float:
    """Write a file and return the monotonic time of its close."""
    with open(path, "wb") as out:
        out.write(data)
    return time.monotonic()


def idle_phase(folder: Path, photos: list[bytes], searchable: Searchable, timeout: float) -> list[float]:
    latencies = []
    for n, data in enumerate(photos):
        path = folder / f"idle-{n:03d}.jpg"
        closed = write(path, data)
        deadline = closed + timeout
        while str(path) not in searchable.seen and time.monotonic() < deadline:
            time.sleep(0.005)
            searchable.poll()
        if str(path) in searchable.seen:
            latencies.append(searchable.seen[str(path)] - closed)
        time.sleep(0.3)  # idle again before the next one
    return latencies


def count_events(pending) -> list[int]:
    """Count the events observers hand to a pending set from now on (in the returned one-item list)."""
    events = [0]
    record = pending.record

    def counting(*args, **kwargs):
        events[0] += 1
        return record(*args, **kwargs)

    pending.record = counting
    return events


def burst_phase(folder: Path, photos: list[bytes], searchable: Searchable, watcher: Watcher, timeout: float) -> dict:
    events = count_events(watcher.pending)
    batches_before = watcher.batches
    closes: dict[str, float] = {}
    stop = threading.Event()

    def poller():
        while not stop.is_set():
            searchable.poll()
            time.sleep(0.1)  # each look costs a few ms of CPU: often enough for latencies measured in seconds

    thread = threading.Thread(target=poller, daemon=True)
    thread.start()
    started = time.monotonic()
    for n, data in enumerate(photos):
        path = folder / f"burst-{n:04d}.jpg"
        closes[str(path)] = write(path, data)
    written = time.monotonic()
    deadline = written + timeout
    while len([p for p in closes if p in searchable.seen]) < len(closes) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join()
    searchable.poll()
    done = [p for p in closes if p in searchable.seen]
    span = max(searchable.seen[p] for p in done) - min(closes.values()) if done else 0.0
    return {
        **percentiles([searchable.seen[p] - closes[p] for p in done]),
        "files": len(closes), "searchable": len(done), "write_s": round(written - started, 3),
        "first_close_to_last_searchable_s": round(span, 3),
        "files_per_s": round(len(done) / span, 1) if span else None,
        "events": events[0], "events_per_s": round(events[0] / span, 1) if span else None,
        "batches": watcher.batches - batches_before,
    }


def intake_phase(folder: Path, count: int, settings) -> dict:
    """Events per second that observers hand to the pending set while files are written as fast as possible."""
    from clipsearch.indexer.observers import WatchFilter, start_observers, stop_observers
    from clipsearch.indexer.pending import PendingChanges

    folder.mkdir()
    pending = PendingChanges(settings.watch_settle_seconds)
    events = count_events(pending)
    observers = start_observers([str(folder)], pending, WatchFilter([str(folder)], str(settings.data_dir), False),
                                polling=settings.watch_polling, poll_seconds=settings.watch_poll_seconds)
    try:
        data = os.urandom(20_000)
        started = time.monotonic()
        for n in range(count):
            write(folder / f"intake-{n:05d}.jpg", data)
        written = time.monotonic()
        while len(pending) < count and time.monotonic() - written < 60:
            time.sleep(0.005)
        recorded = time.monotonic()
    finally:
        stop_observers(observers)
    return {"files": count, "write_s": round(written - started, 3), "all_recorded_s": round(recorded - started, 3),
            "events": events[0], "events_per_s": round(events[0] / (recorded - started), 1)}


def store_save_seconds(size: int, dim: int) -> dict:
    """Seconds to save an exact vector index of `size` vectors (the watcher's periodic save)."""
    from clipsearch.store import VectorStore, build_index

    vectors = np.random.default_rng(1).standard_normal((size, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index, params = build_index(dim, np.arange(size, dtype=np.int64), vectors, "exact")
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-store-") as scratch:
        store = VectorStore(Path(scratch) / "vectors.faiss", "bench", dim, index=index, params=params)
        started = time.perf_counter()
        store.save()
        saved = time.perf_counter() - started
        started = time.perf_counter()
        VectorStore.load(store.path)
        loaded = time.perf_counter() - started
    return {"vectors": size, "dim": dim, "save_s": round(saved, 3), "load_s": round(loaded, 3)}


def make_encoder(args, settings):
    if args.model == "fake":
        sys.path.insert(0, str(REPO))
        from tests.fakes import ColorWordEncoder, register_fake_encoder

        register_fake_encoder()
        return ColorWordEncoder()
    from clipsearch.encoders import encoder_spec_from_settings, load_encoder

    return load_encoder(encoder_spec_from_settings(settings, settings.runtime))  # as `clipsearch watch` loads it


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="clipsearch-tiny", help="open_clip model, or `fake` for the tests' colour encoder")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--polling", action="store_true", help="poll instead of native notifications")
    p.add_argument("--settle", type=float, help="watch_settle_seconds (default: the setting's default)")
    p.add_argument("--poll", type=float, help="watch_poll_seconds (default: the setting's default)")
    p.add_argument("--idle", type=int, default=20, help="photos written one at a time")
    p.add_argument("--burst", type=int, default=1000, help="photos written at once")
    p.add_argument("--intake", type=int, default=5000, help="files written for the event intake timing (0: skip)")
    p.add_argument("--store-size", type=int, default=100_000, help="vectors in the store-save timing (0: skip)")
    p.add_argument("--store-dim", type=int, default=512, help="vector width in the store timing (512: ViT-B-32)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for a phase's photos")
    p.add_argument("--out", type=Path, help="write the JSON here instead of bench/results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    logging.getLogger("clipsearch").setLevel(logging.WARNING)
    started_at = datetime.now(timezone.utc)

    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-watch-") as scratch:
        folder = Path(scratch) / "photos"
        folder.mkdir()
        overrides = {"data_dir": Path(scratch) / "library", "model": "test-colors" if args.model == "fake" else args.model,
                     "pretrained": "v1" if args.model == "fake" else args.pretrained, "device": args.device,
                     "watch_polling": args.polling, "watch_settle_seconds": args.settle, "watch_poll_seconds": args.poll}
        settings = load_settings(overrides, env={})
        encoder = make_encoder(args, settings)
        log.info("encoder %s; generating %d photos", encoder.model_id, args.idle + args.burst)
        photos = photo_bytes(args.idle + args.burst)
        watcher = Watcher(settings, [folder], encoder=encoder)
        watcher.start()
        searchable = Searchable(settings, encoder, folder)
        try:
            while not watcher.idle:
                time.sleep(0.05)
            log.info("observers: %s; idle phase", [type(o).__name__ for o in watcher.observers])
            idle = percentiles(idle_phase(folder, photos[: args.idle], searchable, args.timeout))
            log.info("idle: %s; burst phase", idle)
            burst = burst_phase(folder, photos[args.idle :], searchable, watcher, args.timeout)
            log.info("burst: %s", burst)
            intake = intake_phase(Path(scratch) / "intake", args.intake, settings) if args.intake else None
            log.info("intake: %s", intake)
        finally:
            searchable.close()
            watcher.stop()
        if watcher.error:
            raise watcher.error
    store = store_save_seconds(args.store_size, args.store_dim) if args.store_size else None
    import torch

    report = {
        "timestamp": started_at.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "encoder": encoder.model_id, "device": encoder.device,
        "observer": "polling" if args.polling else "native",
        "settle_s": settings.watch_settle_seconds, "poll_s": settings.watch_poll_seconds,
        "batch_size": settings.batch_size, "workers": settings.resolved_workers,
        "idle": idle, "burst": burst, "intake": intake, "store_save": store, "argv": sys.argv[1:],
    }
    log.info("written to %s", save_report("watch_latency", report, started_at, args.out))


if __name__ == "__main__":
    main()
