"""Scoped runs: the files on disk and the catalog rows that a set of changed paths (files or folders) covers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from sqlalchemy import select

from clipsearch.catalog import STATUS_FAILED, Catalog, EmbeddingRow, ImageRow, KnownImage
from clipsearch.indexer.walk import FoundFile, image_at, is_hidden_below, is_under, walk_images


@dataclass(frozen=True)
class Changes:
    """What a watcher saw change: paths to compare with the catalog again, and what it knows about them."""

    paths: tuple[str, ...]  # files or folders, existing or not, under the library roots
    defer: tuple[str, ...] = ()  # still being written: neither indexed nor removed this time
    moves: tuple[tuple[str, str], ...] = ()  # (from, to) renames the file system reported


def ancestors(path: str) -> Iterator[str]:
    """The folders containing path, innermost first."""
    parent = os.path.dirname(path)
    while parent != path:
        yield parent
        path, parent = parent, os.path.dirname(parent)


def coalesce(paths: Iterable[str]) -> list[str]:
    """The paths minus those inside another of them (a changed folder covers everything under it), sorted."""
    unique = set(paths)
    return sorted(p for p in unique if not any(a in unique for a in ancestors(p)))


def root_of(path: str, roots: Sequence[str]) -> str | None:
    """The innermost root that path lies under, or None."""
    inside = [root for root in roots if is_under(path, root)]
    return max(inside, key=len) if inside else None


def files_in_scopes(
    changes: Changes,
    roots: Sequence[str],
    *,
    include_hidden: bool,
    follow_symlinks: bool,
    exclude: str,
    on_error: Callable[[str, str], None],
) -> tuple[list[str], dict[str, tuple[str, FoundFile]]]:
    """(scopes, {path: (root, file)}): the changed paths under walkable roots and the image files now in them."""
    scopes: list[str] = []
    found: dict[str, tuple[str, FoundFile]] = {}
    excluded = os.path.realpath(exclude)
    for path in coalesce(changes.paths):
        root = root_of(path, roots)
        if root is None:  # outside every root, or under a missing one (unmounted): look at nothing, remove nothing
            continue
        scopes.append(path)
        if not include_hidden and is_hidden_below(path, root):
            continue
        if os.path.isdir(path) and (follow_symlinks or not os.path.islink(path)):
            items: Iterable[FoundFile] = walk_images(path, include_hidden=include_hidden, follow_symlinks=follow_symlinks,
                                                     exclude=[exclude], on_error=on_error)
        else:
            item = image_at(path, follow_symlinks=follow_symlinks, on_error=on_error)
            items = [item] if item is not None and not is_under(os.path.realpath(path), excluded) else []
        for item in items:
            found.setdefault(item.path, (root, item))
    if changes.defer:
        deferred = set(changes.defer)
        found = {p: v for p, v in found.items() if not _deferred(p, deferred)}
    return scopes, found


def rows_in_scopes(catalog: Catalog, scopes: Sequence[str], defer: Sequence[str] = ()) -> dict[str, KnownImage]:
    """Catalog rows at or under each scope (a scope may have been a file or a folder), keyed by path."""
    known = catalog.known_under(scopes)
    with catalog.read() as session:
        for start in range(0, len(scopes), 500):
            query = select(
                ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns, ImageRow.content_hash, ImageRow.status,
                EmbeddingRow.model,
            ).outerjoin(EmbeddingRow, EmbeddingRow.image_id == ImageRow.id).where(ImageRow.path.in_(scopes[start : start + 500]))
            for row in session.execute(query):
                known[row.path] = KnownImage(*row)
    if defer:
        deferred = set(defer)
        known = {p: row for p, row in known.items() if not _deferred(p, deferred)}
    return known


def hinted_moves(
    moves: Sequence[tuple[str, str]],
    found: dict[str, tuple[str, FoundFile]],
    gone: dict[str, KnownImage],
    model_id: str,
) -> dict[str, KnownImage]:
    """{new path: row} for files a reported rename explains: the old path's row, same size and time (nothing to read)."""
    if not moves:
        return {}
    source_of = {dest: src for src, dest in moves}
    matched: dict[str, KnownImage] = {}
    taken: set[int] = set()
    for path, (_, item) in found.items():
        for folder in (path, *ancestors(path)):
            src = source_of.get(folder)
            if src is None:
                continue
            row = gone.get(src + path[len(folder) :])
            if (row is not None and row.id not in taken and row.size == item.size and row.mtime_ns == item.mtime_ns
                    and (row.model == model_id or row.status == STATUS_FAILED)):
                matched[path] = row
                taken.add(row.id)
                break
    return matched


def _deferred(path: str, deferred: set[str]) -> bool:
    return path in deferred or any(a in deferred for a in ancestors(path))
