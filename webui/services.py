"""Per-app services of the web UI: the library, its searcher, image renditions and recent uploads."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flask import current_app

from clipsearch.config import Settings
from clipsearch.encoders import Encoder
from clipsearch.library import Library
from clipsearch.search.label_sets import label_sets
from clipsearch.search.searcher import Searcher
from clipsearch.webui.thumbnails import RenditionCache

log = logging.getLogger(__name__)

EXTENSION_KEY = "clipsearch"
UPLOADS_KEPT = 64  # query vectors of recent uploads, so their result pages can be paged and reloaded


class UploadedQueries:
    """Embeddings of recently uploaded query images, by a key derived from their bytes (the images are not kept).

    With a folder, the vectors (never the images) are also kept there, the latest `capacity` of them, so that
    every process of a multi-process server can page the results of an upload another one embedded.
    """

    def __init__(self, capacity: int = UPLOADS_KEPT, folder: Path | None = None):
        self.capacity = capacity
        self.folder = folder
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key_of(data: bytes) -> str:
        """The key an upload is known by (a hash of its bytes: the same image gets the same key)."""
        return hashlib.blake2b(data, digest_size=12).hexdigest()

    def put(self, key: str, vector: np.ndarray) -> None:
        """Remember an upload's vector, forgetting the oldest beyond capacity."""
        self._remember(key, vector)
        if self.folder is not None:
            self._share(key, vector)

    def get(self, key: str) -> np.ndarray | None:
        """The vector of an upload, or None when it was never seen or has been forgotten."""
        with self._lock:
            vector = self._vectors.get(key)
            if vector is not None:
                self._vectors.move_to_end(key)
                return vector
        if self.folder is None:
            return None
        try:
            vector = np.load(self.folder / f"{key}.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        self._remember(key, vector)
        return vector

    def _remember(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._vectors[key] = vector
            self._vectors.move_to_end(key)
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)

    def _share(self, key: str, vector: np.ndarray) -> None:
        """Write the vector for the other processes (whole, by rename), and drop the oldest beyond capacity."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as out:
                    np.save(out, np.asarray(vector, dtype=np.float32), allow_pickle=False)
                os.replace(tmp, self.folder / f"{key}.npy")
            finally:
                Path(tmp).unlink(missing_ok=True)
            kept = sorted(self.folder.glob("*.npy"), key=_mtime, reverse=True)
            for old in kept[self.capacity :]:
                old.unlink(missing_ok=True)
        except OSError as e:  # this process still has it; another one asks for the upload again
            log.warning("cannot share the upload's vector in %s: %s", self.folder, e)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed by another process meanwhile
        return 0.0


@dataclass
class Services:
    """Everything one app instance shares between requests."""

    settings: Settings
    library: Library
    searcher: Searcher
    renditions: RenditionCache
    uploads: UploadedQueries

    def __post_init__(self) -> None:
        self._filter_cache: tuple[int, dict[str, Any]] | None = None
        self._filter_lock = threading.Lock()

    @classmethod
    def create(cls, settings: Settings, encoder: Encoder | None = None) -> "Services":
        """Services for the settings' library (the encoder loads on first use unless one is given)."""
        library = Library(settings)
        renditions = RenditionCache(settings.data_dir / "renditions", settings.max_image_pixels)
        return cls(settings, library, Searcher(library, encoder, background_rebuild=True, hide_vanished=True,
                                                 runtime=settings.runtime), renditions, UploadedQueries())

    def filter_options(self) -> dict[str, Any]:
        """Folders, formats and date range the filters offer, recomputed only when the catalog changed."""
        if not self.library.exists:
            return {"folders": [], "formats": {}, "date_range": None, "labels": []}
        catalog = self.library.catalog
        version = catalog.version()  # moves and renames change folders without changing any vector
        with self._filter_lock:
            cached = self._filter_cache
            if cached is not None and cached[0] == version:
                return cached[1]
            dates = catalog.date_range()
            options = {
                "folders": catalog.folders(depth=1),
                "formats": catalog.formats(),
                "date_range": (dates[0].date().isoformat(), dates[1].date().isoformat()) if dates else None,
                # Labels some photo holds, as SET/LABEL with counts, grouped by set.
                "labels": [{"set": label_set.name,
                            "labels": [[f"{label_set.name}/{label.name}", label.name, label.count]
                                       for label in label_set.labels if label.count]}
                           for label_set in label_sets(catalog) if any(label.count for label in label_set.labels)],
            }
            self._filter_cache = (version, options)
            return options

    def close(self) -> None:
        """Release the catalog connections."""
        self.library.close()


def services() -> Services:
    """The current app's services."""
    return current_app.extensions[EXTENSION_KEY]
