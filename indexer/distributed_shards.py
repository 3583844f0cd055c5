"""Shards of a distributed indexing run: the plan's fixed slices, embedded by one rank each and saved atomically.

A shard file holds, for each file of its slice in plan order, what the single-process indexer's per-file work
found (embedded, unchanged, maybe moved, failed) and the vectors of the embedded ones. Files are written under a
temporary name and renamed, so a file that exists is complete: a rank that dies and restarts, or a rerun after a
crash, skips it. Only rank 0 turns shards into catalog rows (see clipsearch.indexer.distributed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from clipsearch.config import Settings
from clipsearch.encoders import Encoder
from clipsearch.errors import ClipsearchError, LibraryError
from clipsearch.images import ImageInfo
from clipsearch.indexer.prepare import Candidate, Failed, MaybeMoved, Prepared, Unchanged, prepare

log = logging.getLogger(__name__)

SHARD_FORMAT = "clipsearch-embedding-shard/1"
DEFAULT_SHARD_SIZE = 1000
RUNS_FOLDER = "distributed"

EMBEDDED, UNCHANGED, MOVED, FAILED = "embedded", "unchanged", "moved", "failed"


class DistributedIndexError(ClipsearchError):
    """A distributed indexing run cannot start or cannot finish (finished shards are kept for the rerun)."""


@dataclass
class Plan:
    """What rank 0 decided to index, broadcast to every rank: the candidates cut into fixed shards."""

    run_id: str
    model: str
    pretrained: str
    model_id: str
    candidates: list[Candidate]
    shard_size: int
    gone_by_hash: dict[str, list[int]]  # rows whose files are gone, by content hash: a file with that hash is a move
    pending: list[int] = field(default_factory=list)  # shards without a finished file when the run started

    @property
    def shard_count(self) -> int:
        """Number of shards the candidates are cut into."""
        return -(-len(self.candidates) // self.shard_size)

    def shard(self, index: int) -> list[Candidate]:
        """The candidates of one shard, in plan order."""
        return self.candidates[index * self.shard_size : (index + 1) * self.shard_size]

    def assigned(self, rank: int, world_size: int) -> list[int]:
        """The pending shards one rank embeds: round-robin, so a rerun spreads what is left over every rank."""
        return self.pending[rank::world_size]


@dataclass
class ShardRecord:
    """One file's outcome in a shard."""

    path: str
    kind: str  # EMBEDDED, UNCHANGED, MOVED or FAILED
    content_hash: str | None
    reason: str | None = None
    info: ImageInfo | None = None
    decode_seconds: float = 0.0

    def to_json(self) -> list:
        info = self.info
        return [self.path, self.kind, self.content_hash, self.reason,
                *((info.width, info.height, info.format, info.taken_at.isoformat() if info.taken_at else None,
                   info.orientation) if info else (None,) * 5),
                round(self.decode_seconds, 6)]

    @classmethod
    def from_json(cls, item: list) -> "ShardRecord":
        path, kind, digest, reason, width, height, fmt, taken_at, orientation, decode_seconds = item
        info = None
        if kind == EMBEDDED:
            info = ImageInfo(width, height, fmt, datetime.fromisoformat(taken_at) if taken_at else None, orientation)
        return cls(path, kind, digest, reason, info, decode_seconds)


@dataclass
class Shard:
    """A finished shard: one record per candidate, and the vectors of the embedded ones in record order."""

    index: int
    records: list[ShardRecord]
    vectors: np.ndarray
    encode_seconds: float = 0.0


@dataclass
class WorkStats:
    """What one rank did: shards written, files embedded, time spent (gathered by rank 0 for its report)."""

    rank: int = 0
    shards: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    embedded: int = 0
    encode_seconds: float = 0.0
    seconds: float = 0.0
    error: str | None = None


def run_id_for(candidates: Sequence[Candidate], model_id: str, shard_size: int, max_image_pixels: int) -> str:
    """A name for the run derived from the plan, so a rerun of the same plan finds the shards already done."""
    # Everything that changes what a shard holds goes in; the gone rows do not, because the merge checks moves
    # again against the catalog (a stale "maybe moved" flag costs an embedding, never a wrong row).
    digest = hashlib.blake2b(digest_size=10)
    digest.update(json.dumps([SHARD_FORMAT, model_id, shard_size, max_image_pixels]).encode())
    for c in candidates:
        digest.update(json.dumps([c.path, c.root, c.size, c.mtime_ns, c.existing_id, c.existing_hash,
                                  c.existing_has_vector, c.allow_move]).encode())
    return digest.hexdigest()


def run_folder(data_dir: Path, run_id: str) -> Path:
    """Where one run's shard files live: DATA_DIR/distributed/RUN_ID."""
    return Path(data_dir) / RUNS_FOLDER / run_id


def shard_path(folder: Path, index: int) -> Path:
    """The file of one shard."""
    return folder / f"shard-{index:05d}.safetensors"


def write_shard(folder: Path, run_id: str, model_id: str, shard: Shard) -> Path:
    """Save a shard atomically (temporary file, fsync, rename): a shard file that exists is complete."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = shard_path(folder, shard.index)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    metadata = {
        "format": SHARD_FORMAT, "run_id": run_id, "shard": str(shard.index), "model_id": model_id,
        "encode_seconds": repr(shard.encode_seconds), "records": json.dumps([r.to_json() for r in shard.records]),
    }
    try:
        save_file({"vectors": np.ascontiguousarray(shard.vectors, dtype=np.float32)}, str(temporary), metadata=metadata)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise LibraryError(f"cannot write the embedding shard {final}: {e}",
                           "check the free space and permissions of --data-dir; finished shards are kept") from e
    return final


def _header(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as handle:
            return handle.metadata() or {}
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged file is redone, not trusted
        log.warning("ignoring the unreadable shard file %s (%s): it is embedded again", path, e)
        return None


def is_finished(folder: Path, run_id: str, index: int) -> bool:
    """Whether this run's shard has a complete file (so nobody embeds it again)."""
    header = _header(shard_path(folder, index))
    return bool(header) and header.get("run_id") == run_id and header.get("shard") == str(index)


def read_shard(folder: Path, plan: Plan, index: int, dim: int) -> Shard:
    """Load a finished shard and check it is the plan's (same run, same files, one vector per embedded file)."""
    from safetensors import safe_open

    path = shard_path(folder, index)
    redo = f"delete {path} and run the same command again: that shard alone is embedded again"
    try:
        with safe_open(str(path), "np") as handle:
            header = handle.metadata() or {}
            vectors = handle.get_tensor("vectors")
        records = [ShardRecord.from_json(item) for item in json.loads(header["records"])]
    except FileNotFoundError as e:
        raise DistributedIndexError(
            f"the embedding shard {path} is missing on rank 0",
            "every rank must see the same --data-dir: put the library on a file system all nodes share",
        ) from e
    except Exception as e:
        raise DistributedIndexError(f"the embedding shard {path} cannot be read ({e})", redo) from e
    expected = [c.path for c in plan.shard(index)]
    embedded = sum(r.kind == EMBEDDED for r in records)
    if (header.get("run_id") != plan.run_id or header.get("model_id") != plan.model_id
            or [r.path for r in records] != expected or vectors.shape != (embedded, dim)):
        raise DistributedIndexError(f"the embedding shard {path} does not belong to this run", redo)
    return Shard(index, records, vectors, float(header.get("encode_seconds", "0")))


class _ShardBuilder:
    """Collects one shard's outcomes in plan order and embeds its decoded images batch by batch."""

    def __init__(self, index: int, size: int, encoder: Encoder):
        self.index = index
        self.size = size
        self.encoder = encoder
        self.records: list[ShardRecord] = []
        self.inputs: list = []
        self.vectors: list[np.ndarray] = []
        self.encode_seconds = 0.0

    @property
    def complete(self) -> bool:
        return len(self.records) == self.size

    def add(self, outcome: Prepared | Unchanged | MaybeMoved | Failed) -> None:
        path = outcome.candidate.path
        if isinstance(outcome, Prepared):
            self.records.append(ShardRecord(path, EMBEDDED, outcome.content_hash, info=outcome.info,
                                            decode_seconds=outcome.decode_seconds))
            self.inputs.append(outcome.model_input)
        elif isinstance(outcome, Unchanged):
            self.records.append(ShardRecord(path, UNCHANGED, outcome.content_hash))
        elif isinstance(outcome, MaybeMoved):  # rank 0 decides at the merge: keep the old row, or embed it there
            self.records.append(ShardRecord(path, MOVED, outcome.content_hash))
        else:
            self.records.append(ShardRecord(path, FAILED, outcome.content_hash, reason=outcome.reason))

    def encode(self) -> None:
        if not self.inputs:
            return
        started = time.perf_counter()
        vectors = self.encoder.encode_images(self.inputs)
        self.encode_seconds += time.perf_counter() - started
        if vectors.shape != (len(self.inputs), self.encoder.dim):
            raise LibraryError(f"encoder returned vectors of shape {vectors.shape}", "this is a bug: please report it")
        self.vectors.append(np.asarray(vectors, dtype=np.float32))
        self.inputs = []

    def finish(self) -> Shard:
        self.encode()
        vectors = np.concatenate(self.vectors) if self.vectors else np.zeros((0, self.encoder.dim), np.float32)
        return Shard(self.index, self.records, vectors, self.encode_seconds)


def embed_shards(
    plan: Plan,
    shards: Sequence[int],
    encoder: Encoder,
    settings: Settings,
    folder: Path,
    on_file: Callable[[], None] | None = None,
) -> WorkStats:
    """Decode (in threads) and embed (in batches) the given shards, writing each one's file as soon as it is done."""
    stats = WorkStats()
    started = time.perf_counter()
    todo = []
    for index in shards:
        if is_finished(folder, plan.run_id, index):  # this rank died after writing it: never redo a finished shard
            stats.skipped.append(index)
        else:
            todo.append(index)
    if not todo:
        return stats

    def find_moved(digest: str, _candidate: Candidate) -> list[int]:
        # Only flags the file: the merge re-checks against the catalog and claims the row (rank 0 alone writes).
        return plan.gone_by_hash.get(digest, [])

    workers = settings.resolved_workers
    window = max(2 * settings.batch_size, 4 * workers)  # decoded images held at once, as in the single-process run
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipsearch-decode")
    pending: deque[tuple[int, Future]] = deque()
    files: Iterator[tuple[int, Candidate]] = ((index, c) for index in todo for c in plan.shard(index))
    builder: _ShardBuilder | None = None
    try:
        while True:
            # One window across shard boundaries keeps the decoders busy while a finished shard is written.
            while len(pending) < window and (item := next(files, None)) is not None:
                index, candidate = item
                pending.append((index, pool.submit(
                    prepare, candidate, encoder.preprocess, image_size=encoder.image_size,
                    max_pixels=settings.max_image_pixels, find_moved=find_moved,
                )))
            if not pending:
                break
            index, future = pending.popleft()
            if builder is None:
                builder = _ShardBuilder(index, len(plan.shard(index)), encoder)
            builder.add(future.result())
            if on_file is not None:
                on_file()
            if len(builder.inputs) >= settings.batch_size:
                builder.encode()
            if builder.complete:
                shard = builder.finish()
                write_shard(folder, plan.run_id, plan.model_id, shard)
                stats.shards.append(index)
                stats.embedded += len(shard.vectors)
                stats.encode_seconds += shard.encode_seconds
                log.debug("shard %d written (%d files, %d embedded)", index, len(shard.records), len(shard.vectors))
                builder = None
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    stats.seconds = time.perf_counter() - started
    return stats
