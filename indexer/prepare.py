"""Per-file work done in decoding threads: read, hash, recognise moves, decode and preprocess."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from clipsearch.errors import ImageDecodeError
from clipsearch.images import ImageInfo, open_image, read_image_bytes, read_jpeg_header

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A file the indexer must look at: new, changed, or lacking a vector for the current model."""

    path: str
    root: str
    size: int
    mtime_ns: int
    existing_id: int | None = None
    existing_hash: str | None = None
    existing_has_vector: bool = False
    allow_move: bool = True


@dataclass
class Prepared:
    """A decoded image ready for the model (model_input), or awaiting preprocessing by a model still loading (image)."""

    candidate: Candidate
    content_hash: str
    info: ImageInfo
    model_input: Any
    decode_seconds: float
    target_size: int | None = None  # the model side it was decoded for (JPEG draft and reduce stay above it)
    image: Any = None  # the decoded PIL image while model_input is None
    jpeg: bytes | None = None  # a JPEG's bytes, left for the model's device to decode (model_input None)


@dataclass
class Unchanged:
    """The file's bytes are those already embedded (only its mtime moved): just refresh the stat fields."""

    candidate: Candidate
    content_hash: str


@dataclass
class MaybeMoved:
    """The file's content matches catalog rows whose files are gone: it can keep one of their vectors."""

    candidate: Candidate
    content_hash: str
    row_ids: list[int]


@dataclass
class Failed:
    """The file cannot be indexed, with a short reason."""

    candidate: Candidate
    reason: str
    content_hash: str | None = None


def content_hash(data: bytes) -> str:
    """A 128-bit BLAKE2b digest of a file's bytes (identifies moved and renamed files)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def prepare(
    candidate: Candidate,
    preprocess: Callable | None,
    *,
    image_size: int,
    max_pixels: int,
    find_moved: Callable[[str, Candidate], list[int]] | None,
    jpeg_on_device: bool = False,
) -> Prepared | Unchanged | MaybeMoved | Failed:
    """Turn one file into model input (preprocess None: a decoded image), or say why not (never raises for a bad file).

    jpeg_on_device: a plain JPEG is only parsed (header, EXIF) and keeps its bytes, for the model's device to decode.
    """
    started = time.perf_counter()
    try:
        data = read_image_bytes(candidate.path)
    except ImageDecodeError as e:
        return Failed(candidate, e.reason)
    digest = content_hash(data)
    if candidate.existing_has_vector and digest == candidate.existing_hash:
        return Unchanged(candidate, digest)
    if find_moved is not None and candidate.allow_move:
        row_ids = find_moved(digest, candidate)
        if row_ids:
            return MaybeMoved(candidate, digest, row_ids)
    if jpeg_on_device:
        info = read_jpeg_header(data, max_pixels)
        if info is not None:
            return Prepared(candidate, digest, info, None, time.perf_counter() - started, image_size, jpeg=data)
    return _decoded(candidate, digest, data, preprocess, image_size, max_pixels, started)


def _decoded(candidate: Candidate, digest: str, data: bytes, preprocess: Callable | None, image_size: int,
             max_pixels: int, started: float) -> Prepared | Failed:
    """Decode a file's bytes with Pillow and preprocess them (preprocess None: keep the decoded image)."""
    try:
        image, info = open_image(data, max_pixels=max_pixels, target_size=image_size)
        model_input = preprocess(image) if preprocess is not None else None
    except ImageDecodeError as e:
        return Failed(candidate, e.reason, digest)
    except Exception as e:  # a preprocessing bug must cost one file, not the run
        return _preprocessing_failed(candidate, e, digest)
    return Prepared(candidate, digest, info, model_input, time.perf_counter() - started, image_size,
                    image if preprocess is None else None)


def preprocess_decoded(item: Prepared, preprocess: Callable) -> Prepared | Failed:
    """Preprocess a photo prepare() decoded without a preprocess (the model was still loading)."""
    try:
        item.model_input, item.image = preprocess(item.image), None
    except Exception as e:  # as in _decoded()
        return _preprocessing_failed(item.candidate, e, item.content_hash)
    return item


def decode_on_device(items: list[Prepared], encoder: Any, max_pixels: int) -> list[Prepared | Failed]:
    """Decode on the model's device the JPEGs prepare() left as bytes, in one call; Pillow for any it cannot."""
    if not items:
        return []
    try:
        inputs = encoder.decode_jpegs([item.jpeg for item in items], [item.info.orientation for item in items])
    except Exception as e:  # noqa: BLE001 - out of GPU memory, a driver error: this batch goes through Pillow
        log.warning("decoding %d JPEGs on %s failed (%s: %s); decoding them with Pillow", len(items),
                    getattr(encoder, "device", "the model's device"), type(e).__name__, e)
        inputs = [None] * len(items)
    out: list[Prepared | Failed] = []
    for item, model_input in zip(items, inputs):
        if model_input is None:  # from the bytes in hand: the file is not read again
            out.append(_decoded(item.candidate, item.content_hash, item.jpeg, encoder.preprocess, encoder.image_size,
                                max_pixels, time.perf_counter() - item.decode_seconds))
        else:
            item.model_input, item.jpeg = model_input, None
            out.append(item)
    return out


def _preprocessing_failed(candidate: Candidate, error: Exception, digest: str) -> Failed:
    return Failed(candidate, f"preprocessing failed: {type(error).__name__}: {error}", digest)


def file_still_exists(path: str) -> bool:
    """Whether a path is still on disk (a row whose file vanished may be a move source)."""
    return os.path.exists(path)
