"""The vector store's files: header reading, the save lock, which saved file wins, shard file bookkeeping."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from clipsearch import ann_disk
from clipsearch.catalog import Catalog

MAGIC = b"CLIPSEARCH-FAISS\x01"
HEADER_LENGTH_BYTES = 8
ORPHAN_SECONDS = 86_400  # shard files no store file names, left by a crashed build, are removed after a day


class StoreFileError(Exception):
    """The store file is missing, damaged or of another format (the caller rebuilds it)."""


class MissingShardError(StoreFileError):
    """The store file names shard files that are not there."""


def missing_shards(folder: Path, header: dict) -> list[str]:
    return ann_disk.missing_files(folder, [*header["shards"], header["ids_file"]])


def read_header(path: Path) -> dict | None:
    """The JSON header of a store file (without reading its payload), or None if unreadable."""
    try:
        with open(path, "rb") as data:
            start = data.read(len(MAGIC) + HEADER_LENGTH_BYTES)
            if not start.startswith(MAGIC):
                return None
            return json.loads(data.read(int.from_bytes(start[len(MAGIC) :], "little")))
    except (OSError, ValueError):
        return None


@contextmanager
def save_lock(path: Path) -> Iterator[None]:
    """Hold `<store file>.lock` exclusively while saving (no lock on systems without flock: the rename stays atomic)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def newer_saved_generation(path: Path, model_id: str, generation: int, catalog: Catalog | None) -> int | None:
    """The generation of a saved file of this model newer than `generation` that the catalog can catch up from."""
    header = read_header(path) if catalog is not None else None
    try:
        saved = int(header["generation"]) if isinstance(header, dict) and header.get("model_id") == model_id else None
    except (KeyError, TypeError, ValueError):
        return None
    if saved is None or saved <= generation:
        return None
    # A file stamped past the catalog (a catalog restored from a backup) or before its pruned log is useless to readers.
    floor, newest = catalog.log_state()
    return saved if floor <= saved <= newest else None


def remove_unused_shards(folder: Path, header: dict, replaced: dict | None) -> None:
    """Delete the shard files of the header a save replaced that the saved one does not name (and old orphans)."""
    ann_disk.remove_unused_files(folder, shard_files(header), shard_files(replaced), ORPHAN_SECONDS)


def shard_files(header: dict | None) -> set[str]:
    return set(header.get("shards", [])) | {header.get("ids_file")} if header else set()
