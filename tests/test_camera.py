"""Tests for clipsearch.camera.camera_info: EXIF camera basics for people, never an exception."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

import clipsearch.camera as camera
from clipsearch.camera import camera_info

KEYS = {"camera", "lens", "aperture", "exposure", "iso", "focal_length", "taken", "software", "gps"}
Base, IFD = ExifTags.Base, ExifTags.IFD


def write(path: Path, ifd0=None, exif_ifd=None, gps=None, fmt: str | None = None, image=None) -> Path:
    """A small image whose EXIF holds the given IFD0, Exif IFD and GPS IFD tags."""
    exif = Image.Exif()
    for tag, value in (ifd0 or {}).items():
        exif[tag] = value
    if exif_ifd:
        sub = exif.get_ifd(IFD.Exif)
        sub.update(exif_ifd)
    if gps:
        sub = exif.get_ifd(IFD.GPSInfo)
        sub.update(gps)
    (image or Image.new("RGB", (32, 24), (90, 120, 200))).save(path, format=fmt, exif=exif)
    return path


FULL_IFD0 = {Base.Make: "Canon", Base.Model: "Canon EOS R5", Base.Software: "Firmware Version 1.8.1"}
FULL_EXIF = {
    Base.FNumber: IFDRational(28, 10),
    Base.ExposureTime: IFDRational(1, 250),
    Base.ISOSpeedRatings: 400,
    Base.FocalLength: IFDRational(35, 1),
    Base.FocalLengthIn35mmFilm: 52,
    Base.DateTimeOriginal: "2021:06:04 13:22:10",
    Base.LensModel: "RF24-105mm F4 L IS USM",
}
PARIS = {
    1: "N", 2: (IFDRational(48, 1), IFDRational(51, 1), IFDRational(2994, 100)),
    3: "E", 4: (IFDRational(2, 1), IFDRational(17, 1), IFDRational(40, 1)),
}


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_full_exif(tmp_path, ext):
    info = camera_info(write(tmp_path / f"a.{ext}", FULL_IFD0, FULL_EXIF, PARIS))
    assert info == {
        "camera": "Canon EOS R5",
        "lens": "RF24-105mm F4 L IS USM",
        "aperture": "f/2.8",
        "exposure": "1/250 s",
        "iso": "ISO 400",
        "focal_length": "35 mm (52 mm equiv.)",
        "taken": "2021-06-04 13:22:10",
        "software": "Firmware Version 1.8.1",
        "gps": "48.85832, 2.29444",
    }


def test_tiff_tags(tmp_path):
    # Pillow's TIFF writer keeps IFD0 tags but drops the Exif sub-IFD; real TIFFs are read in the camera roll test.
    path = write(tmp_path / "a.tif", {**FULL_IFD0, Base.DateTime: "2020:02:03 04:05:06"})
    assert camera_info(path) == {"camera": "Canon EOS R5", "software": "Firmware Version 1.8.1",
                                 "taken": "2020-02-03 04:05:06"}


def test_accepts_path_objects_and_strings(tmp_path):
    path = write(tmp_path / "a.jpg", FULL_IFD0)
    expected = {"camera": "Canon EOS R5", "software": "Firmware Version 1.8.1"}
    assert camera_info(path) == camera_info(str(path)) == expected


@pytest.mark.parametrize(
    "make, model, expected",
    [
        ("Canon", "Canon EOS 40D", "Canon EOS 40D"),
        ("Canon\x00\x00  ", "  Canon EOS 40D\x00", "Canon EOS 40D"),
        ("NIKON CORPORATION", "NIKON D850", "NIKON D850"),
        ("EASTMAN KODAK COMPANY", "KODAK CX7530 ZOOM DIGITAL CAMERA", "KODAK CX7530 ZOOM DIGITAL CAMERA"),
        ("OLYMPUS IMAGING CORP.", "E-M5MarkII", "OLYMPUS E-M5MarkII"),
        ("Apple", "iPhone 15 Pro", "Apple iPhone 15 Pro"),
        ("FUJIFILM", "X-T4", "FUJIFILM X-T4"),
        ("Jolla", "Jolla", "Jolla"),
        ("", "Pixel 8", "Pixel 8"),
        ("SONY", None, "SONY"),
        ("\x01\x02", "----", None),
    ],
)
def test_camera_name(tmp_path, make, model, expected):
    ifd0 = {Base.Make: make}
    if model is not None:
        ifd0[Base.Model] = model
    assert camera_info(write(tmp_path / "a.jpg", ifd0)).get("camera") == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (IFDRational(1, 250), "1/250 s"),
        (IFDRational(10, 2500), "1/250 s"),
        (IFDRational(1, 8000), "1/8000 s"),
        (IFDRational(1, 3), "1/3 s"),
        (IFDRational(1, 2), "1/2 s"),
        (IFDRational(4, 10), "0.4 s"),
        (IFDRational(8, 10), "0.8 s"),
        (IFDRational(1, 1), "1 s"),
        (IFDRational(3, 2), "1.5 s"),
        (IFDRational(2, 1), "2 s"),
        (IFDRational(30, 1), "30 s"),
    ],
)
def test_exposure(tmp_path, value, expected):
    assert camera_info(write(tmp_path / "a.jpg", exif_ifd={Base.ExposureTime: value}))["exposure"] == expected


@pytest.mark.parametrize(
    "exif_ifd, key, expected",
    [
        ({Base.FNumber: IFDRational(18, 10)}, "aperture", "f/1.8"),
        ({Base.FNumber: IFDRational(11, 1)}, "aperture", "f/11"),
        ({Base.FNumber: IFDRational(56, 10)}, "aperture", "f/5.6"),
        ({Base.ApertureValue: IFDRational(3, 1)}, "aperture", "f/2.8"),  # APEX when FNumber is missing
        ({Base.ShutterSpeedValue: IFDRational(8, 1)}, "exposure", "1/256 s"),
        ({Base.FocalLength: IFDRational(425, 100), Base.FocalLengthIn35mmFilm: 26}, "focal_length",
         "4.25 mm (26 mm equiv.)"),
        ({Base.FocalLength: IFDRational(50, 1), Base.FocalLengthIn35mmFilm: 50}, "focal_length", "50 mm"),
        ({Base.FocalLength: IFDRational(1056, 10)}, "focal_length", "105.6 mm"),
        ({Base.ISOSpeedRatings: (100, 200)}, "iso", "ISO 100"),
        ({Base.FNumber: (IFDRational(28, 10), IFDRational(40, 10))}, "aperture", "f/2.8"),
        ({Base.DateTimeOriginal: "0000:00:00 00:00:00", Base.DateTimeDigitized: "2020:01:02 03:04:05"},
         "taken", "2020-01-02 03:04:05"),
        ({Base.DateTimeOriginal: "2019-12-31T23:59:58"}, "taken", "2019-12-31 23:59:58"),
        ({Base.LensModel: "EF50mm f/1.8 STM\x00\x00\x00"}, "lens", "EF50mm f/1.8 STM"),
    ],
)
def test_field_formats(tmp_path, exif_ifd, key, expected):
    assert camera_info(write(tmp_path / "a.jpg", exif_ifd=exif_ifd)).get(key) == expected


def test_zero_denominators_and_nonsense_values_are_left_out(tmp_path):
    exif_ifd = {
        Base.FNumber: IFDRational(28, 0),
        Base.ExposureTime: IFDRational(1, 0),
        Base.FocalLength: IFDRational(0, 0),
        Base.FocalLengthIn35mmFilm: 0,
        Base.ISOSpeedRatings: 0,
        Base.DateTimeOriginal: "not a date",
        Base.LensModel: "   ",
    }
    gps = {1: "N", 2: (IFDRational(0, 0), IFDRational(0, 0), IFDRational(0, 0)), 3: "E", 4: (0.0, 0.0, 0.0)}
    info = camera_info(write(tmp_path / "a.jpg", {Base.Make: "Canon", Base.Model: "EOS R"}, exif_ifd, gps))
    assert info == {"camera": "Canon EOS R"}


def test_zero_focal_length_keeps_the_rest(tmp_path):
    info = camera_info(write(tmp_path / "a.jpg", exif_ifd={Base.FocalLength: IFDRational(0, 1),
                                                           Base.FNumber: IFDRational(4, 1)}))
    assert info == {"aperture": "f/4"}


@pytest.mark.parametrize(
    "gps, expected",
    [
        (PARIS, "48.85832, 2.29444"),
        ({**PARIS, 1: "S", 3: "W"}, "-48.85832, -2.29444"),
        ({**PARIS, 1: "S\x00"}, "-48.85832, 2.29444"),
        ({1: "N", 2: IFDRational(4885832, 100000), 3: "E", 4: IFDRational(229444, 100000)}, "48.85832, 2.29444"),
        ({**PARIS, 2: (IFDRational(95, 1), IFDRational(0, 1), IFDRational(0, 1))}, None),  # latitude > 90
        ({**PARIS, 1: "X"}, None),
        ({1: "N", 2: PARIS[2]}, None),  # no longitude
        ({**PARIS, 4: (IFDRational(2, 1), IFDRational(17, 0), IFDRational(40, 1))}, None),
        ({1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)}, None),  # cameras without a fix write zeros
    ],
)
def test_gps(tmp_path, gps, expected):
    assert camera_info(write(tmp_path / "a.jpg", gps=gps)).get("gps") == expected


def test_no_exif(tmp_path):
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (10, 10)).save(path)
    assert camera_info(path) == {}


@pytest.mark.parametrize("content", [None, b"", b"hello, not an image", b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00II*\x00"])
def test_missing_empty_and_non_image_files(tmp_path, content):
    path = tmp_path / "photo.jpg"
    if content is not None:
        path.write_bytes(content)
    assert camera_info(path) == {}
    assert camera_info(tmp_path) == {}  # a folder


def test_garbage_exif_block(tmp_path):
    path = tmp_path / "garbage.jpg"
    blob = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00" + bytes(range(256)) * 2
    Image.new("RGB", (10, 10)).save(path, exif=blob)
    info = camera_info(path)
    assert isinstance(info, dict) and set(info) <= KEYS


def test_truncated_pixels_still_give_the_exif(tmp_path):
    noisy = Image.effect_noise((400, 300), 60).convert("RGB")
    path = write(tmp_path / "a.jpg", FULL_IFD0, FULL_EXIF, image=noisy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert camera_info(path)["camera"] == "Canon EOS R5"


def test_unexpected_errors_are_swallowed(tmp_path, monkeypatch):
    path = write(tmp_path / "a.jpg", FULL_IFD0, FULL_EXIF)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(camera, "_aperture", broken)
    info = camera_info(path)
    assert "aperture" not in info and info["camera"] == "Canon EOS R5"
    monkeypatch.setattr(camera.Image, "open", broken)
    assert camera_info(path) == {}


# --- the real camera roll ---------------------------------------------------------------------------


def test_camera_roll_never_raises(shared_datasets):
    roll = shared_datasets / "camera_roll"
    with open(roll / "manifest.csv", newline="") as handle:
        manifest = [row["relative_path"] for row in csv.DictReader(handle)]
    results = {relative: camera_info(roll / relative) for relative in manifest}
    for relative, info in results.items():
        assert set(info) <= KEYS, relative
        assert all(isinstance(v, str) and v and v == v.strip() and "\x00" not in v for v in info.values()), relative
    # Files known to carry these facts.
    gps_files = [r for r in manifest if r.startswith("exif_samples/jpg__gps__")]
    assert gps_files and all("gps" in results[r] for r in gps_files)
    assert results["exif_samples/jpg__Canon_40D.jpg"]["camera"] == "Canon EOS 40D"
    assert results["exif_samples/jpg__Nikon_D70.jpg"]["focal_length"] == "100 mm (150 mm equiv.)"
    iphone = results["exif_samples/heic__IMG_5195.HEIC"]  # HEIC through pillow_heif
    assert iphone["camera"] == "Apple iPhone 11 Pro Max"
    assert iphone["taken"] == "2021-04-11 15:47:53"
    assert iphone["aperture"] == "f/1.8" and iphone["iso"] == "ISO 32"
    assert sum(bool(info) for info in results.values()) >= 50
