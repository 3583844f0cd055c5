"""What pages and API answers are made of: searches run for a request, hits with their URLs, image details."""

from __future__ import annotations

import os
from typing import Any

from flask import abort, request, url_for

from clipsearch.catalog import STATUS_OK, ImageRow, file_time
from clipsearch.errors import QueryError
from clipsearch.search.label_sets import labels_of
from clipsearch.search.query import ParsedQuery, QueryTerm
from clipsearch.search.request import SearchHit, SearchRequest, SearchResult
from clipsearch.webui.forms import SearchForm, parse_search
from clipsearch.webui.services import Services

NEIGHBOURS = 12


def run_search(services: Services, default_k: int) -> tuple[SearchForm, SearchResult | None]:
    """Parse the current request's search parameters (query string, or form + uploaded image) and run the search."""
    args = request.values
    upload_data = None
    upload = request.files.get("image")
    if upload is not None and upload.filename is not None:
        upload_data = upload.read()
        if not upload_data:
            raise QueryError("the uploaded file is empty", "choose an image file")
    form = parse_search(args, services, default_k, upload_data)
    result = services.searcher.run(form.request) if form.request is not None else None
    return form, result


def similar_request(services: Services, image_id: int, k: int, offset: int = 0) -> SearchRequest:
    """A "more like this" request for an indexed image (404 when the id is unknown)."""
    require_image(services, image_id)
    return SearchRequest(ParsedQuery((QueryTerm("image", image_id, 1.0),)), k=k, offset=offset).check()


def require_image(services: Services, image_id: int) -> ImageRow:
    """The catalog row of an image id, or a 404 answer."""
    row = services.library.catalog.images_by_id([image_id]).get(image_id) if services.library.exists else None
    if row is None:
        abort(404, description=f"no image with id {image_id} in the library")
    return row


def hit_urls(image_id: int) -> dict[str, str]:
    """The URLs of one image: its page, thumbnail, browser-viewable rendition and original file."""
    return {
        "page": url_for("pages.image", image_id=image_id),
        "thumbnail": url_for("media.thumbnail", image_id=image_id),
        "view": url_for("media.view", image_id=image_id),
        "original": url_for("media.original", image_id=image_id),
        "similar": url_for("pages.search", q=f"like:{image_id}"),
    }


def label_urls(set_name: str, name: str) -> dict[str, str]:
    """Links of one label: its page, its JSON twin, and a search filtered to it."""
    return {"page": url_for("label_pages.label", set_name=set_name, name=name),
            "api": url_for("label_api.label", set_name=set_name, name=name),
            "search": url_for("pages.search", label=f"{set_name}/{name}")}


def hit_json(hit: SearchHit) -> dict[str, Any]:
    """A result as the API returns it: catalog facts, file name and URLs."""
    data = hit.as_dict()
    data["name"] = os.path.basename(hit.path)
    data["urls"] = hit_urls(hit.id)
    return data


def result_json(result: SearchResult, form: SearchForm | None = None) -> dict[str, Any]:
    """A search result as the API returns it."""
    data = result.as_dict()
    data["results"] = [hit_json(hit) for hit in result.hits]
    data["upload_id"] = form.upload if form else None
    return data


def image_details(services: Services, image_id: int, with_neighbours: bool = True) -> dict[str, Any]:
    """Everything the image page shows about one catalog image (404 when the id is unknown)."""
    from clipsearch.camera import camera_info

    row = require_image(services, image_id)
    exists = os.path.isfile(row.path)
    details: dict[str, Any] = {
        "id": row.id,
        "path": row.path,
        "name": os.path.basename(row.path),
        "folder": os.path.dirname(row.path),
        "root": row.root,
        "size_bytes": row.size,
        "width": row.width,
        "height": row.height,
        "format": row.format,
        "date": (row.taken_at or file_time(row.mtime_ns)).isoformat(timespec="seconds"),
        "date_source": "exif" if row.taken_at else "file",
        "status": row.status,
        "error": row.error,
        "file_exists": exists,
        "camera": camera_info(row.path) if exists else {},
        "urls": hit_urls(row.id),
        "labels": [{**held, "urls": label_urls(held["set"], held["label"])}
                   for held in labels_of(services.library.catalog, row.id)],
        "neighbours": [],
    }
    if with_neighbours and row.status == STATUS_OK:
        result = services.searcher.run(similar_request(services, image_id, NEIGHBOURS))
        details["neighbours"] = [hit_json(hit) for hit in result.hits]
    return details
