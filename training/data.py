"""Training data: open any supported source as a TrainData that yields deterministic, resumable, rank-sliced batches.

Sources (DataSpec.kind, or "auto" to detect): a CSV/TSV of (image path, caption) rows; a folder of images with
same-stem .txt captions; class folders or a `relative_path,label` CSV (captions made from prompt templates); and
WebDataset tar shards, plain or gzipped (see data_shards.py for how they are indexed and cached).

Order and determinism: epoch e visits the samples in the permutation drawn from (seed, e); global batch b is
positions [b*G, (b+1)*G) of it (drop_last), and rank r of W gets rows [r*G/W, (r+1)*G/W) of that batch, so any
world size sees exactly the single-process global batch. Captions (one of several, or a template for class data)
and random augmentation are seeded per (seed, epoch, sample), independent of workers, ranks and resume point:
`start_batch` skips earlier batches by arithmetic, without decoding them. A sample that fails to load is replaced
by the next loadable one in the epoch order and counted in `failures`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clipsearch.errors import ClipsearchError, ConfigError, ImageDecodeError
from clipsearch.images import open_image
from clipsearch.search.evaluation import DEFAULT_MAX_PIXELS, balanced_subset, read_classes
from clipsearch.search.zeroshot import DEFAULT_TEMPLATES
from clipsearch.training import data_shards, data_sources
from clipsearch.training.data_eval import EvalSets, eval_sets_from
from clipsearch.training.data_sources import SampleError

__all__ = ["DataSpec", "EvalSets", "KINDS", "TrainData", "TrainingDataError", "eval_sets_from", "open_train_data"]

log = logging.getLogger(__name__)

KINDS = ("auto", "csv", "captions-folder", "class-folders", "labels-csv", "webdataset")
MAX_FAILURE_EXAMPLES = 20
_SALT_CAPTION, _SALT_AUGMENT = 1, 2


class TrainingDataError(ClipsearchError):
    """The training data cannot produce batches (e.g. not one sample loads)."""


@dataclass(frozen=True)
class DataSpec:
    """One training (or eval) data source; see the module docstring for the kinds."""

    path: str  # CSV/TSV file, folder, or shards ("…/train-{0000..0004}.tar.gz", a glob, a::b, or a folder of shards)
    kind: str = "auto"  # auto|csv|captions-folder|class-folders|labels-csv|webdataset
    image_column: str = data_sources.DEFAULT_IMAGE_COLUMN
    caption_column: str = data_sources.DEFAULT_CAPTION_COLUMN
    separator: str | None = None  # None: tab for .tsv or a tabbed header, else comma
    classes_file: str | None = None  # class names for .cls / labels CSV (webdataset default: classes.txt beside shards)
    templates: tuple[str, ...] | None = None  # caption templates for class data; None -> zeroshot.DEFAULT_TEMPLATES


def _mix(*numbers: int) -> int:
    """A 63-bit hash of integers: stable across processes and Python versions (unlike hash())."""
    packed = struct.pack(f"<{len(numbers)}q", *numbers)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def _seeded(seed: int):
    """Run augmentation under its own seed without disturbing the caller's torch or Python RNG streams."""
    generator = torch.default_generator  # CPU only: torch.manual_seed would also (slowly) seed every accelerator
    torch_state, python_state = generator.get_state(), random.getstate()
    generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(python_state)


def decode_size(preprocess) -> int | None:
    """The smallest shorter side an image may be reduced to before `preprocess` without losing pixels it uses.

    Resize needs its size; RandomResizedCrop may crop scale*ratio of the area, so it needs size/sqrt(min scale*ratio).
    Decoding JPEGs at that size (draft mode) makes large photos several times cheaper to load.
    """
    needed = []
    for t in getattr(preprocess, "transforms", [preprocess]):
        size = getattr(t, "size", None)
        if size is None:
            continue
        side = max(size) if isinstance(size, (tuple, list)) else int(size)
        scale, ratio = getattr(t, "scale", None), getattr(t, "ratio", None)
        if scale and ratio:
            side = side / math.sqrt(min(scale) * min(min(ratio), 1 / max(ratio)))
        needed.append(math.ceil(side))
    return max(needed) if needed else None


class _Core:
    """Everything a DataLoader worker needs to build one rank's slice of a batch (picklable)."""

    def __init__(self, source, indices: np.ndarray, preprocess, tokenizer, templates: Sequence[str], class_mode: bool,
                 max_pixels: int):
        self.source, self.indices = source, indices
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.templates, self.class_mode, self.max_pixels = list(templates), class_mode, max_pixels
        self.decode_size = decode_size(preprocess)
        self._order: tuple[int, int, np.ndarray] | None = None
        self._bad: dict[int, str] = {}  # per process: a sample that failed once is not decoded again

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_order": None}

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """Source indices in the order epoch `epoch` visits them."""
        if self._order is None or self._order[:2] != (epoch, seed):
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
            self._order = (epoch, seed, self.indices[rng.permutation(len(self.indices))])
        return self._order[2]

    def caption(self, s: int, epoch: int, seed: int) -> str:
        label = int(self.source.labels[s]) if self.class_mode else -1
        choice = _mix(seed, epoch, s, _SALT_CAPTION)
        if label >= 0:
            return self.templates[choice % len(self.templates)].format(self.source.class_names[label])
        options = self.source.captions(s)
        return options[choice % len(options)]

    def load(self, s: int, epoch: int, seed: int) -> tuple[torch.Tensor, str]:
        """One sample as (image tensor, caption); SampleError with a short reason when it cannot be used."""
        if s in self._bad:
            raise SampleError(self._bad[s])
        try:
            caption = self.caption(s, epoch, seed)
            image, _ = open_image(self.source.image(s), max_pixels=self.max_pixels, target_size=self.decode_size)
            with _seeded(_mix(seed, epoch, s, _SALT_AUGMENT)):
                tensor = self.preprocess(image)
        except SampleError as e:
            reason = e.reason
        except ImageDecodeError as e:
            reason = e.reason
        except MemoryError:
            raise
        except Exception as e:  # a transform failing on one odd image must not end the run
            reason = f"cannot preprocess ({type(e).__name__}: {e})"
        else:
            return tensor, caption
        self._bad[s] = reason
        raise SampleError(reason)

    def batch(self, epoch: int, seed: int, b: int, global_batch: int, rank: int, world_size: int):
        """(images, tokens, failures) for rank `rank`'s rows of global batch `b`."""
        order = self.order(epoch, seed)
        n, local = len(order), global_batch // world_size
        start = b * global_batch + rank * local
        images, captions, failures = [], [], []
        for position in range(start, start + local):
            for step in range(n):
                s = int(order[(position + step) % n])
                try:
                    image, caption = self.load(s, epoch, seed)
                    break
                except SampleError as e:
                    if step == 0:  # count the sample this row owns; replacements tried are counted by their own rows
                        failures.append((self.source.sample_id(s), e.reason))
            else:
                raise TrainingDataError(f"none of the {n} training samples loads (first: {failures[:1]})",
                                        "check the data path and the failure reasons")
            images.append(image)
            captions.append(caption)
        return torch.stack(images), self.tokenizer(captions), failures


class _BatchDataset(Dataset):
    """Map-style dataset over (epoch, batch) keys, so persistent workers serve every epoch."""

    def __init__(self, core: _Core, global_batch: int, rank: int, world_size: int, seed: int):
        self.core, self.global_batch, self.rank, self.world_size, self.seed = core, global_batch, rank, world_size, seed

    def __getitem__(self, key: tuple[int, int]):
        epoch, b = key
        return self.core.batch(epoch, self.seed, b, self.global_batch, self.rank, self.world_size)


class _EpochBatches(Sampler):
    """Yields (epoch, batch) keys for the batches still to run; reset before each loader() call."""

    def __init__(self):
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.start, self.stop)])

    def __len__(self) -> int:
        return self.stop - self.start


def _keep(x):
    return x


class TrainData:
    """An opened training source: sizes, class names, and the batch loader (see the module docstring)."""

    def __init__(self, core: _Core, spec: DataSpec, kind: str):
        self._core, self.spec, self.kind = core, spec, kind
        self.num_samples = len(core.indices)
        self.class_names = list(core.source.class_names) if core.source.class_names else None
        self.templates = tuple(core.templates)
        self.class_mode = core.class_mode
        self.incomplete = list(core.source.incomplete)  # samples left out at open (no image, no caption), (id, why)
        self.failures = 0
        self.failure_examples: list[tuple[str, str]] = []
        self._loaders: dict[tuple, tuple[DataLoader, _EpochBatches]] = {}

    def __repr__(self) -> str:
        return f"TrainData({self.kind}, {self.spec.path!r}, {self.num_samples} samples)"

    def batches_per_epoch(self, global_batch: int) -> int:
        """Full global batches per epoch (the last partial batch is dropped)."""
        if global_batch < 1:
            raise ConfigError(f"batch size {global_batch} is below 1", "give a positive batch size")
        return self.num_samples // global_batch

    def _record(self, failures: list[tuple[str, str]]) -> None:
        for sample_id, reason in failures:
            self.failures += 1
            if len(self.failure_examples) < MAX_FAILURE_EXAMPLES:
                self.failure_examples.append((sample_id, reason))
            log.debug("sample %s replaced: %s", sample_id, reason)

    def loader(self, global_batch: int, *, epoch: int, seed: int, start_batch: int = 0, rank: int = 0,
               world_size: int = 1, workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [G/W,3,H,W], tokens [G/W,ctx]) for batches start_batch.. of `epoch`; see the module docstring."""
        n_batches = self.batches_per_epoch(global_batch)
        if world_size < 1 or not 0 <= rank < world_size or global_batch % world_size:
            raise ConfigError(f"global batch {global_batch} cannot be split over {world_size} ranks (rank {rank})",
                              "make the global batch a multiple of the number of processes")
        if n_batches == 0:
            raise ConfigError(f"the global batch {global_batch} exceeds the {self.num_samples} training samples",
                              "use a smaller batch or more data")
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch {start_batch} is outside 0..{n_batches}")
        return self._iterate(global_batch, epoch, seed, start_batch, n_batches, rank, world_size, workers, pin_memory)

    def _iterate(self, global_batch, epoch, seed, start_batch, n_batches, rank, world_size, workers, pin_memory):
        if workers <= 0:
            for b in range(start_batch, n_batches):
                images, tokens, failures = self._core.batch(epoch, seed, b, global_batch, rank, world_size)
                self._record(failures)
                yield images, tokens
            return
        key = (global_batch, seed, rank, world_size, workers, pin_memory)
        if key not in self._loaders:
            sampler = _EpochBatches()
            dataset = _BatchDataset(self._core, global_batch, rank, world_size, seed)
            # Workers live across epochs (the keys carry the epoch), keeping their open shard files and warm decoders.
            self._loaders[key] = (DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                             collate_fn=_keep, pin_memory=pin_memory, persistent_workers=True),
                                  sampler)
        loader, sampler = self._loaders[key]
        sampler.epoch, sampler.start, sampler.stop = epoch, start_batch, n_batches
        for images, tokens, failures in loader:
            self._record(failures)
            yield images, tokens

    def close(self) -> None:
        """Stop persistent loader workers (they also stop when this object is garbage-collected)."""
        self._loaders.clear()

    def split(self, holdout: float | int, seed: int) -> tuple["TrainData", "TrainData"]:
        """(train, held-out) views: `holdout` is a fraction in (0, 1) or a count; class data is held out class-balanced."""
        n = self.num_samples
        count = round(holdout * n) if isinstance(holdout, float) and 0 < holdout < 1 else int(holdout)
        if not 0 < count < n:
            raise ConfigError(f"cannot hold out {holdout} of {n} samples", "give a fraction in (0, 1) or a count below the sample count")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5E1D])))
        shuffled = self._core.indices[rng.permutation(n)]
        if self.class_names and self._core.source.labels is not None:
            picked = shuffled[balanced_subset(self._core.source.labels[shuffled].tolist(), count)]
        else:
            picked = shuffled[:count]
        held = np.sort(picked)
        rest = np.setdiff1d(self._core.indices, held)
        return self._view(rest), self._view(held)

    def _view(self, indices: np.ndarray) -> "TrainData":
        core = self._core
        return TrainData(_Core(core.source, indices, core.preprocess, core.tokenizer, core.templates, core.class_mode,
                               core.max_pixels), self.spec, self.kind)

    @property
    def source(self):
        """The underlying sample source (FileSource or ShardSource)."""
        return self._core.source

    @property
    def indices(self) -> np.ndarray:
        """Source indices of this view's samples (sorted)."""
        return self._core.indices


def _resolve_kind(spec: DataSpec) -> tuple[str, list[Path] | None]:
    if spec.kind not in KINDS:
        raise ConfigError(f"unknown data kind {spec.kind!r}", f"use one of {', '.join(KINDS)}")
    path = Path(os.path.expanduser(spec.path))
    if spec.kind != "auto":
        return spec.kind, None
    if path.is_dir():
        return data_sources.folder_kind(path)
    if path.is_file():
        if data_shards.is_shard_name(path.name):
            return "webdataset", None
        return data_sources.table_kind(path, spec.image_column, spec.caption_column, spec.separator), None
    if data_shards.looks_like_shards(spec.path):
        return "webdataset", None
    raise ConfigError(f"the training data {spec.path} does not exist", "check the data path")


def _open_shards(spec: DataSpec, cache_dir: Path):
    shards = data_shards.expand_shards(spec.path)
    indices = data_shards.index_shards(shards, cache_dir)
    beside = shards[0].parent / "classes.txt"
    classes_file = spec.classes_file or (str(beside) if beside.is_file() else None)
    source = data_shards.ShardSource(indices, read_classes(classes_file) if classes_file else None)
    if source.incomplete:
        log.warning("%d shard sample(s) left out at open, e.g. %s", len(source.incomplete), source.incomplete[0])
    return source


def _shards_are_class_data(source, templates_given: bool) -> bool:
    """Class (template) captions when samples carry .cls and a class list is known, unless their .txt members hold
    real captions rather than the class name (as CIFAR-style shards with both do)."""
    if not source.has_cls:
        return False
    if not source.class_names:
        if (source.text_at[:, 0] >= 0).any():
            log.warning("shards have .cls members but no class list: training on their .txt captions "
                        "(put classes.txt beside the shards or set classes_file to use class templates)")
            return False
        raise ConfigError("the shards have .cls class indices but no class names",
                          "put classes.txt (one class name a line) beside the shards, or set data classes_file")
    if templates_given:
        return True
    both = np.flatnonzero((source.labels >= 0) & (source.text_at[:, 0] >= 0))[:8]
    for i in both:
        try:
            text = source.captions(int(i))[0]
        except SampleError:
            continue
        if text.strip().lower() != source.class_names[source.labels[i]].lower():
            return False
    return True


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    templates = tuple(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(f"caption template {bad[0]!r} has no {{}} for the class name" if bad else "no caption templates",
                          'write templates like "a photo of a {}."')
    return templates


def default_cache_dir() -> Path:
    """The user's cache folder for decompressed shard packs."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("clipsearch", appauthor=False))


def open_train_data(spec: DataSpec, *, preprocess, tokenizer, cache_dir: str | os.PathLike | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> TrainData:
    """Open (and index) a data source; preprocess: PIL -> tensor; tokenizer: list[str] -> LongTensor [n, ctx].

    cache_dir holds decompressed packs of gzipped shards (default: the user cache dir); pass the run's cache folder
    to keep them with the run.
    """
    kind, listing = _resolve_kind(spec)
    templates = _check_templates(spec.templates if spec.templates is not None else DEFAULT_TEMPLATES)
    path = Path(os.path.expanduser(spec.path))
    if kind == "webdataset":
        source = _open_shards(spec, Path(cache_dir) if cache_dir else default_cache_dir())
        class_mode = _shards_are_class_data(source, spec.templates is not None)
    elif kind == "csv":
        source = data_sources.open_caption_table(path, spec.image_column, spec.caption_column, spec.separator)
        class_mode = False
    elif kind == "labels-csv":
        source = data_sources.open_labels_table(path, spec.classes_file)
        class_mode = True
    elif kind == "captions-folder":
        source = data_sources.open_captions_folder(path, listing)
        class_mode = False
    else:
        source = data_sources.open_class_folders(path, spec.classes_file)
        class_mode = True
    if len(source) == 0:
        raise ConfigError(f"the training data {spec.path} holds no usable samples",
                          f"see the warnings above for what was left out ({len(source.incomplete)} samples)")
    core = _Core(source, np.arange(len(source), dtype=np.int64), preprocess, tokenizer, templates, class_mode, max_pixels)
    data = TrainData(core, spec, kind)
    log.info("opened %r: %s captions", data, "template" if class_mode else "own")
    return data
