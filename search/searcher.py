"""Search: embed a text or image query with the library's model and rank the library's images by cosine similarity."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clipsearch.encoders import Encoder, EncoderSpec, load_encoder
from clipsearch.errors import EmptyLibraryError, ImageDecodeError, ModelMismatchError, QueryError
from clipsearch.library import Library

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchHit:
    """One ranked result."""

    id: int
    path: str
    score: float

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"id": self.id, "path": self.path, "score": round(float(self.score), 6)}


class Searcher:
    """Answers queries over one library; keeps the encoder loaded and the vector store current."""

    def __init__(self, library: Library, encoder: Encoder | None = None):
        self.library = library
        self._encoder = encoder
        self._owns_encoder = encoder is None
        self._store = None
        self._lock = threading.Lock()

    @property
    def encoder(self) -> Encoder:
        """The library's model, loaded on first use."""
        if self._encoder is None:
            settings = self.library.settings
            model, pretrained = self.library.resolve_model()
            self._encoder = load_encoder(
                EncoderSpec(model, pretrained, settings.device, settings.precision, settings.model_cache_dir)
            )
        return self._encoder

    def store(self):
        """The vector store, reloaded when another process changed the catalog."""
        with self._lock:
            if not self.library.exists:
                raise self._empty()
            catalog = self.library.catalog
            if self._store is None or self._store.generation < catalog.log_floor():
                self._store = self.library.open_store()
            elif self._store.generation != catalog.generation():
                # Another process indexed: catch up from the change log instead of re-reading the whole file.
                library_model = catalog.library_model()
                if library_model is None or library_model["model_id"] != self._store.model_id:
                    self._store = self.library.open_store()
                else:
                    self._store.sync(catalog)
            if self._store is None or self._store.count == 0:
                raise self._empty()
            self._check_encoder_matches(self._store.model_id)
            return self._store

    def _check_encoder_matches(self, model_id: str) -> None:
        if self._encoder is None or self._encoder.model_id == model_id:
            return
        if self._owns_encoder:  # the library was re-embedded with another model: load that one next
            self._encoder = None
            return
        raise ModelMismatchError(
            f"the library holds vectors from {model_id}, but this searcher's encoder is {self._encoder.model_id}",
            "search with the library's model",
        )

    def _empty(self) -> EmptyLibraryError:
        return EmptyLibraryError(
            f"no images are indexed in the library {self.library.data_dir} yet",
            "index a folder first: clipsearch index ~/Pictures",
        )

    # --- queries --------------------------------------------------------------------------------
    def search_text(self, query: str, k: int) -> list[SearchHit]:
        """Images best matching a natural-language query."""
        if not query or not query.strip():
            raise QueryError("the query is empty", 'type what to look for, e.g. clipsearch search "a dog on the beach"')
        store = self.store()
        vector = self.encoder.encode_texts([query.strip()])[0]
        return self.search_vector(vector, k, store=store)

    def search_image(self, source: str | os.PathLike | bytes, k: int) -> list[SearchHit]:
        """Images most similar to an image file (or its bytes) that need not be in the library."""
        from clipsearch.images import open_image

        store = self.store()
        try:
            image, _ = open_image(source, max_pixels=self.library.settings.max_image_pixels, target_size=self.encoder.image_size)
        except ImageDecodeError as e:
            name = source if not isinstance(source, bytes) else "the uploaded image"
            raise QueryError(f"cannot use {name} as a query: {e.reason}", "pass a readable JPEG, PNG, WebP, HEIC... file") from e
        vector = self.encoder.encode_images([self.encoder.preprocess(image)])[0]
        return self.search_vector(vector, k, store=store)

    def search_like(self, image: int | str | os.PathLike, k: int) -> list[SearchHit]:
        """Images most similar to one already in the library (by id or path), excluding itself."""
        store = self.store()
        image_id = self.resolve_image_id(image)
        # The catalog keeps exact vectors; an approximate index may only hold compressed ones.
        vector = self.library.catalog.vector_of(image_id, store.model_id)
        if vector is None:
            raise QueryError(f"image {image} has no vector (it failed to index)", "run clipsearch status to see why")
        return self.search_vector(vector, k, exclude={image_id}, store=store)

    def resolve_image_id(self, image: int | str | os.PathLike) -> int:
        """Catalog id of an indexed image given its id or path."""
        if isinstance(image, int):
            if not self.library.catalog.images_by_id([image]):
                raise QueryError(f"no image with id {image} in the library", "ids are shown by clipsearch search --json")
            return image
        path = os.path.normpath(os.path.abspath(Path(image).expanduser()))
        row = self.library.catalog.image_by_path(path)
        if row is None:
            raise QueryError(
                f"{path} is not in the library {self.library.data_dir}",
                "index its folder first, or use --image to search with any image file",
            )
        return row.id

    def search_vector(self, vector: np.ndarray, k: int, exclude: Sequence[int] | set[int] = (), store=None) -> list[SearchHit]:
        """Nearest images to an embedding (normalised here), as hits with paths."""
        if k <= 0:
            raise QueryError(f"k must be positive, got {k}", "pass -k 10 for ten results")
        store = store or self.store()
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        norm = float(np.linalg.norm(vector))
        if norm == 0 or not np.isfinite(norm):
            raise QueryError("the query has no direction (zero vector)", "use different query terms")
        scores, ids = store.search(vector / norm, k + len(exclude))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in exclude][:k]
        rows = self.library.catalog.images_by_id([i for i, _ in pairs])
        # A row deleted since the store was loaded is skipped rather than shown as a dead link.
        return [SearchHit(i, rows[i].path, s) for i, s in pairs if i in rows]
