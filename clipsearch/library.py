"""A library: one data folder holding the catalog, the derived vector index and caches, with one writer at a time."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from clipsearch.catalog import Catalog
from clipsearch.catalog_sql import catalog_exists
from clipsearch.config import Settings
from clipsearch.errors import LibraryBusyError, LibraryError, ModelMismatchError

log = logging.getLogger(__name__)

LOCK_FILE_NAME = "writer.lock"


class Library:
    """The catalog and files of one data folder."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.data_dir = Path(settings.data_dir).expanduser().absolute()
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        """The catalog, opened (and created) on first use."""
        if self._catalog is None:
            self._catalog = Catalog(self.settings.catalog_location)
        return self._catalog

    @property
    def exists(self) -> bool:
        """Whether this library already has a catalog (the SQLite file, or the tables in the `db` database)."""
        if self._catalog is not None and self._catalog.backend != "sqlite":
            return True  # opened, hence created; asking the server again would cost a new connection per search
        return catalog_exists(self.settings.catalog_location)

    @property
    def vector_store_path(self) -> Path:
        """Path of the derived FAISS file."""
        return self.settings.vector_store_path

    def close(self) -> None:
        """Release the catalog connections."""
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    def open_store(self, background: bool = False):
        """The vector store caught up with the catalog, or None when nothing is indexed yet.

        background=True builds approximate indexes in a thread while searches use the current one (servers).
        """
        from clipsearch.store import VectorStore

        return VectorStore.open(self.vector_store_path, self.catalog, kind=self.settings.vector_index, background=background)

    @contextmanager
    def writer_lock(self, purpose: str | None = None) -> Iterator[None]:
        """Hold the library's single-writer lock; LibraryBusyError if another process has it.

        purpose (e.g. "watch") is written into the lock file, so a refused writer can say who holds the library.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.data_dir / LOCK_FILE_NAME
        try:
            handle = open(lock_path, "a+")
        except OSError as e:
            raise LibraryError(f"cannot create {lock_path}: {e}", "check the permissions of --data-dir") from e
        try:
            if not _try_lock(handle):
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise LibraryBusyError(
                    f"the library {self.data_dir} is being written by {holder}",
                    "a watcher (`clipsearch watch`, `clipsearch serve --watch`) indexes changes by itself and holds the "
                    "library only while it applies them: try again in a moment"
                    if holder.endswith("(watch)") else
                    "wait for it to finish (or stop it); only one indexer or watcher can write a library at a time",
                )
            with self.catalog.exclusive_writer() as held:
                if not held:
                    raise LibraryBusyError(
                        f"the catalog {self.catalog.where} is being written by a clipsearch process on another machine",
                        "only one indexer or watcher can write a library at a time: wait for it to finish, or stop it",
                    )
                handle.seek(0)
                handle.truncate()
                handle.write(f"clipsearch pid {os.getpid()}" + (f" ({purpose})" if purpose else ""))
                handle.flush()
                yield
        finally:
            _unlock(handle)
            handle.close()

    def resolve_model(self, allow_change: bool = False) -> tuple[str, str]:
        """(model, pretrained) to use: the library's own unless the user asked for another one explicitly."""
        from clipsearch.encoders import model_id_for

        settings = self.settings
        recorded = self.catalog.library_model() if self.exists else None
        if recorded is None:
            return settings.model, settings.pretrained
        asked = {"model", "pretrained"} & settings.explicit
        if not asked:
            return recorded["model"], recorded["pretrained"]
        model = settings.model if "model" in asked else recorded["model"]
        pretrained = settings.pretrained if "pretrained" in asked else recorded["pretrained"]
        if "model" in asked and "pretrained" not in asked and model != recorded["model"]:
            pretrained = settings.pretrained
        wanted = model_id_for(model, pretrained)
        if wanted != recorded["model_id"] and not allow_change:
            raise ModelMismatchError(
                f"the library {self.data_dir} holds vectors from {recorded['model_id']}, not {wanted}; "
                "vectors of two models are never mixed",
                "leave out --model/--pretrained to use the library's model, pass --reembed to `clipsearch index` "
                "to re-embed everything with the new one, or choose another --data-dir",
            )
        return model, pretrained


def _try_lock(handle) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(handle) -> None:
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except ImportError:
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
    except OSError:
        pass
