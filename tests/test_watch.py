"""The watcher on real folders with real observers (native inotify and polling) and the fake encoder.

Each test drives the file system the way users do (copy a burst in, delete, rename a folder, write slowly) and
polls the catalog with a deadline; the fake encoder counts every image it embeds, so "no re-embedding" is exact.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.catalog import STATUS_OK
from clipsearch.config import with_overrides
from clipsearch.errors import LibraryBusyError
from clipsearch.indexer.run import index_folders
from clipsearch.indexer.watch import Watcher
from clipsearch.library import Library
from clipsearch.search.searcher import Searcher
from tests.fakes import ColorWordEncoder, make_image

SETTLE = 0.3
OBSERVERS = ["native", "polling"]


def watch_settings(settings, observer: str = "native", **extra):
    """Short settle and poll times, no periodic rescans (the tests restart watchers to rescan)."""
    values = dict(watch_settle_seconds=SETTLE, watch_poll_seconds=0.2, watch_rescan_minutes=0,
                  watch_polling=observer == "polling", batch_size=32)
    return with_overrides(settings, **{**values, **extra})


def wait_for(condition, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def quiet(watcher: Watcher, seconds: float = 0.8, timeout: float = 30) -> None:
    """Wait until the watcher has been idle for `seconds` in a row (late events, e.g. a poll, have come and gone)."""
    deadline = time.monotonic() + timeout
    since = None
    while time.monotonic() < deadline:
        if watcher.error is not None:
            raise watcher.error
        if watcher.idle:
            since = since or time.monotonic()
            if time.monotonic() - since >= seconds:
                return
        else:
            since = None
        time.sleep(0.05)
    raise AssertionError("the watcher never went quiet")


def rows(settings, folder: Path) -> dict:
    """{path: KnownImage} of the catalog rows under a folder."""
    library = Library(settings)
    try:
        return library.catalog.known_under([str(folder)])
    finally:
        library.close()


@contextmanager
def watching(settings, folders, encoder, **kwargs):
    watcher = Watcher(settings, folders, encoder=encoder, **kwargs)
    watcher.start()
    try:
        quiet(watcher, 0.3)
        yield watcher
    finally:
        watcher.stop()
    assert watcher.error is None, watcher.error


@pytest.fixture(scope="session")
def burst_source(tmp_path_factory) -> Path:
    """500 distinct small photos outside every watched folder, to copy in."""
    source = tmp_path_factory.mktemp("burst")
    for n in range(500):
        make_image(source / f"img{n:03d}.png", (n % 250, (n * 7) % 250, (n * 13) % 250), size=(24, 16), noise=n + 1)
    return source


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("observer", OBSERVERS)
def test_burst_of_500_copied_in_is_indexed_once_each(observer, settings, fake_encoder, photos, burst_source):
    settings = watch_settings(settings, observer)
    with watching(settings, [photos], fake_encoder) as watcher:
        target = photos / "phone"
        target.mkdir()
        for source in sorted(burst_source.iterdir()):
            shutil.copyfile(source, target / source.name)
        wait_for(lambda: len(rows(settings, target)) == 500, what="500 rows")
        quiet(watcher)
    found = rows(settings, target)
    assert len(found) == 500 and {r.status for r in found.values()} == {STATUS_OK}
    assert fake_encoder.images_embedded == 500  # each exactly once


@pytest.mark.parametrize("observer", OBSERVERS)
def test_deletions_disappear_from_search(observer, settings, fake_encoder, photos):
    settings = watch_settings(settings, observer)
    for n in range(3):
        make_image(photos / "keep" / f"red{n}.png", "red", noise=n + 1)
        make_image(photos / "drop" / f"red{n}.png", "red", noise=n + 11)
    lonely = make_image(photos / "keep" / "blue.png", "blue", noise=30)
    library = Library(settings)
    searcher = Searcher(library, fake_encoder)
    try:
        with watching(settings, [photos], fake_encoder) as watcher:
            assert str(photos / "drop" / "red0.png") in {hit.path for hit in searcher.search_text("red", 10)}
            shutil.rmtree(photos / "drop")  # a whole folder
            lonely.unlink()  # a single file
            wait_for(lambda: len(rows(settings, photos)) == 3, what="the deleted rows to go")
            quiet(watcher)
            hits = [hit.path for hit in searcher.search_text("red blue", 10)]
    finally:
        library.close()
    assert sorted(hits) == sorted(str(photos / "keep" / f"red{n}.png") for n in range(3))


@pytest.mark.parametrize("observer", OBSERVERS)
def test_renaming_a_folder_of_100_photos_reembeds_nothing(observer, settings, fake_encoder, photos, burst_source):
    settings = watch_settings(settings, observer)
    album = photos / "album"
    album.mkdir()
    for source in sorted(burst_source.iterdir())[:100]:
        shutil.copyfile(source, album / source.name)
    with watching(settings, [photos], fake_encoder) as watcher:  # the start-up rescan indexes the album
        before = {os.path.basename(p): r.id for p, r in rows(settings, album).items()}
        assert len(before) == 100 and fake_encoder.images_embedded == 100
        renamed = photos / "2024 summer"
        album.rename(renamed)
        wait_for(lambda: len(rows(settings, renamed)) == 100, what="paths under the new name")
        quiet(watcher)
    after = {os.path.basename(p): r.id for p, r in rows(settings, renamed).items()}
    assert after == before and not rows(settings, album)  # same rows, same vectors
    assert fake_encoder.images_embedded == 100  # zero re-embeddings


def noisy_png(width: int = 320, height: int = 240) -> bytes:
    pixels = np.random.default_rng(5).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("observer, pause", [("native", SETTLE / 3), ("polling", SETTLE / 3), ("native", SETTLE * 2.5)],
                         ids=["native", "polling", "native-long-pauses"])
def test_file_written_in_slow_chunks_is_indexed_once_complete(observer, pause, settings, fake_encoder, photos):
    # Pauses shorter than the settle time are seen by any observer, even one that looks less often than that (as
    # the defaults poll): size and time must hold still too. Longer pauses only where closes are reported: the
    # native observer waits for the writer to close the file.
    settings = watch_settings(settings, observer, watch_poll_seconds=SETTLE * 2)
    data = noisy_png()
    batches = []
    target = photos / "download.png"
    with watching(settings, [photos], fake_encoder, on_batch=batches.append) as watcher:
        with open(target, "wb") as out:
            chunk = len(data) // max(4, round(4 * SETTLE / pause)) + 1  # writing lasts a few polls
            for start in range(0, len(data), chunk):
                out.write(data[start : start + chunk])
                out.flush()
                time.sleep(pause)
        wait_for(lambda: rows(settings, photos), what="the file's row")
        quiet(watcher)
    row = rows(settings, photos)[str(target)]
    assert row.status == STATUS_OK and row.size == len(data)
    assert fake_encoder.images_embedded == 1
    assert sum(b.report.updated for b in batches) == 0 and not any(b.report.failed for b in batches)
    library = Library(settings)
    try:
        assert (library.catalog.image_by_path(str(target)).width, library.catalog.image_by_path(str(target)).height) == (320, 240)
    finally:
        library.close()


@pytest.mark.parametrize("observer", OBSERVERS)
def test_a_stopped_watcher_catches_up_on_restart(observer, settings, fake_encoder, photos):
    settings = watch_settings(settings, observer)
    make_image(photos / "a" / "red.png", "red", noise=1)
    gone = make_image(photos / "a" / "green.png", "green", noise=2)
    make_image(photos / "b" / "blue.png", "blue", noise=3)
    with watching(settings, [photos], fake_encoder):
        assert len(rows(settings, photos)) == 3
    # While nothing watches: a new photo, a deletion, a renamed folder.
    make_image(photos / "b" / "yellow.png", "yellow", noise=4)
    gone.unlink()
    (photos / "a").rename(photos / "a-renamed")
    with watching(settings, [photos], fake_encoder) as watcher:
        quiet(watcher)
    assert sorted(os.path.relpath(p, photos) for p in rows(settings, photos)) == [
        "a-renamed/red.png", "b/blue.png", "b/yellow.png"]
    assert fake_encoder.images_embedded == 4  # the renamed photo kept its vector


class SlowEncoder(ColorWordEncoder):
    """Takes its time per batch, so a stop lands in the middle of a burst."""

    def encode_images(self, batch):
        time.sleep(0.05)
        return super().encode_images(batch)


def test_stop_mid_burst_leaves_a_consistent_catalog_and_restart_finishes(settings, photos, burst_source):
    settings = watch_settings(settings, "native", batch_size=8)
    fake_encoder = SlowEncoder()
    watcher = Watcher(settings, [photos], encoder=fake_encoder)
    watcher.start()
    quiet(watcher, 0.3)
    for source in sorted(burst_source.iterdir())[:200]:
        shutil.copyfile(source, photos / source.name)
    wait_for(lambda: fake_encoder.images_embedded > 0, what="the first batch")
    watcher.stop()
    assert watcher.error is None
    library = Library(settings)
    try:
        counts = library.catalog.counts()
        known = library.catalog.known_under([str(photos)])
    finally:
        library.close()
    assert counts["images"] == counts["embeddings"] == len(known) < 200  # whole rows only, each with its vector
    assert all(os.path.exists(path) for path in known)
    with watching(settings, [photos], fake_encoder) as watcher:
        quiet(watcher)
    assert len(rows(settings, photos)) == 200 and fake_encoder.images_embedded == 200


class GatedEncoder(ColorWordEncoder):
    """Blocks in encode_images while its gate is closed, so a test can act while a batch is being applied."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def encode_images(self, batch):
        self.entered.set()
        assert self.gate.wait(30)
        return super().encode_images(batch)


def test_one_writer_at_a_time_with_clear_messages(settings, photos, caplog):
    settings = watch_settings(settings)
    encoder = GatedEncoder()
    with watching(settings, [photos], encoder) as watcher:
        # The watcher is applying a batch: `clipsearch index` is refused, naming the watcher.
        encoder.gate.clear()
        make_image(photos / "red.png", "red")
        assert encoder.entered.wait(10)
        with pytest.raises(LibraryBusyError, match=r"\(watch\)") as refused:
            index_folders(settings, [photos], encoder=ColorWordEncoder())
        assert "watcher" in refused.value.hint and "try again" in refused.value.hint
        encoder.gate.set()
        quiet(watcher)
        # Between batches the library is free for `clipsearch index`...
        make_image(photos / "green.png", "green")
        wait_for(lambda: str(photos / "green.png") in rows(settings, photos), what="the green photo")
        quiet(watcher)
        assert index_folders(settings, [photos], encoder=ColorWordEncoder()).unchanged == 2
        # ...and while another writer holds it, the watcher waits, says so, and applies the changes afterwards.
        caplog.set_level(logging.WARNING, logger="clipsearch.indexer.watch")
        library = Library(settings)
        try:
            with library.writer_lock():
                make_image(photos / "blue.png", "blue")
                wait_for(lambda: "waiting for it to finish" in caplog.text, what="the waiting message")
                assert str(photos / "blue.png") not in rows(settings, photos)
        finally:
            library.close()
        wait_for(lambda: str(photos / "blue.png") in rows(settings, photos), what="the blue photo")
        quiet(watcher)
    assert len(rows(settings, photos)) == 3


def test_what_is_not_a_photo_is_ignored(settings, fake_encoder, photos):
    # The library inside a watched folder (thumbnails are images too), hidden files, temporary download names.
    settings = watch_settings(settings, data_dir=photos / "library")
    with watching(settings, [photos], fake_encoder) as watcher:
        make_image(photos / "library" / "renditions" / "thumb.jpg", "red")
        make_image(photos / ".hidden.png", "red")
        make_image(photos / ".trash" / "old.png", "red")
        make_image(photos / "notes.txt.png", "red").rename(photos / "notes.txt")
        partial = make_image(photos / "download.jpg.part", "red", fmt="JPEG")
        partial.rename(photos / "download.jpg")  # the browser's final rename
        wait_for(lambda: rows(settings, photos), what="the download")
        quiet(watcher)
    assert list(rows(settings, photos)) == [str(photos / "download.jpg")]
    assert fake_encoder.images_embedded == 1


def test_an_empty_placeholder_waits_for_its_content(settings, fake_encoder, photos):
    # Browsers create an empty file under the final name, then write or rename the real one over it.
    settings = watch_settings(settings)
    batches = []
    with watching(settings, [photos], fake_encoder, on_batch=batches.append) as watcher:
        placeholder = photos / "photo.png"
        placeholder.touch()
        time.sleep(SETTLE * 3)
        assert not rows(settings, photos)
        make_image(photos / "photo.png.part", "red", fmt="PNG").replace(placeholder)
        wait_for(lambda: rows(settings, photos), what="the photo")
        quiet(watcher)
    assert fake_encoder.images_embedded == 1 and not any(b.report.failed for b in batches)
