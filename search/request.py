"""What a search asks for (query, filters, order, page) and what it answers, shared by the CLI, web UI and API."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np

from clipsearch.errors import QueryError
from clipsearch.search.query import ParsedQuery
from clipsearch.search.relevance import DEFAULT_STRICTNESS, MAX_STRICTNESS, MIN_STRICTNESS, Cutoff

SORTS = ("relevance", "newest", "oldest")
MAX_K = 500
MAX_OFFSET = 10_000
MAX_RELEVANT = 10_000  # sorting by date considers at most this many relevant results


@dataclass(frozen=True)
class SearchFilters:
    """Which images may appear: under a folder, within dates (inclusive days), of some file formats, holding labels."""

    folder: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    formats: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # "SET/LABEL" names; a photo must hold every one

    @property
    def active(self) -> bool:
        """Whether any filter is set."""
        return bool(self.folder or self.date_from or self.date_to or self.formats or self.labels)

    def sql_range(self) -> tuple[datetime | None, datetime | None]:
        """[start, end) datetimes covering date_from..date_to as whole days."""
        start = datetime.combine(self.date_from, datetime.min.time()) if self.date_from else None
        end = datetime.combine(self.date_to + timedelta(days=1), datetime.min.time()) if self.date_to else None
        return start, end

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (unset filters are null/empty)."""
        return {
            "folder": self.folder,
            "date_from": self.date_from.isoformat() if self.date_from else None,
            "date_to": self.date_to.isoformat() if self.date_to else None,
            "formats": list(self.formats),
            "labels": list(self.labels),
        }

    @classmethod
    def parse(cls, folder: str | None = None, date_from: str | None = None, date_to: str | None = None,
              formats: str | list[str] | tuple[str, ...] | None = None,
              labels: list[str] | tuple[str, ...] | None = None) -> "SearchFilters":
        """Filters from user text (dates as YYYY-MM-DD, formats comma-separated, labels SET/LABEL); QueryError on bad values."""
        folder = (folder or "").strip() or None
        if folder is not None:
            if "\x00" in folder or not os.path.isabs(folder):
                raise QueryError(f"folder filter {folder!r} is not an absolute folder path", "pick a folder from the list")
            folder = os.path.normpath(folder)
        start, end = _parse_date(date_from, "date_from"), _parse_date(date_to, "date_to")
        if start and end and start > end:
            raise QueryError(f"the date range is empty ({start} is after {end})", "swap the two dates")
        if isinstance(formats, str):
            formats = formats.split(",")
        names = tuple(sorted({f.strip().upper() for f in (formats or ()) if f and f.strip()}))
        for name in names:
            if not name.isalnum() or len(name) > 10:
                raise QueryError(f"unknown file format {name!r}", "use format names such as JPEG, PNG, HEIF, WEBP")
        references = {"/".join(parse_label_reference(reference)) for reference in labels or ()}
        return cls(folder, start, end, names, tuple(sorted(references)))


def parse_label_reference(reference: str | None) -> tuple[str, str]:
    """(set, label) of a "SET/LABEL" label filter (the first "/" splits: label names may hold more); QueryError if malformed."""
    set_name, sep, label = (reference or "").strip().partition("/")
    if not sep or not set_name.strip() or not label.strip():
        raise QueryError(f"label filter {(reference or '')[:60]!r} is not SET/LABEL", "e.g. label=scenes/beach")
    return set_name.strip(), label.strip()


def _parse_date(text: str | None, name: str) -> date | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError as e:
        raise QueryError(f"{name} {text[:40]!r} is not a date", "write dates as YYYY-MM-DD, e.g. 2024-07-31") from e


@dataclass(frozen=True)
class SearchRequest:
    """One search: a parsed query and/or query vectors (uploaded images), filters, order and page."""

    query: ParsedQuery | None = None
    vectors: tuple[np.ndarray, ...] = ()
    filters: SearchFilters = field(default_factory=SearchFilters)
    sort: str = "relevance"
    k: int = 20
    offset: int = 0
    strictness: float = DEFAULT_STRICTNESS
    exclude: frozenset[int] = frozenset()

    def check(self) -> "SearchRequest":
        """Self, or QueryError naming the first bad field and its allowed range."""
        if self.query is None and not self.vectors:
            raise QueryError("nothing to search for", "type a query or give an image")
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, got {self.k}", f"ask for at most {MAX_K} results per page and page with offset")
        if not isinstance(self.offset, int) or not 0 <= self.offset <= MAX_OFFSET:
            raise QueryError(f"offset must be between 0 and {MAX_OFFSET}, got {self.offset}", "narrow the search with filters instead")
        if self.sort not in SORTS:
            raise QueryError(f"unknown sort {self.sort!r}", f"use one of: {', '.join(SORTS)}")
        if not (MIN_STRICTNESS <= self.strictness <= MAX_STRICTNESS):
            raise QueryError(
                f"relevance must be between {MIN_STRICTNESS:g} and {MAX_STRICTNESS:g}, got {self.strictness:g}",
                "lower values keep more results when sorting by date, higher values fewer",
            )
        return self


@dataclass(frozen=True)
class SearchHit:
    """One ranked result, with the catalog facts a result list shows."""

    id: int
    path: str
    score: float
    date: datetime | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    relevant: bool | None = None

    def as_dict(self) -> dict:
        """JSON-ready form (facts that are unknown are left out)."""
        data: dict[str, Any] = {"id": self.id, "path": self.path, "score": round(float(self.score), 6)}
        if self.date is not None:
            data["date"] = self.date.isoformat(timespec="seconds")
        for key in ("width", "height", "format", "relevant"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data


@dataclass(frozen=True)
class SearchResult:
    """A page of hits plus what the user needs to read it: totals, the relevance cutoff, timings."""

    hits: list[SearchHit]
    request: SearchRequest
    cutoff: Cutoff
    total: int  # results available in this order: candidates by relevance, relevant ones by date
    relevant: int | None  # results above the cutoff, when counted (always when sorting by date)
    timings: dict[str, float]
    ranked: int | None = None  # ranked results this page covered (hits of vanished files are left out of `hits`)

    @property
    def next_offset(self) -> int | None:
        """Offset of the next page, or None when this is the last one."""
        covered = len(self.hits) if self.ranked is None else self.ranked
        end = self.request.offset + covered
        return end if covered == self.request.k and end < min(self.total, MAX_OFFSET + self.request.k) else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        request = self.request
        return {
            "query": request.query.as_dict() if request.query else None,
            "image_queries": len(request.vectors),
            "filters": request.filters.as_dict(),
            "sort": request.sort,
            "k": request.k,
            "offset": request.offset,
            "next_offset": self.next_offset,
            "total": self.total,
            "relevant": self.relevant,
            "cutoff": self.cutoff.as_dict(),
            "timings_ms": {key: round(value * 1000, 2) for key, value in self.timings.items()},
            "results": [hit.as_dict() for hit in self.hits],
        }
