"""Gunicorn settings for clipsearch: `gunicorn -c python:clipsearch.webui.gunicorn_conf -w 4 'clipsearch.webui.wsgi:create_app_from_env()'`.

The master process (not a worker, which gunicorn may replace at any time) refuses public addresses without an access
token, as `clipsearch serve` does, and announces the server in the library folder (server.json) so that
`clipsearch search` asks it; it withdraws the announcement when it exits. Each worker gets its share of the cores
for torch's and FAISS's threads. Flags on the command line override these settings.
"""

from __future__ import annotations

import os

from clipsearch import server_link
from clipsearch.config import load_settings, with_overrides
from clipsearch.errors import ClipsearchError
from clipsearch.webui.security import check_exposure
from clipsearch.webui.server import display_url

# Each worker loads the model before it answers; a large one on a busy machine takes longer than gunicorn's
# default 30 s, after which the master would kill the worker and start another (forever).
timeout = 120
# The app must be built in each worker after the fork: catalog connections and torch's threads do not survive one.
preload_app = False


def _settings():
    return load_settings()


def on_starting(server) -> None:
    """Refuse to listen beyond this machine without an access token (unless insecure is set)."""
    settings = _settings()
    for address in server.cfg.address:
        if not isinstance(address, tuple):  # a unix socket or an inherited descriptor: reachable as the proxy allows
            continue
        try:
            check_exposure(with_overrides(settings, host=address[0] or "0.0.0.0"))
        except ClipsearchError as e:
            raise RuntimeError(f"{e.message}\n  hint: {e.hint}") from e  # gunicorn prints it and exits with 1


def post_fork(server, worker) -> None:
    """Give each worker cores / workers threads for torch and FAISS (OpenMP), unless OMP_NUM_THREADS is set.

    Every process using all cores makes their OpenMP threads fight: with 4 workers on 2 cores a FAISS search of
    80 vectors took 12 ms instead of microseconds. The worker has not imported either library yet (no --preload).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // max(1, server.num_workers)))


def when_ready(server) -> None:
    """Announce the first TCP listener in the library folder, under the master's pid."""
    settings = _settings()
    for listener in server.LISTENERS:
        address = listener.getsockname()
        if isinstance(address, tuple):
            url = display_url(address[0], address[1])
            server_link.announce(settings.data_dir, url, token_required=bool(settings.access_token))
            server.log.info("clipsearch: announced %s in %s", url, server_link.server_file(settings.data_dir))
            return


def on_exit(server) -> None:
    """Withdraw the announcement (only if this master wrote it)."""
    server_link.withdraw(_settings().data_dir)
