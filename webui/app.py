"""The Flask application factory: blueprints for pages, media and the JSON API; services kept per app."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from clipsearch import __version__
from clipsearch.config import Settings
from clipsearch.encoders import Encoder
from clipsearch.errors import (
    ClipsearchError,
    ConfigError,
    EmptyLibraryError,
    LibraryBusyError,
    LibraryError,
    ModelMismatchError,
    QueryError,
    WeightsUnavailableError,
)
from clipsearch.webui import security
from clipsearch.webui.services import EXTENSION_KEY, Services

log = logging.getLogger(__name__)

# HTTP status of each kind of clipsearch error; anything else is a 500 (logged, never shown with a traceback).
ERROR_STATUS: tuple[tuple[type[ClipsearchError], int], ...] = (
    (QueryError, 400),
    (ConfigError, 400),  # in a request: a label name, prompt or threshold the user gave
    (EmptyLibraryError, 409),
    (ModelMismatchError, 409),
    (LibraryBusyError, 503),
    (WeightsUnavailableError, 503),
    (LibraryError, 503),
)


class CatalogIdConverter(IntegerConverter):
    """`<id:name>` in routes: a catalog id, within SQLite's integer range (larger numbers are a plain 404)."""

    def __init__(self, url_map, *args, **kwargs):
        super().__init__(url_map, min=0, max=2**63 - 1)


# What to do next after a plain HTTP error (clipsearch errors carry their own hints).
HTTP_HINTS = {
    404: "image ids come from search results; /api/openapi.json lists the API's routes",
    405: "/api/openapi.json lists the methods each route takes",
}


def create_app(settings: Settings, encoder: Encoder | None = None, config: Mapping[str, Any] | None = None) -> Flask:
    """A web app over the settings' library; `encoder` replaces the library's model (tests), `config` Flask's config."""
    app = Flask(__name__)
    app.url_map.converters["id"] = CatalogIdConverter
    app.config.update(
        SECRET_KEY=None,
        ACCESS_TOKEN=settings.access_token,
        MAX_CONTENT_LENGTH=settings.max_upload_mb * 1024 * 1024,
        # Multipart fields other than the file are tiny; limit them so a form cannot fill memory.
        MAX_FORM_MEMORY_SIZE=64 * 1024,
        MAX_FORM_PARTS=20,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="clipsearch_session",
    )
    app.json.sort_keys = False  # keep the documented field order of API answers
    app.jinja_env.trim_blocks = app.jinja_env.lstrip_blocks = True
    app.config.update(config or {})
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = security.load_secret_key(settings.data_dir)
    app.extensions[EXTENSION_KEY] = Services.create(settings, encoder)

    from clipsearch.webui import api, label_api, label_pages, media, pages

    app.register_blueprint(pages.blueprint)
    app.register_blueprint(media.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(label_pages.blueprint)
    app.register_blueprint(label_api.blueprint)
    security.install(app)
    _install_error_handlers(app)

    @app.context_processor
    def globals_for_templates():
        return {"version": __version__, "needs_login": bool(app.config.get("ACCESS_TOKEN"))}

    return app


def wants_json() -> bool:
    """Whether the current request is an API call (errors answered as JSON) rather than a page."""
    return request.path.startswith("/api/") or request.path.startswith("/media/") or request.path.startswith("/thumbs/")


def error_response(status: int, message: str, hint: str | None = None):
    """An error as JSON for API calls, as a page otherwise."""
    if wants_json():
        response = jsonify(error={"code": status, "message": message, "hint": hint})
        response.status_code = status
        return response
    return render_template("error.html", status=status, message=message, hint=hint), status


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ClipsearchError)
    def clipsearch_error(e: ClipsearchError):
        status = next((code for kind, code in ERROR_STATUS if isinstance(e, kind)), 500)
        if status == 500:
            log.error("request %s failed: %s", request.path, e)
        return error_response(status, e.message, e.hint)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        status = e.code or 500
        if status == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            if request.content_length is not None and request.content_length > limit:
                return error_response(413, f"the upload is larger than {limit // (1024 * 1024)} MB",
                                      "use a smaller image (or raise max_upload_mb)")
            return error_response(413, "the form has too many fields or a field that is too long",
                                  "send only the image and the search parameters")
        return error_response(status, e.description or e.name, HTTP_HINTS.get(status))

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        # Logged in full for the operator; the client gets no traceback.
        log.exception("unexpected error answering %s", request.path)
        return error_response(500, "internal error", "the server log has the details")
