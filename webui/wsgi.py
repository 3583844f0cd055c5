"""The web app for multi-process WSGI servers: `gunicorn -w 4 'clipsearch.webui.wsgi:create_app_from_env()'`.

Each worker process builds its own app (model, catalog connections, vector index) after the fork and only reads
the library: a request sees photos indexed by another process by catching up from the catalog's change log, and a
worker that rebuilds the vector index saves it atomically under a file lock, never over a newer one (store.py).
One separate `clipsearch watch` process is the library's single writer; label edits from any worker take the
writer lock between its batches. Query vectors of uploaded images are shared through the library folder.
Settings come from clipsearch.toml and CLIPSEARCH_* variables, as for the CLI.
"""

from __future__ import annotations

import logging
import os

from flask import Flask

from clipsearch.config import load_settings
from clipsearch.webui.app import create_app
from clipsearch.webui.server import prepare
from clipsearch.webui.services import EXTENSION_KEY

log = logging.getLogger(__name__)

UPLOAD_VECTORS_FOLDER = "upload-vectors"  # the latest uploads' query vectors (never the images), shared by workers


def create_app_from_env(config_file: str | os.PathLike | None = None) -> Flask:
    """The app over the library the settings name (config file < CLIPSEARCH_* env), model and index warmed up."""
    settings = load_settings(config_file=config_file)
    _configure_logging(settings.log_level)
    app = create_app(settings)
    services = app.extensions[EXTENSION_KEY]
    # A results page of an image search is paged by its upload key, and the next page may go to another worker.
    services.uploads.folder = settings.data_dir / UPLOAD_VECTORS_FOLDER
    info = prepare(services)
    if info["model"]:
        log.info("worker %d ready: %d photos from %s (%s)", os.getpid(), info["images"], info["data_dir"], info["model"])
    else:
        log.info("worker %d ready: the library %s is empty (run clipsearch index DIR)", os.getpid(), info["data_dir"])
    return app


def _configure_logging(level: str) -> None:
    """The CLI's logging (stderr, no third-party noise), unless the WSGI server configured the root logger."""
    if logging.getLogger().handlers:  # e.g. gunicorn --log-config: the operator's choice wins
        return
    from clipsearch.cli_common import configure_logging

    configure_logging(level)
