"""Image bytes: thumbnails, browser-viewable renditions and original files, served only by catalog id."""

from __future__ import annotations

import logging
import os

from flask import Blueprint, abort, request, send_file

from clipsearch.catalog import ImageRow
from clipsearch.errors import ImageDecodeError
from clipsearch.webui.services import services
from clipsearch.webui.views import require_image
from clipsearch.webui.thumbnails import DISPLAY_SIZE, RenditionCache

log = logging.getLogger(__name__)

blueprint = Blueprint("media", __name__)

MIME_TYPES = {
    "JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "AVIF": "image/avif",
    "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heif", "HEIC": "image/heic",
}
RENDITION_MAX_AGE = 7 * 24 * 3600  # keyed by content: a changed photo gets a new ETag
ORIGINAL_MAX_AGE = 3600


def _row(image_id: int) -> ImageRow:
    """The catalog row of an id whose file still exists, else 404 (never a path from the request)."""
    row = require_image(services(), image_id)
    if not os.path.isfile(row.path):
        abort(404, description=f"{row.path} no longer exists; run clipsearch index again to update the library")
    return row


def _send(path, mimetype: str, etag: str | None, max_age: int, download_name: str | None = None, as_attachment=False):
    response = send_file(path, mimetype=mimetype, etag=etag or True, conditional=True, max_age=max_age,
                         download_name=download_name, as_attachment=as_attachment)
    response.cache_control.private = True
    response.cache_control.public = False
    return response


def _rendition(image_id: int, make) -> object:
    row = _row(image_id)
    try:
        path = make(row)
    except ImageDecodeError as e:
        abort(422, description=f"{os.path.basename(row.path)} cannot be shown: {e.reason}")
    etag = f"{row.content_hash or row.mtime_ns}-{path.stem}"
    return _send(path, "image/jpeg", etag, RENDITION_MAX_AGE)


@blueprint.get("/thumbs/<id:image_id>")
def thumbnail(image_id: int):
    """A small JPEG of the image for result grids (generated once, cached on disk)."""
    cache = services().renditions
    return _rendition(image_id, lambda row: cache.thumbnail(row.path, row.content_hash, row.mtime_ns))


@blueprint.get("/media/<id:image_id>")
def view(image_id: int):
    """The image as a browser can show it: the original file, or a JPEG rendition for HEIC, TIFF and big photos."""
    cache = services().renditions
    row = _row(image_id)
    # Big photos are shown as a 2048 px rendition (fast to load, rotated by us); the original stays a click away.
    too_big = max(row.width or 0, row.height or 0) > DISPLAY_SIZE
    if too_big or RenditionCache.needs_display_rendition(row.format):
        return _rendition(image_id, lambda row: cache.display(row.path, row.content_hash, row.mtime_ns))
    return _send(row.path, MIME_TYPES.get(row.format or "", "application/octet-stream"), row.content_hash, ORIGINAL_MAX_AGE)


@blueprint.get("/media/<id:image_id>/original")
def original(image_id: int):
    """The original file, unchanged (as a download with ?download=1)."""
    row = _row(image_id)
    mimetype = MIME_TYPES.get(row.format or "", "application/octet-stream")
    download = request.args.get("download") == "1"
    return _send(row.path, mimetype, row.content_hash, ORIGINAL_MAX_AGE, os.path.basename(row.path), download)
