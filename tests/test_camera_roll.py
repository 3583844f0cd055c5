"""The real camera roll (../shared/datasets/camera_roll): every file indexes or is reported with a reason."""

from __future__ import annotations

import csv
from pathlib import Path


from clipsearch.indexer.run import index_folders
from clipsearch.library import Library


def test_every_camera_roll_file_indexes_or_is_reported(shared_datasets, settings, fake_encoder):
    roll = shared_datasets / "camera_roll"
    with open(roll / "manifest.csv", newline="") as handle:
        manifest = {row["relative_path"]: row for row in csv.DictReader(handle)}
    report = index_folders(settings, [roll], encoder=fake_encoder)
    failed = {str(Path(p).relative_to(roll)): reason for p, reason in report.failed}
    assert all(reason for reason in failed.values())
    assert report.added + len(failed) == len(manifest)
    # The manifest says every file decodes with Pillow + pillow-heif.
    expected_failures = {p for p, row in manifest.items() if row["decode_error"]}
    assert set(failed) == expected_failures

    library = Library(settings)
    try:
        rows = library.catalog.known_under([str(roll)])
        assert {str(Path(p).relative_to(roll)) for p in rows} == set(manifest)
        formats = {}
        for relative, row in manifest.items():
            image = library.catalog.image_by_path(str(roll / relative))
            formats[row["format"]] = formats.get(row["format"], 0) + 1
            if relative.startswith("exif_orientation/"):
                name = Path(relative).name
                # After applying EXIF orientation, Landscape photos are wider than tall, Portrait ones taller.
                if name.startswith("Landscape"):
                    assert image.width > image.height, relative
                elif name.startswith("Portrait"):
                    assert image.height > image.width, relative
        assert {"JPEG", "PNG", "WEBP", "TIFF", "AVIF"} <= set(formats)
        assert any(f.startswith("HEI") for f in formats)
        store = library.open_store()
        assert store.count == report.added
    finally:
        library.close()
