"""Running the app: waitress (production WSGI server) by default, Flask's development server only for --debug."""

from __future__ import annotations

import gc
import logging
from typing import Callable

from clipsearch import server_link
from clipsearch.config import Settings
from clipsearch.encoders import Encoder
from clipsearch.errors import ConfigError
from clipsearch.webui.app import create_app
from clipsearch.webui.security import check_exposure, is_loopback
from clipsearch.webui.services import EXTENSION_KEY

log = logging.getLogger(__name__)

DEFAULT_THREADS = 8


def display_url(host: str, port: int) -> str:
    """The URL to open for a listening address (wildcard addresses shown as this machine)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def serve(settings: Settings, encoder: Encoder | None = None, *, threads: int = DEFAULT_THREADS, debug: bool = False,
          ready: Callable[[str, dict], None] | None = None, watch: bool = False) -> None:
    """Serve the library until interrupted; `ready(url, info)` is called once the model is warm and the port is open.

    watch=True also keeps the index in step with the library's folders (a Watcher thread sharing the model).
    """
    check_exposure(settings)
    if debug and not is_loopback(settings.host):
        raise ConfigError("--debug serves Flask's debugger, which runs any code a visitor sends",
                          "use --debug only with the default --host 127.0.0.1")
    app = create_app(settings, encoder)
    services = app.extensions[EXTENSION_KEY]
    info = prepare(services)
    watcher = _start_watcher(settings, services.searcher.loaded_encoder) if watch else None
    if watcher is not None:
        info["watching"] = watcher.roots
    try:
        _serve_app(app, services, settings, threads, debug, info, ready)
    finally:
        if watcher is not None:
            watcher.stop()


def prepare(services) -> dict:
    """Warm the model and the vector index before the first request; what was loaded (data_dir, model, images)."""
    info = {"data_dir": str(services.settings.data_dir), "model": None, "images": 0}
    model = services.library.catalog.library_model() if services.library.exists else None
    if model is not None:
        # Load and run the model now, so the first query is as fast as the rest. A library with no vectors yet
        # needs no model: its page explains how to index, and the first search after indexing loads it.
        services.searcher.warm_up()
        info["model"] = model["model_id"]
        info["images"] = services.library.catalog.counts()["embeddings"]
        try:
            services.searcher.store()  # build or catch up the vector index before the first query
        except Exception as e:  # an empty library is fine: the page explains how to index
            log.debug("vector index not ready at start-up: %s", e)
    freeze_startup_objects()
    return info


def freeze_startup_objects() -> None:
    """Exempt what start-up built (modules, model, index) from the cyclic GC for the life of the server."""
    # With torch and a model loaded, a full collection walks ~440k objects: a 200 ms pause inside whichever
    # request triggers it (ViT-B-32 on a 2-core EPYC). These objects live as long as the server anyway; collect
    # the start-up garbage first so that only live objects are frozen. Also keeps worker pages shared after a fork.
    gc.collect()
    gc.freeze()


def _start_watcher(settings: Settings, encoder: Encoder | None):
    from clipsearch.indexer.watch import Watcher

    watcher = Watcher(settings, encoder=encoder)  # the searcher's model when loaded: one copy in memory
    watcher.start()
    return watcher


def _serve_app(app, services, settings: Settings, threads: int, debug: bool, info: dict,
         ready: Callable[[str, dict], None] | None) -> None:
    if debug:
        url = display_url(settings.host, settings.port)
        if ready:
            ready(url, info)
        app.run(host=settings.host, port=settings.port, debug=True, use_reloader=False, threaded=True)
        return
    server = _create_server(app, settings, threads)
    if hasattr(server, "effective_host"):
        url = display_url(server.effective_host, server.effective_port)
    else:  # several sockets (e.g. "localhost" on IPv4 and IPv6): show the first
        url = display_url(*server.effective_listen[0][:2])
    server_link.announce(settings.data_dir, url, token_required=bool(settings.access_token))
    try:
        if ready:
            ready(url, info)
        server.run()
    finally:
        server_link.withdraw(settings.data_dir)
        server.close()
        services.close()


def _create_server(app, settings: Settings, threads: int):
    from waitress import create_server

    # "Task queue depth is N" is logged whenever a request waits for a thread, even briefly; not worth a warning.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    try:
        return create_server(
            app, host=settings.host, port=settings.port, threads=threads, ident="clipsearch",
            max_request_body_size=(settings.max_upload_mb + 1) * 1024 * 1024,
            clear_untrusted_proxy_headers=True,
        )
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}",
            "another program (maybe another clipsearch serve) uses that port: pass --port 8001, or --port 0 for any free one",
        ) from e
