"""Search: embed a text or image query with the library's model and rank the library's images by cosine similarity."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from clipsearch.catalog import file_time
from clipsearch.encoders import Encoder, EncoderSpec, load_encoder
from clipsearch.errors import EmptyLibraryError, ImageDecodeError, ModelMismatchError, QueryError
from clipsearch.library import Library
from clipsearch.search.query import ParsedQuery, QueryTerm, combine_vectors, parse_query
from clipsearch.search.relevance import SAMPLE_SIZE, Cutoff, relevance_cutoff
from clipsearch.search.label_sets import label_ids_of
from clipsearch.search.request import MAX_RELEVANT, SearchFilters, SearchHit, SearchRequest, SearchResult

FILTER_CACHE_SIZE = 16  # filter results kept (a paged or refined search reuses its filter's ids)

__all__ = ["Searcher", "SearchFilters", "SearchHit", "SearchRequest", "SearchResult"]

log = logging.getLogger(__name__)


class Searcher:
    """Answers queries over one library; keeps the encoder loaded and the vector store current."""

    def __init__(self, library: Library, encoder: Encoder | None = None, background_rebuild: bool = False,
                 hide_vanished: bool = False, runtime: str = "torch"):
        self.library = library
        self.runtime = runtime  # for the encoder loaded here (see EncoderSpec.runtime)
        self.background_rebuild = background_rebuild  # long-running servers keep answering during index rebuilds
        self.hide_vanished = hide_vanished  # check result files exist (servers): a deleted photo is never shown
        self._encoder = encoder
        self._owns_encoder = encoder is None
        self._store = None
        self._lock = threading.Lock()
        self._encoder_lock = threading.Lock()
        self._filter_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._sample: tuple | None = None  # (store, count, vectors) for relevance cutoffs
        self._dates: tuple[int, np.ndarray, np.ndarray] | None = None  # (catalog version, ids, seconds)

    @property
    def encoder(self) -> Encoder:
        """The library's model, loaded on first use."""
        encoder = self._encoder
        if encoder is not None:
            return encoder
        with self._encoder_lock:  # concurrent first requests of a server load the model once
            if self._encoder is None:
                settings = self.library.settings
                model, pretrained = self.library.resolve_model()
                self._encoder = load_encoder(
                    EncoderSpec(model, pretrained, settings.device, settings.precision, settings.model_cache_dir,
                                self.runtime)
                )
            return self._encoder

    @property
    def loaded_encoder(self) -> Encoder | None:
        """The encoder if it is loaded already (does not load it)."""
        return self._encoder

    def current_store(self):
        """The vector store caught up with the catalog, or None when nothing is indexed (never raises EmptyLibrary)."""
        try:
            return self.store()
        except EmptyLibraryError:
            return None

    def warm_up(self) -> None:
        """Load the encoder and run it once, so the first query is as fast as the rest."""
        self.encoder.warm_up()

    def store(self):
        """The vector store, reloaded when another process changed the catalog."""
        with self._lock:
            if not self.library.exists:
                raise self._empty()
            catalog = self.library.catalog
            floor, generation = catalog.log_state()
            if self._store is None or self._store.generation < floor:
                self._store = self.library.open_store(self.background_rebuild)
            elif self._store.generation != generation:
                # Another process indexed: catch up from the change log instead of re-reading the whole file.
                library_model = catalog.library_model()
                if library_model is None or library_model["model_id"] != self._store.model_id:
                    self._store = self.library.open_store(self.background_rebuild)
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
        """Images best matching a query in the search-box language (e.g. `beach -people`, `2:sunset + boat`)."""
        if not query or not query.strip():
            raise QueryError("the query is empty", 'type what to look for, e.g. clipsearch search "a dog on the beach"')
        return self.run(SearchRequest(parse_query(query), k=self._check_k(k))).hits

    def search_image(self, source: str | os.PathLike | bytes, k: int) -> list[SearchHit]:
        """Images most similar to an image file (or its bytes) that need not be in the library."""
        return self.run(SearchRequest(vectors=(self.embed_image(source),), k=self._check_k(k))).hits

    def search_like(self, image: int | str | os.PathLike, k: int) -> list[SearchHit]:
        """Images most similar to one already in the library (by id or path), excluding itself."""
        image_id = self.resolve_image_id(image)
        return self.run(SearchRequest(ParsedQuery((QueryTerm("image", image_id, 1.0),)), k=self._check_k(k))).hits

    @staticmethod
    def _check_k(k: int) -> int:
        if k <= 0:
            raise QueryError(f"k must be positive, got {k}", "pass -k 10 for ten results")
        return k

    def embed_image(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """The embedding of an image file or its bytes (an upload), QueryError when it is not a readable image."""
        from clipsearch.images import open_image

        self.store()  # fail on an empty library before paying for the decode
        try:
            image, _ = open_image(source, max_pixels=self.library.settings.max_image_pixels, target_size=self.encoder.image_size)
        except ImageDecodeError as e:
            name = source if not isinstance(source, bytes) else "the uploaded file"
            raise QueryError(f"cannot use {name} as a query: {e.reason}", e.hint or "use a JPEG, PNG, WebP, HEIC... image") from e
        return self.encoder.encode_images([self.encoder.preprocess(image)])[0]

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
        self._check_k(k)
        return self.run(SearchRequest(vectors=(np.asarray(vector, dtype=np.float32),), k=k, exclude=frozenset(exclude))).hits

    def query_vector(self, request: SearchRequest, store) -> tuple[np.ndarray, set[int]]:
        """(unit query vector, ids to leave out) for a request: its terms embedded and combined by weight."""
        vectors: list[np.ndarray] = []
        weights: list[float] = []
        exclude = set(request.exclude)
        terms = request.query.terms if request.query else ()
        texts = [term for term in terms if term.kind == "text"]
        if texts:
            encoded = self.encoder.encode_texts([term.value for term in texts])
            vectors.extend(encoded)
            weights.extend(term.weight for term in texts)
        for term in terms:
            if term.kind != "image":
                continue
            vector = self.library.catalog.vector_of(int(term.value), store.model_id)
            if vector is None:
                raise QueryError(f"image #{term.value} is not in the library (or failed to index)",
                                 "use like:ID with an id from the results")
            vectors.append(vector)
            weights.append(term.weight)
            exclude.add(int(term.value))  # "more like this" should not return the photo itself
        for vector in request.vectors:
            vectors.append(np.asarray(vector, dtype=np.float32).ravel())
            weights.append(1.0)
        if not vectors:
            raise QueryError("nothing to search for", "type a query or give an image")
        if any(v.shape[-1] != store.dim for v in vectors):
            raise QueryError(f"a query vector does not have the library's {store.dim} dimensions", "search with the library's model")
        return combine_vectors(np.stack(vectors), weights), exclude

    def cutoff(self, vector: np.ndarray, store, strictness: float) -> Cutoff:
        """The adaptive relevance cutoff of a query vector (see clipsearch.search.relevance)."""
        return relevance_cutoff(self._score_sample(store) @ vector, strictness)

    def _score_sample(self, store) -> np.ndarray:
        """Vectors of a random sample of the library, refreshed when the store changes by more than a tenth."""
        cached = self._sample
        if cached is not None and cached[0] is store and abs(cached[1] - store.count) <= 0.1 * cached[1]:
            return cached[2]
        ids = store.sample_ids(SAMPLE_SIZE)
        _, vectors = self.library.catalog.vectors(store.model_id, ids.tolist())
        if not len(vectors):
            vectors = np.zeros((0, store.dim), np.float32)
        self._sample = (store, store.count, vectors)
        return vectors

    def run(self, request: SearchRequest) -> SearchResult:
        """Answer one search request: embed, filter, rank (by relevance or date above the cutoff), page."""
        request.check()
        started = time.perf_counter()
        store = self.store()
        vector, exclude = self.query_vector(request, store)
        embedded = time.perf_counter()
        filters = request.filters
        allowed = self._allowed_ids(filters) if filters.active else None
        cutoff = self.cutoff(vector, store, request.strictness)
        if request.sort == "relevance":
            wanted = request.offset + request.k + len(exclude)
            scores, ids = store.search(vector, wanted, allowed_ids=allowed)
            pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in exclude]
            candidates = store.count if allowed is None else len(allowed)
            total, relevant = max(0, candidates - len(exclude)), None
        else:
            scores, ids = store.range_search(vector, cutoff.threshold, allowed_ids=allowed, limit=MAX_RELEVANT + len(exclude))
            pairs = [(int(i), float(s)) for i, s in zip(ids, scores) if int(i) not in exclude][:MAX_RELEVANT]
            pairs = self._by_date(pairs, newest_first=request.sort == "newest")
            total = relevant = len(pairs)
        searched = time.perf_counter()
        page = pairs[request.offset : request.offset + request.k]
        hits = self._hits(page, cutoff.threshold)
        finished = time.perf_counter()
        timings = {"embed": embedded - started, "search": searched - embedded, "fetch": finished - searched, "total": finished - started}
        return SearchResult(hits, request, cutoff, total, relevant, timings, ranked=len(page))

    def _by_date(self, pairs: list[tuple[int, float]], newest_first: bool) -> list[tuple[int, float]]:
        """(id, score) pairs ordered by photo date; same-date photos (bursts) stay in score order."""
        if not pairs:
            return pairs
        ids, seconds = self._date_table()
        wanted = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
        scores = np.fromiter((s for _, s in pairs), dtype=np.float64, count=len(pairs))
        where = np.clip(np.searchsorted(ids, wanted), 0, max(len(ids) - 1, 0))
        found = ids[where] == wanted if len(ids) else np.zeros(len(wanted), bool)
        dates = np.where(found, seconds[where] if len(ids) else 0.0, 0.0)  # rows gone meanwhile sort as undated
        # lexsort sorts by the last key first: date, then score (best first) within a date.
        order = np.lexsort((-scores, -dates if newest_first else dates))
        return [pairs[i] for i in order]

    def _date_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every indexed image's date, loaded once per catalog version (sorting 10k results then costs ~1 ms)."""
        catalog = self.library.catalog
        version = catalog.version()
        cached = self._dates
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        ids, seconds = catalog.date_keys()
        self._dates = (version, ids, seconds)
        return ids, seconds

    def _allowed_ids(self, filters: SearchFilters) -> np.ndarray:
        """Ids the filters let through, cached per catalog version (paging and new queries reuse them)."""
        catalog = self.library.catalog
        key = (filters, catalog.version())
        with self._lock:
            cached = self._filter_cache.get(key)
            if cached is not None:
                self._filter_cache.move_to_end(key)
                return cached
        start, end = filters.sql_range()
        label_ids = label_ids_of(catalog, filters.labels) if filters.labels else ()
        allowed = catalog.filter_ids(filters.folder, start, end, filters.formats, label_ids)
        with self._lock:
            self._filter_cache[key] = allowed
            while len(self._filter_cache) > FILTER_CACHE_SIZE:
                self._filter_cache.popitem(last=False)
        return allowed

    def _hits(self, pairs: list[tuple[int, float]], threshold: float) -> list[SearchHit]:
        rows = self.library.catalog.images_by_id([i for i, _ in pairs])
        hits = []
        for image_id, score in pairs:
            row = rows.get(image_id)
            if row is None:  # deleted since the store was loaded: skipped rather than shown as a dead link
                continue
            if self.hide_vanished and not os.path.exists(row.path):
                # Deleted on disk but not yet out of the catalog (a watcher applies it within seconds).
                continue
            date = row.taken_at or file_time(row.mtime_ns)
            hits.append(SearchHit(image_id, row.path, score, date, row.width, row.height, row.format, score >= threshold))
        return hits
