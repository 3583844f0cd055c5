"""Query language of the search box: add and subtract texts and library images, with weights, in one line.

Grammar (rclip's --add/--subtract and weights, written in one text box):

- A query is a list of terms joined by the operators ``+`` (add) and ``-`` (subtract); the first term may
  have no operator, in which case it is added. ``beach -people`` and ``beach - people`` are both
  "beach" (+1) minus "people" (-1); ``red car -blue sky`` is "red car" (+1) minus "blue sky" (-1).
- An operator counts only where it starts a word: at the start of the query or after whitespace. So
  ``t-shirt``, ``black-and-white`` and ``x+y`` stay literal. A term runs until the next operator.
  The minus sign ``−`` (U+2212, which `ParsedQuery.describe` writes) works like ``-``. Two operators in a
  row (``beach --people``, ``beach + -people``) and an operator with nothing after it are errors.
- Text inside double quotes is literal: operators and weights in it are ignored and the quotes are removed,
  e.g. ``"rock - paper" + scissors``. Typographic quotes (“ ”, as phone keyboards type them) work too.
  An unterminated quote makes the rest of the query literal.
- A weight may open a term, right after its operator: ``<number>:`` with number like 2, 0.5, 1.5 or .5;
  it must be > 0 and <= 100, and its sign comes from the operator: ``2:sunset + boat -0.5:people``.
  It is a weight only when the character after ':' is neither a space nor a digit, so ``10:30``,
  ``16:9 photo`` and ``2: cats`` stay literal text, while ``16:cats`` is "cats" weighted 16.
  Something weight-like that is not a plain number (``1,5:sunset``, ``3d:render``) is an error;
  quote it to search for it literally.
- ``like:<id>`` or ``image:<id>`` (any case; id = the catalog image id, digits) as a whole term stands for
  that library image: ``like:42 + 2:sunset``, ``beach -like:7``, ``2:like:3``.
- Whitespace in a term is collapsed to single spaces and trimmed; any unicode is fine.
- At least one term must be added. Duplicate terms are kept as written (weights are not merged).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clipsearch.errors import QueryError

MAX_QUERY_CHARS = 1000
MAX_TERMS = 10
MAX_WEIGHT = 100.0
_MAX_IMAGE_ID = 2**63 - 1  # SQLite's largest integer: a larger id cannot exist in the catalog

_OPERATORS = {"+": 1.0, "-": -1.0, "\u2212": -1.0}
_QUOTES = "\"\u201c\u201d"
_QUOTE_CHARS = str.maketrans("", "", _QUOTES)
# A weight-like prefix: starts like a number and runs to the first ':', which must be followed by text
# that is not a digit (so times and ratios such as 10:30 or 16:9 stay literal).
_WEIGHT_PREFIX = re.compile(r"((?:[0-9]|\.[0-9])[^\s:\"\u201c\u201d]*):(?=[^\s\d])")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_IMAGE_PREFIX = re.compile(r"(like|image):(?=\S)", re.IGNORECASE)
_IMAGE_TERM = re.compile(r"(?:like|image):([0-9]+)", re.IGNORECASE)
_CANCEL_TOLERANCE = 1e-6  # relative to sum(|weights|), the largest norm the weighted sum could have

_WEIGHT_HINT = "a weight is a number above 0 and at most 100 before a colon, like 2:sunset or 0.5:sunset"


@dataclass(frozen=True)
class QueryTerm:
    """One added or subtracted text or library image, with its signed weight."""

    kind: str  # "text" or "image"
    value: str | int  # the text, or the catalog image id for kind "image"
    weight: float  # signed: negative for subtracted terms

    def as_dict(self) -> dict:
        """JSON-ready form."""
        key = "image_id" if self.kind == "image" else "text"
        return {"kind": self.kind, key: self.value, "weight": float(self.weight)}

    def _label(self) -> str:
        # The term without its sign ('image #5', '"boat"', '2 × "sunset"'): describe() places the signs.
        label = f"image #{self.value}" if self.kind == "image" else f'"{self.value}"'
        size = abs(self.weight)
        return label if size == 1 else f"{size:g} × {label}"


@dataclass(frozen=True)
class ParsedQuery:
    """A parsed query: its terms in the order they were written."""

    terms: tuple[QueryTerm, ...]

    @property
    def texts(self) -> list[QueryTerm]:
        """Text terms, in order."""
        return [t for t in self.terms if t.kind == "text"]

    @property
    def images(self) -> list[QueryTerm]:
        """Image terms, in order."""
        return [t for t in self.terms if t.kind == "image"]

    @property
    def is_simple(self) -> bool:
        """True for a plain text search: exactly one text term with weight 1."""
        return len(self.terms) == 1 and self.terms[0].kind == "text" and self.terms[0].weight == 1

    def describe(self) -> str:
        """How the query was understood, e.g. '2 × "sunset" + "boat" − "people"'."""
        parts = []
        for i, term in enumerate(self.terms):
            sign = "−" if term.weight < 0 else "+"
            if i == 0:
                parts.append(term._label() if sign == "+" else f"− {term._label()}")
            else:
                parts.append(f"{sign} {term._label()}")
        return " ".join(parts)

    def as_dict(self) -> dict:
        """JSON-ready form, with the human-readable reading under "understood"."""
        return {"terms": [t.as_dict() for t in self.terms], "understood": self.describe()}


def parse_query(text: str, *, max_chars: int = MAX_QUERY_CHARS, max_terms: int = MAX_TERMS) -> ParsedQuery:
    """Parse a search-box query into signed, weighted text and image terms; raise QueryError if malformed."""
    if not isinstance(text, str):
        raise TypeError(f"query must be a str, not {type(text).__name__}")
    text = text.strip()
    if not text.translate(_QUOTE_CHARS).strip():
        raise QueryError("the query is empty", "type what to look for, e.g. beach -people")
    if len(text) > max_chars:
        raise QueryError(
            f"the query is {len(text)} characters long; the most is {max_chars}",
            "shorten it: CLIP reads only about the first 77 tokens (a few dozen words) of a text anyway",
        )
    pieces = _split(text)
    if pieces[0][0] is None and not pieces[0][1].strip():
        pieces = pieces[1:]  # the query starts with an operator: no implicit first term
    terms = tuple(_term(op, raw) for op, raw in pieces)
    if len(terms) > max_terms:
        raise QueryError(
            f"the query has {len(terms)} terms; the most is {max_terms}",
            "remove or merge some terms, e.g. join words into one phrase instead of adding them one by one",
        )
    if not any(t.weight > 0 for t in terms):
        raise QueryError(
            "the query only subtracts: there is nothing to look for",
            "add something to look for before the '-', e.g. beach -people",
        )
    return ParsedQuery(terms)


def _split(text: str) -> list[tuple[str | None, str]]:
    """(operator or None for the leading term, raw term text with quotes still in) for each term."""
    pieces: list[tuple[str | None, str]] = []
    op: str | None = None
    start = 0
    in_quote = False
    word_start = True  # the start of the query counts as the start of a word
    for i, ch in enumerate(text):
        if ch in _QUOTES:
            in_quote = not in_quote
        elif not in_quote and word_start and ch in _OPERATORS:
            pieces.append((op, text[start:i]))
            op, start = ch, i + 1
        word_start = ch.isspace()
    pieces.append((op, text[start:]))
    return pieces


def _term(op: str | None, raw: str) -> QueryTerm:
    """One raw piece from _split as a QueryTerm, or QueryError."""
    if op is not None and raw[:1] in _OPERATORS:
        raise QueryError(
            f"'{op}{raw[0]}' is two operators in a row",
            "use one per term: '+' adds and '-' subtracts, and a weight goes after it (weights are "
            "always positive), e.g. beach -2:people",
        )
    sign = _OPERATORS[op] if op is not None else 1.0
    body = raw.strip()
    weight = 1.0
    m = _WEIGHT_PREFIX.match(body)
    if m:
        weight = _weight(m.group(1), body)
        body = body[m.end() :]
    m = _IMAGE_TERM.fullmatch(body.rstrip())
    if m:
        image_id = int(m.group(1))
        if image_id > _MAX_IMAGE_ID:
            raise QueryError(f"image id {m.group(1)} is too large", "ids are shown by clipsearch search --json")
        return QueryTerm("image", image_id, sign * weight)
    if _IMAGE_PREFIX.match(body):
        raise QueryError(
            f"'{_first_words(body)}' is not an image term",
            "write like:<id> alone between operators, e.g. like:42 + sunset (ids are shown by clipsearch "
            'search --json); to search for the text itself, put it in double quotes',
        )
    words = " ".join(body.translate(_QUOTE_CHARS).split())
    if not words:
        if op is not None:
            raise QueryError(f"'{op}' has nothing after it", "put a term after each '+' or '-', e.g. beach -people")
        raise QueryError("the query has empty quotes", 'put the words to search for between them, e.g. "rock - paper"')
    return QueryTerm("text", words, sign * weight)


def _weight(written: str, body: str) -> float:
    """The value of a weight prefix, checked; `body` is the term, for the message."""
    where = f"in '{_first_words(body)}'"
    if not _NUMBER.fullmatch(written):
        raise QueryError(
            f"weight '{written}' {where} is not a number",
            f"{_WEIGHT_HINT} (use a dot for decimals); to search for the text itself, put it in double quotes",
        )
    value = float(written)
    if not math.isfinite(value) or value > MAX_WEIGHT:
        raise QueryError(
            f"weight {written} {where} is too large; the most is {MAX_WEIGHT:g}",
            "weights are relative: 2:sunset + boat counts sunset twice as much as boat",
        )
    if value <= 0:
        raise QueryError(
            f"weight {written} {where} would ignore the term",
            f"{_WEIGHT_HINT}; to subtract a term, put '-' before it, e.g. beach -2:people",
        )
    return value


def _first_words(body: str, limit: int = 40) -> str:
    """The start of a term for an error message, cut to `limit` characters."""
    flat = " ".join(body.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def combine_vectors(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of the L2-normalised rows of vectors [n, d], L2-normalised: one float32 vector [d]."""
    rows = np.asarray(vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0 or w.shape != (rows.shape[0],):
        raise ValueError(f"need vectors [n, d] with n >= 1 and n weights, got {rows.shape} and {w.shape}")
    # Zero or non-finite rows give nan/inf here; they are reported below, not as numpy warnings.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        combined = w @ rows
        norm = float(np.linalg.norm(combined))
    if not (np.all(np.isfinite(combined)) and math.isfinite(norm)):
        raise QueryError(
            "the query could not be turned into one vector: a term's vector is zero or not finite",
            "rephrase or remove a term; if it is an image term, re-index that image",
        )
    # Comparing against the largest possible norm makes "cancel out" independent of the weights' scale.
    if norm <= _CANCEL_TOLERANCE * float(np.abs(w).sum()):
        raise QueryError(
            "the query's terms cancel out: what is subtracted equals what is added",
            "remove a subtracted term or lower its weight, e.g. beach -0.5:people",
        )
    return (combined / norm).astype(np.float32)
