"""Indexing: incremental, moves keep vectors, bad files reported, model mismatch refused, store in sync."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipsearch.catalog import STATUS_FAILED
from clipsearch.config import with_overrides
from clipsearch.errors import LibraryBusyError, ModelMismatchError
from clipsearch.indexer.run import index_folders
from clipsearch.library import Library
from tests.fakes import ColorWordEncoder, make_image

pytestmark = pytest.mark.both_catalogs  # also on PostgreSQL (see tests/conftest.py)


def colours(folder: Path, names=("red", "green", "blue", "yellow", "white", "black")) -> dict[str, Path]:
    return {name: make_image(folder / f"{name}.png", name) for name in names}


def library_state(settings) -> dict:
    library = Library(settings)
    try:
        catalog = library.catalog
        store = library.open_store()
        known = catalog.known_under([str(r.path) for r in catalog.roots()] or ["/"])
        return {
            "paths": sorted(known),
            "ids": {p: k.id for p, k in known.items()},
            "failed": {p for p, k in known.items() if k.status == STATUS_FAILED},
            "vectors": store.count if store else 0,
            "embeddings": catalog.counts()["embeddings"],
        }
    finally:
        library.close()


def test_first_run_then_nothing_to_do(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    colours(photos)
    make_image(photos / "sub" / "deeper" / "cyan.jpg", "cyan")
    report = index_folders(settings, [photos], encoder=fake_encoder)
    assert (report.added, report.failed, report.embedded) == (7, [], 7)
    assert report.vectors == 7
    again = index_folders(settings, [photos], encoder=fake_encoder)
    assert (again.added, again.updated, again.unchanged, again.embedded) == (0, 0, 7, 0)
    assert fake_encoder.images_embedded == 7


def test_modify_rename_move_delete_round_trip(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    files = colours(photos)
    index_folders(settings, [photos], encoder=fake_encoder)
    before = library_state(settings)
    embedded = fake_encoder.images_embedded

    make_image(files["red"], "orange")                           # modified in place
    files["green"].rename(photos / "renamed-green.png")          # renamed
    (photos / "album").mkdir()
    files["blue"].rename(photos / "album" / "blue.png")          # moved into a subfolder
    files["black"].unlink()                                      # deleted
    os.utime(files["white"], ns=(1, 1))                          # touched, same bytes
    report = index_folders(settings, [photos], encoder=fake_encoder)

    assert (report.updated, report.moved, report.removed, report.added) == (1, 2, 1, 0)
    assert fake_encoder.images_embedded == embedded + 1  # only the modified file was re-embedded
    after = library_state(settings)
    assert after["ids"][str(photos / "renamed-green.png")] == before["ids"][str(files["green"])]
    assert after["ids"][str(photos / "album" / "blue.png")] == before["ids"][str(files["blue"])]
    assert after["ids"][str(files["red"])] == before["ids"][str(files["red"])]
    assert str(files["black"]) not in after["ids"]
    assert after["vectors"] == after["embeddings"] == 5 == len(after["paths"])


def test_move_between_indexed_folders_keeps_vector(tmp_path, settings, fake_encoder):
    a, b = tmp_path / "a", tmp_path / "b"
    make_image(a / "red.png", "red")
    make_image(b / "blue.png", "blue")
    index_folders(settings, [a, b], encoder=fake_encoder)
    old_id = library_state(settings)["ids"][str(a / "red.png")]
    shutil.move(a / "red.png", b / "red.png")
    embedded = fake_encoder.images_embedded
    report = index_folders(settings, [b], encoder=fake_encoder)  # only the destination is re-indexed
    assert report.moved == 1 and fake_encoder.images_embedded == embedded
    state = library_state(settings)
    assert state["ids"][str(b / "red.png")] == old_id and str(a / "red.png") not in state["ids"]


def test_duplicate_copies_each_get_a_row(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    red = make_image(photos / "red.png", "red")
    index_folders(settings, [photos], encoder=fake_encoder)
    shutil.copy(red, photos / "copy1.png")
    shutil.copy(red, photos / "copy2.png")
    red.unlink()
    report = index_folders(settings, [photos], encoder=fake_encoder)
    assert report.moved == 1 and report.added == 1 and report.removed == 0
    state = library_state(settings)
    assert len(state["paths"]) == 2 and state["vectors"] == 2


def test_bad_files_are_reported_and_never_stop_the_run(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    colours(photos, ("red", "blue"))
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not an image")
    good = (photos / "red.png").read_bytes()
    (photos / "truncated.png").write_bytes(good[: len(good) // 2])
    make_image(photos / "huge.png", "green", size=(400, 400))
    strict = with_overrides(settings, max_image_pixels=100_000)
    report = index_folders(strict, [photos], encoder=fake_encoder)
    reasons = dict((Path(p).name, r) for p, r in report.failed)
    assert set(reasons) == {"empty.jpg", "text.png", "truncated.png", "huge.png"}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.png"] and "too large" in reasons["huge.png"]
    assert report.added == 2
    state = library_state(strict)
    assert len(state["failed"]) == 4 and state["vectors"] == 2
    # Failed files are not retried until they change, then they are.
    assert index_folders(strict, [photos], encoder=fake_encoder).failed == []
    make_image(photos / "text.png", "white", fmt="PNG")
    report = index_folders(strict, [photos], encoder=fake_encoder)
    assert report.updated == 1 and library_state(strict)["vectors"] == 3


def test_hidden_folders_data_dir_and_symlink_loops(tmp_path, fake_encoder):
    from clipsearch.config import load_settings

    photos = tmp_path / "photos"
    make_image(photos / "red.png", "red")
    make_image(photos / ".hidden" / "blue.png", "blue")
    make_image(photos / ".secret.png", "blue")
    (photos / "loop").symlink_to(photos, target_is_directory=True)
    (photos / "nested").mkdir()
    (photos / "nested" / "back").symlink_to(photos / "nested", target_is_directory=True)
    settings = load_settings({"data_dir": photos / "library", "model": "test-colors", "pretrained": "v1"}, env={})
    report = index_folders(settings, [photos], encoder=fake_encoder)
    make_image(photos / "library" / "thumb.png", "green")  # inside the library's own folder
    assert report.added == 1
    assert index_folders(settings, [photos], encoder=fake_encoder).added == 0
    with_hidden = with_overrides(settings, include_hidden=True)
    assert index_folders(with_hidden, [photos], encoder=fake_encoder).added == 2


def test_missing_root_removes_nothing(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    colours(photos, ("red",))
    index_folders(settings, [photos], encoder=fake_encoder)
    shutil.rmtree(photos)
    report = index_folders(settings, [photos], encoder=fake_encoder)
    assert report.missing_roots == [str(photos)] and report.removed == 0
    assert library_state(settings)["vectors"] == 1


def test_model_mismatch_is_refused_unless_reembed(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    colours(photos, ("red", "blue"))
    index_folders(settings, [photos], encoder=fake_encoder)
    other = with_overrides(settings, pretrained="v2")
    with pytest.raises(ModelMismatchError, match="test-colors/v1") as caught:
        index_folders(other, [photos])
    assert "--reembed" in caught.value.hint
    report = index_folders(other, [photos], reembed=True)
    assert report.updated == 2 and report.model_id == "test-colors/v2"
    from dataclasses import replace

    library = Library(replace(settings, explicit=frozenset({"data_dir"})))  # no explicit model: the library's own
    assert library.resolve_model() == ("test-colors", "v2")
    library.close()


def test_vanished_mid_run_is_reported_without_a_row(tmp_path, settings):
    photos = tmp_path / "photos"
    files = colours(photos, ("red", "blue", "green"))

    class VanishingEncoder(ColorWordEncoder):
        def preprocess(self, image):
            files["green"].unlink(missing_ok=True)
            return super().preprocess(image)

    with_one_worker = with_overrides(settings, workers=1, batch_size=1)
    report = index_folders(with_one_worker, [photos], encoder=VanishingEncoder())
    assert ("vanished" in " ".join(r for _, r in report.failed)) or report.added == 3
    state = library_state(with_one_worker)
    assert len(state["paths"]) == state["vectors"] == report.added


def test_one_writer_at_a_time(tmp_path, settings, fake_encoder):
    library = Library(settings)
    with library.writer_lock():
        with pytest.raises(LibraryBusyError, match="pid"):
            index_folders(settings, [tmp_path], encoder=fake_encoder)
    library.close()


def test_stop_request_is_clean_and_resumable(tmp_path, settings, fake_encoder):
    import threading

    photos = tmp_path / "photos"
    for n in range(30):
        make_image(photos / f"{n:02d}.png", "red", noise=n + 1)
    stop = threading.Event()

    class StoppingProgress:
        def start(self, total):
            pass

        def advance(self, count=1):
            self.seen = getattr(self, "seen", 0) + count
            if self.seen == 10:
                stop.set()

        def failed(self, path, reason):
            pass

    report = index_folders(settings, [photos], encoder=fake_encoder, progress=StoppingProgress(), stop=stop)
    assert report.interrupted and 0 < report.added < 30
    report = index_folders(settings, [photos], encoder=fake_encoder)
    assert not report.interrupted
    state = library_state(settings)
    assert len(state["paths"]) == state["vectors"] == state["embeddings"] == 30


def test_vectors_match_a_fresh_embedding(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    files = colours(photos, ("red", "magenta"))
    index_folders(settings, [photos], encoder=fake_encoder)
    library = Library(settings)
    row = library.catalog.image_by_path(str(files["magenta"]))
    stored = library.catalog.vector_of(row.id, fake_encoder.model_id)
    from PIL import Image

    expected = fake_encoder.encode_images([fake_encoder.preprocess(Image.open(files["magenta"]))])[0]
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    assert (row.width, row.height, row.format) == (64, 48, "PNG")
    library.close()


def test_undecodable_file_name_is_reported_not_fatal(tmp_path, settings, fake_encoder):
    photos = tmp_path / "photos"
    make_image(photos / "red.png", "red")
    bad_name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes on a UTF-8 system
    shutil.copy(photos / "red.png", photos / bad_name)
    report = index_folders(settings, [photos], encoder=fake_encoder)
    assert report.added == 1
    assert any("UTF-8" in reason for _, reason in report.walk_errors)
