"""The OpenAPI 3.1 document of the JSON API (served at /api/openapi.json, checked against real answers by the tests)."""

from __future__ import annotations

import copy
import functools
from typing import Any

from clipsearch import __version__
from clipsearch.search.query import MAX_QUERY_CHARS, MAX_TERMS, MAX_WEIGHT
from clipsearch.search.relevance import DEFAULT_STRICTNESS, MAX_STRICTNESS, MIN_STRICTNESS
from clipsearch.search.request import MAX_K, MAX_OFFSET, SORTS
from clipsearch.webui.openapi_labels import label_paths, label_schemas
from clipsearch.webui.openapi_parts import (Schema, array, integer, nullable, number, obj, operation, ref,
                                           responses, string)
from clipsearch.webui.services import UPLOADS_KEPT
from clipsearch.webui.views import NEIGHBOURS

DEFAULT_K = 20  # the `top_k` setting's default; a server may be configured otherwise
MAX_FAILURES = 100_000
DATE_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$"
UPLOAD_ID = r"^[0-9a-f]{24}$"
CAMERA_KEYS = ("camera", "lens", "aperture", "exposure", "iso", "focal_length", "taken", "software", "gps")

DESCRIPTION = f"""\
Search your own photos in plain language with CLIP. Every page of the web UI has a JSON twin here.

**Query language** (parameter `q`, at most {MAX_QUERY_CHARS} characters and {MAX_TERMS} terms): terms joined by
`+` (add) and `-` (subtract), an operator counting only where it starts a word.

- `beach -people`: photos of beaches, pushed away from photos of people.
- `2:sunset + boat`: a weight (above 0, at most {MAX_WEIGHT:g}) before a colon; sunset counts twice as much as boat.
- `like:42 + snow`: `like:ID` (or `image:ID`) stands for library image 42 (ids are in every result); the image
  itself is left out of the results.
- `"rock - paper"`: text in double quotes is literal.

The reading of a query is echoed back under `query.understood`. A search can also start from an uploaded image
(`POST /api/search` with a multipart `image` field); the answer's `upload_id` repeats that search (for paging)
without uploading again.

**Relevance**: each query gets its own cutoff (`cutoff.threshold`), the median score of a library sample plus
`relevance` robust standard deviations. Sorting by date (`newest`, `oldest`) returns only the results above it.

**Access**: when the server has an access token (`access_token` setting), every call needs the header
`Authorization: Bearer TOKEN` (or the session cookie of a browser that logged in); without a token none is needed.
Errors are JSON: `{{"error": {{"code", "message", "hint"}}}}`.
"""


# --- parameters ----------------------------------------------------------------------------------


def query_param(name: str, schema: Schema, description: str, **extra: Any) -> Schema:
    """An optional query parameter."""
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema, **extra}


def search_fields() -> dict[str, tuple[Schema, str]]:
    """The search parameters (query string or form fields): name -> (schema, description)."""
    sort = {"type": "string", "enum": list(SORTS), "default": "relevance"}
    return {
        "q": ({"type": "string", "maxLength": MAX_QUERY_CHARS},
              "The query, e.g. `beach -people`, `2:sunset + boat`, `like:42 + snow` (see the query language above)."),
        "k": ({"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K},
              "Results per page; the default is the server's `top_k` setting (20 unless configured)."),
        "offset": ({"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                   "Results to skip: pass the previous answer's `next_offset` for the next page."),
        "sort": (sort, "Best matches first, or the relevant results (above the cutoff) by photo date (case-insensitive)."),
        "relevance": ({"type": "number", "minimum": MIN_STRICTNESS, "maximum": MAX_STRICTNESS,
                       "default": DEFAULT_STRICTNESS},
                      "Strictness of the relevance cutoff in robust standard deviations: 2 looser, 5 stricter."),
        "folder": ({"type": "string"},
                   "Only photos under this absolute folder path (e.g. one of the status `filters.folders`)."),
        "from": ({"type": "string", "format": "date"}, "Only photos taken on or after this day (YYYY-MM-DD)."),
        "to": ({"type": "string", "format": "date"}, "Only photos taken on or before this day (YYYY-MM-DD)."),
        "type": ({"type": "array", "items": {"type": "string"}},
                 "Only these file formats (JPEG, PNG, HEIF, WEBP..., case-insensitive): repeat the parameter or give a "
                 "comma-separated list."),
        "label": ({"type": "array", "items": {"type": "string", "pattern": "^[^/]+/.+$"}},
                  "Only photos holding this label, as SET/LABEL (repeat for photos holding several)."),
        "upload": ({"type": "string", "pattern": UPLOAD_ID},
                   "Search again by an image uploaded before: the `upload_id` of that answer (the server keeps the "
                   f"latest {UPLOADS_KEPT} uploads)."),
    }


def search_parameters() -> list[Schema]:
    """The query parameters of GET /api/search."""
    params = []
    for name, (schema, description) in search_fields().items():
        extra = {"style": "form", "explode": True} if schema.get("type") == "array" else {}
        params.append(query_param(name, schema, description, **extra))
    return params


def page_parameters() -> list[Schema]:
    """k and offset, as GET /api/similar takes them."""
    fields = search_fields()
    return [query_param(name, *fields[name]) for name in ("k", "offset")]


def image_id_parameter() -> Schema:
    """The catalog image id in the path."""
    return {"name": "image_id", "in": "path", "required": True, "description": "A catalog image id (`id` of a result).",
            "schema": {"type": "integer", "minimum": 0}}


def search_body() -> Schema:
    """The form body of POST /api/search: the search fields, plus an image file in multipart."""
    fields = {name: {**schema, "description": description} for name, (schema, description) in search_fields().items()}
    image = {"type": "string", "contentMediaType": "application/octet-stream",
             "description": "An image file (JPEG, PNG, WebP, HEIC...) to search by, up to the server's `max_upload_mb`."}
    multipart = {"type": "object", "properties": {"image": image, **fields}}
    form = {"type": "object", "properties": fields}
    return {
        "required": True,
        "description": "The search fields as form fields; `image` searches by an uploaded photo (with or without `q`). "
                       "Query-string parameters are read too.",
        "content": {
            "multipart/form-data": {"schema": multipart,
                                    "encoding": {"image": {"contentType": "image/*, application/octet-stream"}}},
            "application/x-www-form-urlencoded": {"schema": form, "encoding": {"type": {"style": "form", "explode": True}}},
        },
    }


def paths() -> dict[str, Any]:
    """The five routes of the API."""
    page = "A page of results with the query's reading, totals and relevance cutoff."
    status_param = query_param("failures", {"type": "integer", "minimum": 0, "maximum": MAX_FAILURES, "default": 100},
                               "How many failed files to list (0: all of them).")
    return {
        "/api/search": {
            "get": operation(
                "search", "search", "Search by text",
                "Search by `q` (the query language), or repeat an image search with `upload`; filters, order and "
                "paging as query parameters. Without `q` and `upload` the answer is 400.",
                responses(ref("SearchResponse"), page, 400, 409, 503), search_parameters()),
            "post": operation(
                "searchByImage", "search", "Search by an uploaded image (and/or text)",
                "Upload an image (multipart field `image`) to find photos like it, optionally combined with `q`. "
                "The answer's `upload_id` pages through the same search with GET.",
                responses(ref("SearchResponse"), page, 400, 409, 413, 503), body=search_body()),
        },
        "/api/similar/{image_id}": {
            "get": operation(
                "similar", "search", "More like this", "Photos most like one in the library (itself left out).",
                responses(ref("SearchResponse"), page, 400, 404, 409, 503), [image_id_parameter(), *page_parameters()]),
        },
        "/api/images/{image_id}": {
            "get": operation(
                "image", "library", "One image",
                f"An image's catalog facts, camera basics and its {NEIGHBOURS} nearest neighbours (none for a file "
                "that failed to index).",
                responses(ref("ImageDetails"), "The image.", 400, 404, 409, 503), [image_id_parameter()]),
        },
        "/api/status": {
            "get": operation(
                "status", "library", "Library status",
                "The library: model, folders, counts, index size, failed files with reasons, and the values the "
                "search filters offer.",
                responses(ref("Status"), "The library's status.", 400, 503), [status_param]),
        },
        "/api/openapi.json": {
            "get": operation(
                "openapi", "library", "This document", "The OpenAPI 3.1 description of this API.",
                responses({"type": "object", "required": ["openapi", "info", "paths"]}, "The OpenAPI document.")),
        },
    }


# --- schemas -------------------------------------------------------------------------------------


def schemas() -> dict[str, Schema]:
    """The components/schemas of the API's answers."""
    date = {"type": "string", "format": "date"}
    return {
        "Error": obj({"error": obj({
            "code": integer("The HTTP status.", minimum=400, maximum=599),
            "message": string("What went wrong."),
            "hint": nullable(string("What to do about it.")),
        })}, description="An error answer."),
        "Urls": obj({
            "page": string("The image's web page."),
            "thumbnail": string("A small JPEG thumbnail."),
            "view": string("A browser-viewable rendition (JPEG for HEIC and other formats)."),
            "original": string("The original file."),
            "similar": string("The web search for photos like this one (`like:ID`)."),
        }, description="Links of one image, relative to the server."),
        "Hit": obj({
            "id": integer("Catalog image id (use with like:ID, /api/images, /api/similar)."),
            "path": string("Absolute path of the file on the server."),
            "score": number("Cosine similarity to the query.", minimum=-1, maximum=1),
            "date": string("Photo date: EXIF date taken (camera clock), else the file time in UTC; no zone.",
                           pattern=DATE_TIME),
            "width": integer("Width in pixels."),
            "height": integer("Height in pixels."),
            "format": string("File format as Pillow names it (JPEG, PNG, HEIF...)."),
            "relevant": {"type": "boolean", "description": "Whether the score is above the query's relevance cutoff."},
            "name": string("File name."),
            "urls": ref("Urls"),
        }, optional=("date", "width", "height", "format", "relevant"), description="One result."),
        "TextTerm": obj({
            "kind": {"const": "text"},
            "text": string("The text, whitespace collapsed, quotes removed."),
            "weight": number("Signed weight: negative for subtracted terms.", minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT),
        }),
        "ImageTerm": obj({
            "kind": {"const": "image"},
            "image_id": integer("The library image of like:ID."),
            "weight": number("Signed weight: negative for subtracted terms.", minimum=-MAX_WEIGHT, maximum=MAX_WEIGHT),
        }),
        "Query": obj({
            "terms": array({"oneOf": [ref("TextTerm"), ref("ImageTerm")]}, "The terms in the order written.",
                           minItems=1, maxItems=MAX_TERMS),
            "understood": string('How the query was read, e.g. `"beach" − "people"`.'),
        }, description="The parsed query."),
        "Filters": obj({
            "folder": nullable(string("Only photos under this folder (normalised).")),
            "date_from": nullable({**date, "description": "First day."}),
            "date_to": nullable({**date, "description": "Last day."}),
            "formats": array({"type": "string"}, "File formats, upper case, sorted (empty: all)."),
            "labels": array({"type": "string"}, "Labels (SET/LABEL) a photo must hold, sorted (empty: any)."),
        }, description="The filters applied."),
        "Cutoff": obj({
            "threshold": nullable(number("Scores at or above this count as relevant (null: no cutoff could be computed).")),
            "median": number("Median score on a sample of the library."),
            "spread": number("Robust standard deviation of those scores.", minimum=0),
            "strictness": number("The `relevance` parameter.", minimum=MIN_STRICTNESS, maximum=MAX_STRICTNESS),
        }, description="The query's relevance cutoff and the statistics behind it."),
        "Timings": obj({name: number(f"{name.capitalize()} time in milliseconds.", minimum=0)
                        for name in ("embed", "search", "fetch", "total")}, description="Where the time went."),
        "SearchResponse": obj({
            "query": nullable(ref("Query")),
            "image_queries": integer("Uploaded images in the query (0 or 1)."),
            "filters": ref("Filters"),
            "sort": {"type": "string", "enum": list(SORTS)},
            "k": integer("Results per page.", minimum=1, maximum=MAX_K),
            "offset": integer("Results skipped.", maximum=MAX_OFFSET),
            "next_offset": nullable(integer("Offset of the next page (null on the last page).")),
            "total": integer("Results available in this order: all candidates by relevance, the relevant ones by date."),
            "relevant": nullable(integer("Results above the cutoff (counted when sorting by date, else null).")),
            "cutoff": ref("Cutoff"),
            "timings_ms": ref("Timings"),
            "results": array(ref("Hit"), "This page of results.", maxItems=MAX_K),
            "upload_id": nullable(string("Id of the uploaded query image, for `upload=` (null without one).",
                                         pattern=UPLOAD_ID)),
        }, description="A page of search results."),
        "Camera": obj({key: {"type": "string"} for key in CAMERA_KEYS}, optional=CAMERA_KEYS,
                      description="Camera facts from EXIF, formatted for people; only those found."),
        "ImageDetails": obj({
            "id": integer("Catalog image id."),
            "path": string("Absolute path of the file on the server."),
            "name": string("File name."),
            "folder": string("Folder of the file."),
            "root": string("The indexed folder it was found under."),
            "size_bytes": integer("File size in bytes."),
            "width": nullable(integer("Width in pixels.")),
            "height": nullable(integer("Height in pixels.")),
            "format": nullable(string("File format.")),
            "date": string("Photo date (see Hit.date).", pattern=DATE_TIME),
            "date_source": {"type": "string", "enum": ["exif", "file"], "description": "Where the date comes from."},
            "status": {"type": "string", "enum": ["ok", "failed"], "description": "Indexed, or failed to index."},
            "error": nullable(string("Why indexing failed.")),
            "file_exists": {"type": "boolean", "description": "Whether the file is still on disk."},
            "camera": ref("Camera"),
            "urls": ref("Urls"),
            "labels": array(ref("ImageLabel"), "The labels the photo holds."),
            "neighbours": array(ref("Hit"), "The most similar photos.", maxItems=NEIGHBOURS),
        }, description="One catalog image."),
        "FilterOptions": obj({
            "folders": array({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer", "minimum": 0}],
                              "items": False, "minItems": 2}, "[folder, indexed images under it] for each indexed "
                             "folder and its subfolders one level down."),
            "formats": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                        "description": "Indexed images per file format."},
            "date_range": nullable({"type": "array", "prefixItems": [date, date], "items": False, "minItems": 2,
                                    "description": "[oldest, newest] photo day."}),
            "labels": array(obj({"set": string("Set name."), "labels": array(
                {"type": "array", "prefixItems": [{"type": "string"}, {"type": "string"}, {"type": "integer", "minimum": 0}],
                 "items": False, "minItems": 3}, "[SET/LABEL, label name, photos] of labels some photo holds.")}),
                            "Labels to filter by, per set."),
        }, description="The values the search filters offer."),
        "Status": obj({
            "data_dir": string("The library folder on the server."),
            "catalog": string("Where the catalog lives: the SQLite file, or the database URL without its password."),
            "exists": {"type": "boolean", "description": "Whether a library has been created there."},
            "model": nullable(string("Id of the model the vectors come from (null before indexing).")),
            "model_name": nullable(string("open_clip model name (only when the library exists).")),
            "pretrained": nullable(string("Pretrained weights tag (only when the library exists).")),
            "roots": array({"type": "string"}, "The indexed folders."),
            "counts": obj({
                "images": integer("Files in the catalog."), "ok": integer("Indexed."),
                "failed": integer("Failed to index."), "embeddings": integer("Stored vectors."),
            }),
            "vectors": integer("Vectors in the search index."),
            "index_kind": nullable({"type": "string", "enum": ["exact", "ivf", "disk"],
                                    "description": "Search index kind (only when the library exists)."}),
            "failures": array(obj({"path": string("The file."), "reason": string("Why it failed.")}),
                              "Files that could not be indexed."),
            "catalog_bytes": integer("Catalog database size in bytes."),
            "index_bytes": integer("Search index size in bytes."),
            "renditions_bytes": integer("Cached thumbnails and renditions, in bytes."),
            "filters": ref("FilterOptions"),
        }, optional=("model_name", "pretrained", "index_kind"), description="The library's status."),
    }


@functools.cache
def _document() -> Schema:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "clipsearch", "version": __version__, "summary": "Self-hosted semantic photo search with CLIP.",
                 "description": DESCRIPTION, "license": {"name": "MIT", "identifier": "MIT"}},
        "servers": [{"url": "/", "description": "This server."}],
        "tags": [{"name": "search", "description": "Searches."}, {"name": "library", "description": "The library."},
                 {"name": "labels", "description": "Zero-shot labels and their reviews."}],
        "security": [{}, {"bearerAuth": []}],
        "paths": {**paths(), **label_paths()},
        "components": {
            "schemas": {**schemas(), **label_schemas()},
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "The server's access token; only needed when the server has one configured.",
            }},
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the JSON API (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
