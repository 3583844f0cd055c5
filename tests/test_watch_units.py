"""Pieces of watching without real time: debouncing and coalescing, scoped indexing runs, observer choice, settings."""

from __future__ import annotations

import errno
import logging
import os
import sys
import time

import pytest

from clipsearch.config import load_settings, with_overrides
from clipsearch.errors import ConfigError, LibraryError, ModelMismatchError
from clipsearch.indexer import observers
from clipsearch.indexer import run as run_module
from clipsearch.indexer.pending import PendingChanges
from clipsearch.indexer.run import Indexer, index_folders
from clipsearch.indexer.scope import Changes, coalesce
from clipsearch.indexer.watch import Watcher
from clipsearch.library import Library
from tests.fakes import make_image

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def pending_with(clock, stats: dict, settle: float = 1.0) -> PendingChanges:
    return PendingChanges(settle, write_timeout=30, clock=clock, stat=lambda path: stats.get(path))


# --- debouncing and coalescing --------------------------------------------------------------------------
def test_a_path_is_ready_once_quiet_and_steady(clock):
    stats = {"/p/a.jpg": (10, 1)}
    pending = pending_with(clock, stats)
    pending.record("/p/a.jpg")
    clock.now += 0.5
    assert pending.take_ready() is None and pending.next_due() == pytest.approx(0.5)
    stats["/p/a.jpg"] = (20, 2)  # grew without an event (a poll not taken yet): wait another settle time
    clock.now += 0.6
    assert pending.take_ready() is None and len(pending) == 1
    clock.now += 1.0
    assert pending.take_ready() == Changes(("/p/a.jpg",))
    assert len(pending) == 0 and pending.next_due() is None


def test_a_file_written_and_not_closed_waits_for_its_close(clock):
    stats = {"/p/a.jpg": (10, 1)}
    pending = pending_with(clock, stats)
    pending.record("/p/a.jpg", written=True)
    clock.now += 5
    assert pending.take_ready() is None  # still open for writing
    pending.record("/p/a.jpg", closed=True)
    clock.now += 1.01
    assert pending.take_ready() == Changes(("/p/a.jpg",))
    pending.record("/p/b.jpg", written=True)  # its close was never seen: taken after the write timeout
    stats["/p/b.jpg"] = None
    clock.now += 29
    assert pending.take_ready() is None
    clock.now += 1.01
    assert pending.take_ready() == Changes(("/p/b.jpg",))


def test_empty_files_are_left_until_written(clock):
    stats = {"/p/a.jpg": (0, 1)}
    pending = pending_with(clock, stats)
    pending.record("/p/a.jpg")
    clock.now += 2
    assert pending.take_ready() is None and len(pending) == 0


def test_a_folder_covers_its_files_and_busy_ones_are_deferred(clock):
    stats = {"/p/new/a.jpg": (5, 1), "/p/new/b.jpg": (5, 1), "/p/other.jpg": (5, 1)}
    pending = pending_with(clock, stats)
    pending.record("/p/new", is_dir=True)
    pending.record("/p/new/a.jpg")
    pending.record("/p/other.jpg")
    clock.now += 0.5
    pending.record("/p/new/b.jpg")  # still being copied when the folder settles
    clock.now += 0.6
    changes = pending.take_ready()
    assert changes.paths == ("/p/new", "/p/other.jpg") and changes.defer == ("/p/new/b.jpg",)
    clock.now += 1
    assert pending.take_ready() == Changes(("/p/new/b.jpg",))
    assert coalesce(["/a/b", "/a/b c", "/a/b/c", "/a"]) == ["/a"]
    assert coalesce(["/a/b", "/a/b c/d", "/a/bc"]) == ["/a/b", "/a/b c/d", "/a/bc"]


def test_both_sides_of_a_rename_are_taken_together_with_the_hint(clock):
    stats = {"/p/new.jpg": (5, 1)}
    pending = pending_with(clock, stats)
    pending.record_move("/p/old.jpg", "/p/new.jpg")
    clock.now += 0.8
    pending.record("/p/new.jpg")  # written again right after the rename
    clock.now += 0.5
    # The old side has settled, but applied alone it would delete the row the new side should keep.
    assert pending.take_ready() is None
    clock.now += 0.6
    assert pending.take_ready() == Changes(("/p/new.jpg", "/p/old.jpg"), (), (("/p/old.jpg", "/p/new.jpg"),))


# --- scoped runs ----------------------------------------------------------------------------------------
@pytest.fixture
def indexed(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    for n, colour in enumerate(("red", "green", "blue", "yellow")):
        make_image(photos / "album" / f"{colour}.png", colour, noise=n + 1)
    make_image(photos / "loose.png", "white", noise=9)
    index_folders(settings, [photos], encoder=fake_encoder)
    return photos


def scoped_run(settings, encoder, roots, changes: Changes):
    library = Library(settings)
    try:
        with library.writer_lock():
            return Indexer(library, encoder, sync_store=False).run(roots, changes)
    finally:
        library.close()


def catalog_paths(settings, folder) -> dict[str, int]:
    library = Library(settings)
    try:
        return {os.path.relpath(p, folder): row.id for p, row in library.catalog.known_under([str(folder)]).items()}
    finally:
        library.close()


def test_a_reported_folder_rename_moves_rows_without_reading_a_file(indexed, settings, fake_encoder, monkeypatch):
    before = catalog_paths(settings, indexed)
    (indexed / "album").rename(indexed / "renamed")
    reads = []
    monkeypatch.setattr(run_module, "prepare", lambda candidate, *a, **k: reads.append(candidate.path))
    old, new = str(indexed / "album"), str(indexed / "renamed")
    report = scoped_run(settings, fake_encoder, [indexed], Changes((old, new), moves=((old, new),)))
    assert (report.moved, report.added, report.removed, reads) == (4, 0, 0, [])
    after = catalog_paths(settings, indexed)
    assert after == {p.replace("album/", "renamed/"): i for p, i in before.items()}


def test_an_unreported_rename_is_matched_by_content(indexed, settings, fake_encoder):
    embedded = fake_encoder.images_embedded
    (indexed / "album").rename(indexed / "renamed")
    (indexed / "loose.png").rename(indexed / "renamed" / "loose.png")
    scopes = tuple(str(indexed / p) for p in ("album", "renamed", "loose.png"))
    report = scoped_run(settings, fake_encoder, [indexed], Changes(scopes))
    assert (report.moved, report.added, report.removed) == (5, 0, 0)
    assert fake_encoder.images_embedded == embedded


def test_a_scoped_run_touches_only_its_scopes(indexed, settings, fake_encoder):
    library = Library(settings)
    stamp = library.catalog.roots()[0].last_indexed_at
    library.close()
    (indexed / "album" / "red.png").unlink()
    (indexed / "album" / "green.png").unlink()  # outside the scope: left for a rescan
    (indexed / "album" / "blue.png").unlink()  # deferred: left alone
    make_image(indexed / "album" / "cyan.png", "cyan")
    album = indexed / "album"
    report = scoped_run(settings, fake_encoder, [indexed], Changes(
        (str(album / "red.png"), str(album / "blue.png"), str(album / "cyan.png")), defer=(str(album / "blue.png"),)))
    assert (report.added, report.removed) == (1, 1)
    assert sorted(catalog_paths(settings, indexed)) == [
        "album/blue.png", "album/cyan.png", "album/green.png", "album/yellow.png", "loose.png"]
    library = Library(settings)
    try:
        assert library.catalog.roots()[0].last_indexed_at == stamp  # only whole walks record a root as seen
    finally:
        library.close()


def test_a_scope_under_a_missing_root_removes_nothing(indexed, settings, fake_encoder, tmp_path):
    gone_root = tmp_path / "unmounted"
    report = scoped_run(settings, fake_encoder, [gone_root], Changes((str(gone_root / "x.png"),)))
    assert report.missing_roots == [str(gone_root)]
    report = scoped_run(settings, fake_encoder, [indexed], Changes((str(tmp_path / "elsewhere" / "y.png"),)))
    assert (report.added, report.removed) == (0, 0) and len(catalog_paths(settings, indexed)) == 5


# --- observers ------------------------------------------------------------------------------------------
def start_and_stop(settings, folder, fake_encoder) -> list[str]:
    watcher = Watcher(settings, [folder], encoder=fake_encoder)
    watcher.start()
    try:
        return [type(o).__name__ for o in watcher.observers]
    finally:
        watcher.stop()


def test_native_observer_failing_falls_back_to_polling_and_says_how(tmp_path, settings, fake_encoder, monkeypatch, caplog):
    def exhausted():
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(observers, "Observer", exhausted)
    caplog.set_level(logging.WARNING)
    assert start_and_stop(settings, tmp_path, fake_encoder) == ["PollingObserver"]
    assert "sudo sysctl fs.inotify.max_user_watches=" in caplog.text and "polling instead" in caplog.text


def test_too_few_inotify_watches_for_the_tree_means_polling(tmp_path, settings, fake_encoder, monkeypatch, caplog):
    monkeypatch.setattr(observers, "inotify_shortfall", lambda roots: "9000+ folders to watch, limit 8192")
    caplog.set_level(logging.WARNING)
    assert start_and_stop(settings, tmp_path, fake_encoder) == ["PollingObserver"]
    assert "9000+ folders" in caplog.text and "max_user_watches" in caplog.text


def test_network_shares_are_polled(tmp_path, settings, fake_encoder, monkeypatch):
    monkeypatch.setattr(observers, "filesystem_type", lambda path: "nfs4")
    assert start_and_stop(settings, tmp_path, fake_encoder) == ["PollingObserver"]
    if sys.platform.startswith("linux"):
        monkeypatch.setattr(observers, "filesystem_type", lambda path: "ext4")
        assert start_and_stop(settings, tmp_path, fake_encoder) == ["InotifyObserver"]


@pytest.mark.skipif(not os.path.exists("/proc/self/mountinfo"), reason="Linux only")
def test_file_system_type_and_inotify_headroom_are_read_on_linux(tmp_path):
    assert observers.filesystem_type(str(tmp_path))
    assert observers.inotify_shortfall([str(tmp_path)]) is None


def test_watch_filter(tmp_path):
    root = str(tmp_path / "photos")
    real_library = tmp_path / "elsewhere" / "library"
    real_library.mkdir(parents=True)
    os.makedirs(root)
    os.symlink(real_library, os.path.join(root, "lib-link"))
    wanted = observers.WatchFilter([root], str(real_library), include_hidden=False)
    assert wanted.wants(f"{root}/a/b.JPG", False) and wanted.wants(f"{root}/a", True)
    assert not wanted.wants(f"{root}/a/notes.txt", False)
    assert not wanted.wants(f"{root}/.cache/b.jpg", False) and not wanted.wants(f"{root}/a/.b.jpg", False)
    assert not wanted.wants(f"{root}/lib-link/renditions/t.jpg", False)  # the library, reached through a link
    assert not wanted.wants(str(tmp_path / "other" / "b.jpg"), False)
    assert observers.WatchFilter([root], str(real_library), include_hidden=True).wants(f"{root}/.cache/b.jpg", False)


# --- set-up errors and settings -------------------------------------------------------------------------
def test_nothing_to_watch_is_a_clear_error(tmp_path, settings):
    with pytest.raises(LibraryError, match="no folders to watch") as caught:
        Watcher(settings)
    assert "clipsearch watch" in caught.value.hint
    with pytest.raises(ConfigError, match="not a folder"):
        Watcher(settings, [tmp_path / "missing"])


def test_the_library_reembedded_under_the_watcher_stops_it(indexed, settings, fake_encoder):
    settings = with_overrides(settings, watch_settle_seconds=0.1, watch_rescan_minutes=0)
    watcher = Watcher(settings, encoder=fake_encoder)  # the library's own roots
    watcher.start()
    try:
        deadline = time.monotonic() + 20
        while not watcher.idle and time.monotonic() < deadline:  # the start-up rescan holds the writer lock
            time.sleep(0.05)
        library = Library(settings)
        with library.writer_lock():
            with library.catalog.write() as session:
                library.catalog.set_library_model(session, "other/model", "other", "model", 11)
        library.close()
        make_image(indexed / "new.png", "red")
        deadline = time.monotonic() + 20
        while watcher.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ModelMismatchError, match="other/model"):
            watcher.wait()
    finally:
        watcher.stop()


def test_watch_settings_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={"CLIPSEARCH_WATCH_SETTLE_SECONDS": "0.25", "CLIPSEARCH_WATCH_RESCAN_MINUTES": "0"})
    assert (settings.watch_settle_seconds, settings.watch_rescan_minutes, settings.watch_polling) == (0.25, 0, False)
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="watch_settle_seconds"):
            load_settings(env={"CLIPSEARCH_WATCH_SETTLE_SECONDS": bad})
    with pytest.raises(ConfigError, match="positive"):
        load_settings(env={"CLIPSEARCH_BATCH_SIZE": "0"})  # zero stays refused where it means nothing
