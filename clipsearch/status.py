"""Library status: what is indexed, with which model, what failed, and how much disk it takes."""

from __future__ import annotations

from typing import Any

from clipsearch.config import Settings, hide_password
from clipsearch.library import Library
from clipsearch.store import store_size_bytes


def catalog_display(settings: Settings) -> str:
    """Where the settings' catalog lives, fit to show (a database URL without its password, or the SQLite file)."""
    return hide_password(settings.db) if settings.db else str(settings.catalog_path)


def library_status(settings: Settings, max_failures: int | None = 20, store=None) -> dict[str, Any]:
    """A JSON-ready description of the settings' library (does not create one).

    store: a vector store the caller already holds current (a server's), instead of loading the file again.
    """
    library = Library(settings)
    info: dict[str, Any] = {
        "data_dir": str(library.data_dir),
        "catalog": catalog_display(settings),
        "exists": library.exists,
        "model": None,
        "model_name": None,
        "pretrained": None,
        "index_kind": None,
        "roots": [],
        "counts": {"images": 0, "ok": 0, "failed": 0, "embeddings": 0},
        "vectors": 0,
        "failures": [],
        "catalog_bytes": 0,
        "index_bytes": 0,
    }
    if not library.exists:
        return info
    try:
        catalog = library.catalog
        model = catalog.library_model()
        info["model"] = model["model_id"] if model else None
        info["model_name"] = model["model"] if model else None
        info["pretrained"] = model["pretrained"] if model else None
        info["roots"] = [root.path for root in catalog.roots()]
        info["counts"] = catalog.counts()
        info["failures"] = [{"path": p, "reason": r} for p, r in catalog.failures(max_failures)]
        store = store if store is not None else library.open_store()
        info["vectors"] = store.count if store is not None else 0
        info["index_kind"] = store.kind if store is not None else None
        info["catalog_bytes"] = catalog.size_bytes()
        info["index_bytes"] = store_size_bytes(library.vector_store_path)
    finally:
        library.close()
    return info
