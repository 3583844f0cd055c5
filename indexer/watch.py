"""Watching folders: file system events, debounced, become scoped indexing runs applied by one writer thread.

Observers (watchdog's threads) only record changed paths. The writer thread rescans everything at start (what
changed while nothing watched) and every `watch_rescan_minutes`, and in between applies the paths that have
settled, in batches, holding the library's writer lock only while it applies one, so `clipsearch index` can
run between batches. Anything taken but not applied (a stop, a crash) is found again by the next start's rescan.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from clipsearch.config import Settings
from clipsearch.encoders import Encoder
from clipsearch.errors import ClipsearchError, ConfigError, LibraryBusyError, LibraryError, ModelMismatchError
from clipsearch.indexer.observers import WatchFilter, start_observers, stop_observers
from clipsearch.indexer.pending import PendingChanges
from clipsearch.indexer.run import IndexReport, Indexer, load_model, prepare_library_model, sync_vector_store
from clipsearch.indexer.scope import Changes, coalesce
from clipsearch.indexer.walk import normalise_root
from clipsearch.library import Library

log = logging.getLogger(__name__)

LOCK_PURPOSE = "watch"  # written into the lock file: a refused `clipsearch index` names the watcher
LOCK_RETRY_SECONDS = 1.0
IDLE_CHECK_SECONDS = 1.0  # longest sleep of the writer: a stop request or a due store save is seen within it
# Saving the vector file rewrites it whole (~200 MB at 100k photos, exact index), so it is saved at most this
# often; searchers catch up from the catalog's change log meanwhile.
STORE_SAVE_SECONDS = 60.0
# Pruning the change log makes running servers reload the whole vector file, so the log is kept until it is long.
PRUNE_BACKLOG = 100_000


class _Stopped(Exception):
    """A stop was requested while waiting for the writer lock."""


@dataclass
class WatchBatch:
    """One applied batch: kind 'rescan' (whole folders compared with the catalog) or 'changes' (paths seen changing)."""

    kind: str
    paths: int
    report: IndexReport

    @property
    def changed(self) -> bool:
        """Whether the batch changed the catalog or found failures."""
        r = self.report
        return bool(r.added or r.updated or r.moved or r.removed or r.failed)


class Watcher:
    """Keeps one library's index in step with folders while files appear, change, move and vanish."""

    def __init__(self, settings: Settings, folders: Sequence[str | os.PathLike] | None = None, *,
                 encoder: Encoder | None = None, on_batch: Callable[[WatchBatch], None] | None = None):
        """Watch folders (default: the library's own); raises at once when there is nothing to watch."""
        self.settings = settings
        self.library = Library(settings)
        self.roots = self._choose_roots(folders)
        self.encoder = encoder
        self.on_batch = on_batch
        self.pending = PendingChanges(settings.watch_settle_seconds)
        self.batches = 0
        self.error: BaseException | None = None
        self._model: tuple[str, str] | None = None
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._busy = False
        self._waited = False
        self._unsaved_since: float | None = None
        self._observers: list = []
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model (unless given), start observing, and start the writer (which rescans first)."""
        self._model = self.library.resolve_model()
        if self.encoder is None:
            self.encoder = load_model(self.settings, *self._model)
        watched = [root for root in coalesce(self.roots) if os.path.isdir(root)]
        for root in sorted(set(self.roots) - set(watched)):
            if not os.path.isdir(root):
                log.warning("%s is not a folder (not mounted?): not watching it; nothing under it is removed", root)
        wanted = WatchFilter(self.roots, str(self.library.data_dir), self.settings.include_hidden)
        # Observe before the first rescan: changes made during it are queued and applied after it.
        self._observers = start_observers(watched, self.pending, wanted, polling=self.settings.watch_polling,
                                          poll_seconds=self.settings.watch_poll_seconds)
        self._thread = threading.Thread(target=self._write_loop, name="clipsearch-watch", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the writer to stop after (or in the middle of) its current batch; returns at once (signal-safe)."""
        self._stop.set()
        self.pending.wake()

    def stop(self, timeout: float = 60) -> None:
        """Stop observing and writing, wait for the writer, release the library."""
        self.request_stop()
        stop_observers(self._observers)
        self._observers = []
        if self._thread is not None:
            self._thread.join(timeout)
        self.library.close()

    def wait(self) -> None:
        """Block until the watcher stops; re-raises the error that stopped it, if any."""
        self._waited = True
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)  # in slices, so Ctrl-C reaches the main thread
        if self.error is not None:
            raise self.error

    def run_forever(self) -> None:
        """start(), then block until stopped (request_stop, Ctrl-C, or an error, which is raised)."""
        self.start()
        try:
            self.wait()
        finally:
            self.stop()

    @property
    def idle(self) -> bool:
        """Whether the start-up rescan is done and nothing is pending or being applied."""
        return self._caught_up.is_set() and not self._busy and len(self.pending) == 0

    @property
    def observers(self) -> list:
        """The running watchdog observers (native and/or polling)."""
        return list(self._observers)

    # --- the writer thread ----------------------------------------------------------------------
    def _write_loop(self) -> None:
        try:
            self._rescan()
            self._caught_up.set()
            interval = self.settings.watch_rescan_minutes * 60
            next_rescan = time.monotonic() + interval if interval else None
            while not self._stop.is_set():
                now = time.monotonic()
                if next_rescan is not None and now >= next_rescan:
                    self._rescan()
                    next_rescan = time.monotonic() + interval
                    continue
                due = self.pending.next_due()
                sleep = min(IDLE_CHECK_SECONDS, next_rescan - now if next_rescan is not None else IDLE_CHECK_SECONDS)
                if due is None:
                    self.pending.wait_for_work(sleep)
                elif due > 0:
                    self._stop.wait(min(due, sleep))
                else:
                    changes = self.pending.take_ready()
                    if changes is not None:
                        self._apply(changes)
                    else:  # due but held back (the other side of a rename is still busy): look again soon
                        self._stop.wait(min(sleep, self.pending.settle / 4))
                self._save_store()
        except _Stopped:
            pass
        except BaseException as e:  # the next start's rescan recovers what was not applied
            self.error = e
            if not self._waited:  # else wait() raises it to the caller, who reports it
                log.error("watching stopped: %s", e, exc_info=not isinstance(e, ClipsearchError))
        finally:
            self._save_store(final=True)

    def _rescan(self) -> None:
        with self._writing():
            report = Indexer(self.library, self.encoder, stop=self._stop, sync_store=False).run(self.roots)
        self._announce(WatchBatch("rescan", len(self.roots), report))

    def _apply(self, changes: Changes) -> None:
        with self._writing():
            report = Indexer(self.library, self.encoder, stop=self._stop, sync_store=False).run(self.roots, changes)
        self._announce(WatchBatch("changes", len(changes.paths), report))

    def _announce(self, batch: WatchBatch) -> None:
        self.batches += 1
        r = batch.report
        if batch.changed:
            self._unsaved_since = self._unsaved_since or time.monotonic()
            log.info("%s: added %d, updated %d, moved %d, removed %d, failed %d", batch.kind, r.added, r.updated, r.moved,
                     r.removed, len(r.failed))
        if self.on_batch is not None:
            self.on_batch(batch)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        with self._locked(wait=True):
            self._check_model()
            self._busy = True
            try:
                yield
            finally:
                self._busy = False

    def _locked(self, wait: bool) -> ExitStack:
        """The writer lock, held by the returned stack; waits while another writer (a `clipsearch index`) has it."""
        stack = ExitStack()
        waiting = False
        while True:
            try:
                stack.enter_context(self.library.writer_lock(LOCK_PURPOSE))
            except LibraryBusyError as e:
                if not wait:
                    raise
                if not waiting:
                    log.warning("%s: waiting for it to finish", e.message)
                    waiting = True
                if self._stop.wait(LOCK_RETRY_SECONDS):
                    raise _Stopped from e
                continue
            if waiting:
                log.warning("the library is free again: applying the changes seen meanwhile")
            return stack

    def _check_model(self) -> None:
        recorded = self.library.catalog.library_model()
        if recorded is None:
            prepare_library_model(self.library, self.encoder, *self._model)
        elif recorded["model_id"] != self.encoder.model_id:
            raise ModelMismatchError(
                f"the library {self.library.data_dir} now holds vectors from {recorded['model_id']} (re-embedded while "
                f"watching?), not from {self.encoder.model_id}",
                "start the watcher again: it uses the library's model",
            )

    def _save_store(self, final: bool = False) -> None:
        """Save the vector file when changes have waited long enough (or at the end), unless another writer is busy."""
        since = self._unsaved_since
        if since is None or (not final and time.monotonic() - since < STORE_SAVE_SECONDS):
            return
        try:
            with self._locked(wait=False):
                floor, generation = self.library.catalog.log_state()
                sync_vector_store(self.library, prune=generation - floor > PRUNE_BACKLOG)
            self._unsaved_since = None
        except LibraryBusyError:
            pass  # that writer saves the file when it finishes
        except Exception as e:  # derived data: readers catch up from the catalog, the next save retries
            log.warning("could not save the vector index: %s", e)

    # --- set-up ---------------------------------------------------------------------------------
    def _choose_roots(self, folders: Sequence[str | os.PathLike] | None) -> list[str]:
        if folders:
            roots = [normalise_root(folder) for folder in folders]
            for root in roots:
                if not Path(root).is_dir():
                    raise ConfigError(f"{root} is not a folder", "name existing photo folders: clipsearch watch ~/Pictures")
        else:
            roots = [row.path for row in self.library.catalog.roots()] if self.library.exists else []
            if not roots:
                raise LibraryError(
                    f"the library {self.library.data_dir} has no folders to watch yet",
                    "name them: clipsearch watch ~/Pictures (or index some first: clipsearch index ~/Pictures)",
                )
        return list(dict.fromkeys(roots))
