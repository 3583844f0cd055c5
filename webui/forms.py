"""Turning request parameters (query string or form) into a SearchRequest, with 400-worthy errors for bad values."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from clipsearch.errors import QueryError
from clipsearch.search.query import parse_query
from clipsearch.search.relevance import DEFAULT_STRICTNESS
from clipsearch.search.request import MAX_K, MAX_OFFSET, SORTS, SearchFilters, SearchRequest
from clipsearch.webui.services import Services

UPLOAD_KEY_RE = re.compile(r"^[0-9a-f]{24}$")
PAGE_SIZE = 40  # results per page in the browser


@dataclass(frozen=True)
class SearchForm:
    """The search parameters as the user gave them (echoed back into the page) plus the request they make."""

    q: str
    upload: str | None
    filters: SearchFilters
    sort: str
    strictness: float
    request: SearchRequest | None  # None when there is nothing to search for yet

    def query_args(self, **changes) -> dict[str, str | list[str]]:
        """URL parameters reproducing this search (minus defaults), with some changed: for paging and links."""
        filters = self.filters
        args = {
            "q": self.q,
            "upload": self.upload or "",
            "folder": filters.folder or "",
            "from": filters.date_from.isoformat() if filters.date_from else "",
            "to": filters.date_to.isoformat() if filters.date_to else "",
            "type": ",".join(filters.formats),
            "label": list(filters.labels),
            "sort": self.sort if self.sort != "relevance" else "",
            "relevance": f"{self.strictness:g}" if self.strictness != DEFAULT_STRICTNESS else "",
        }
        args.update({key: value if isinstance(value, list) else str(value) for key, value in changes.items()})
        return {key: value for key, value in args.items() if value}


def integer(args: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer parameter within [low, high], or QueryError saying what is allowed."""
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be a whole number, got {raw[:40]!r}", f"use a number from {low} to {high}") from None
    if not low <= value <= high:
        raise QueryError(f"{name} must be between {low} and {high}, got {value}", f"use a number from {low} to {high}")
    return value


def number(args: Mapping[str, str], name: str, default: float) -> float:
    """A finite decimal parameter, or QueryError."""
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise QueryError(f"{name} must be a number, got {raw[:40]!r}", "e.g. 3 (normal), 2 (looser), 5 (stricter)") from None
    if not math.isfinite(value):
        raise QueryError(f"{name} must be a finite number", "e.g. 3 (normal), 2 (looser), 5 (stricter)")
    return value


def formats_from(args) -> tuple[str, ...]:
    """Formats from repeated `type` parameters and/or comma-separated lists."""
    values = args.getlist("type") if hasattr(args, "getlist") else [args.get("type") or ""]
    return tuple(part for value in values for part in value.split(",") if part.strip())


def parse_search(args, services: Services, default_k: int, upload_data: bytes | None = None) -> SearchForm:
    """The SearchForm of request parameters; an uploaded image (bytes) is embedded and remembered for paging."""
    q = (args.get("q") or "").strip()
    upload = (args.get("upload") or "").strip() or None
    vectors = []
    if upload_data is not None:
        upload = services.uploads.key_of(upload_data)
        vector = services.uploads.get(upload)
        if vector is None:
            vector = services.searcher.embed_image(upload_data)
            services.uploads.put(upload, vector)
        vectors.append(vector)
    elif upload is not None:
        if not UPLOAD_KEY_RE.match(upload):
            raise QueryError("the upload parameter is not an upload id", "search by image again to get a new one")
        vector = services.uploads.get(upload)
        if vector is None:
            raise QueryError("that uploaded image is no longer remembered by the server (it keeps the latest few)",
                             "upload the image again")
        vectors.append(vector)
    sort = (args.get("sort") or "relevance").strip().lower()
    if sort not in SORTS:
        raise QueryError(f"unknown sort {sort[:40]!r}", f"use one of: {', '.join(SORTS)}")
    labels = args.getlist("label") if hasattr(args, "getlist") else [args.get("label") or ""]
    filters = SearchFilters.parse(args.get("folder"), args.get("from"), args.get("to"), formats_from(args),
                                  [label for label in labels if label])
    k = integer(args, "k", default_k, 1, MAX_K)
    offset = integer(args, "offset", 0, 0, MAX_OFFSET)
    strictness = number(args, "relevance", DEFAULT_STRICTNESS)
    query = parse_query(q) if q else None
    request = None
    if query is not None or vectors:
        request = SearchRequest(query, tuple(vectors), filters, sort, k, offset, strictness).check()
    return SearchForm(q, upload, filters, sort, strictness, request)
