"""Filesystem walk: image files under a folder, skipping hidden and excluded folders, surviving symlink loops."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from clipsearch.images import SUPPORTED_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundFile:
    """An image file seen on disk, with the stat fields that tell whether it changed."""

    path: str
    size: int
    mtime_ns: int


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the supported image extensions."""
    return os.path.splitext(name)[1].lower() in SUPPORTED_EXTENSIONS


def walk_images(
    root: str | os.PathLike,
    *,
    include_hidden: bool = False,
    follow_symlinks: bool = True,
    exclude: Iterable[str | os.PathLike] = (),
    on_error: Callable[[str, str], None] | None = None,
) -> Iterator[FoundFile]:
    """Yield image files under root, depth first, each real folder visited once (so symlink loops end)."""
    excluded = {os.path.realpath(p) for p in exclude}
    seen_dirs: set[tuple[int, int]] = set()
    stack = [os.path.abspath(root)]
    while stack:
        folder = stack.pop()
        try:
            folder_stat = os.stat(folder)
        except OSError as e:
            _report(on_error, folder, e)
            continue
        key = (folder_stat.st_dev, folder_stat.st_ino)
        if key in seen_dirs or os.path.realpath(folder) in excluded:
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(folder) as entries:
                children = sorted(entries, key=lambda e: e.name)
        except OSError as e:
            _report(on_error, folder, e)
            continue
        subfolders = []
        for entry in children:
            if not include_hidden and entry.name.startswith("."):
                continue
            if not _is_utf8(entry.path):
                _report_undecodable(on_error, entry.path)
                continue
            try:
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    subfolders.append(entry.path)
                    continue
                if not is_image_name(entry.name) or not entry.is_file(follow_symlinks=follow_symlinks):
                    continue
                info = entry.stat(follow_symlinks=follow_symlinks)
            except OSError as e:  # vanished between listing and stat, or a dangling link
                _report(on_error, entry.path, e)
                continue
            yield FoundFile(entry.path, info.st_size, info.st_mtime_ns)
        stack.extend(reversed(subfolders))


def image_at(path: str, *, follow_symlinks: bool = True,
             on_error: Callable[[str, str], None] | None = None) -> FoundFile | None:
    """The image file at path as walk_images would yield it, or None (gone, not an image, not a plain file)."""
    if not is_image_name(os.path.basename(path)):
        return None
    if not _is_utf8(path):
        _report_undecodable(on_error, path)
        return None
    try:
        found = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return None
    except OSError as e:
        _report(on_error, path, e)
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return FoundFile(path, found.st_size, found.st_mtime_ns)


def is_under(path: str, folder: str) -> bool:
    """Whether path is folder itself or lies below it (both normalised, absolute)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_hidden_below(path: str, root: str) -> bool:
    """Whether a file or folder name below root (root's own name aside) on the way to path starts with a dot."""
    if not is_under(path, root) or path == root:
        return False
    return any(part.startswith(".") for part in path[len(root.rstrip(os.sep)) + 1 :].split(os.sep))


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates (PEP 383)
        return False


def _report_undecodable(on_error: Callable[[str, str], None] | None, path: str) -> None:
    # SQLite stores text as UTF-8: such a name cannot be catalogued, so say how to fix it.
    _report(on_error, os.fsencode(path).decode("utf-8", "replace"),
            OSError("file name is not valid UTF-8; rename it to index it"))


def _report(on_error: Callable[[str, str], None] | None, path: str, error: OSError) -> None:
    reason = error.strerror or str(error)
    log.debug("cannot read %s: %s", path, reason)
    if on_error is not None:
        on_error(path, reason)


def normalise_root(path: str | os.PathLike) -> str:
    """An absolute, user-expanded folder path without a trailing slash (symlinks kept as the user named them)."""
    return os.path.normpath(os.path.abspath(Path(path).expanduser()))
