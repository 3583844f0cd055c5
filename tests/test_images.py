"""Tests for clipsearch.images: formats, EXIF orientation and dates, mode conversion, drafting, errors."""

from __future__ import annotations

import csv
import io
import os
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.errors import ImageDecodeError
from clipsearch.images import (
    SUPPORTED_EXTENSIONS,
    ImageInfo,
    open_image,
    read_image_bytes,
    register_image_formats,
)

CAP = 100_000_000
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def close_to(pixel, expected, tol=40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


def check_rgb(img: Image.Image, info: ImageInfo, size: tuple[int, int], fmt: str) -> None:
    assert img.mode == "RGB"
    assert img.size == size == (info.width, info.height)
    assert info.format == fmt


def noisy(size=(200, 150), seed=0) -> Image.Image:
    rnd = random.Random(seed)
    return Image.frombytes("RGB", size, bytes(rnd.getrandbits(8) for _ in range(size[0] * size[1] * 3)))


def jpeg_with_exif(path: Path, exif: Image.Exif, img: Image.Image | None = None) -> Path:
    (img or Image.new("RGB", (60, 40), BLUE)).save(path, "JPEG", quality=95, exif=exif)
    return path


def test_supported_extensions():
    expected = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                ".heic", ".heif", ".hif", ".avif"}
    assert SUPPORTED_EXTENSIONS == frozenset(expected)


def test_register_is_idempotent():
    register_image_formats()
    register_image_formats()
    assert "HEIF" in Image.registered_extensions().values()
    assert Image.registered_extensions().get(".avif") == "AVIF"


# Where the stored top-left corner is displayed, per orientation (x_right, y_bottom), and whether sides swap.
ORIENTATIONS = {
    1: ((0, 0), False), 2: ((1, 0), False), 3: ((1, 1), False), 4: ((0, 1), False),
    5: ((0, 0), True), 6: ((1, 0), True), 7: ((1, 1), True), 8: ((0, 1), True),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation(tmp_path, orientation):
    img = Image.new("RGB", (60, 40), BLUE)
    img.paste(RED, (0, 0, 16, 12))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = jpeg_with_exif(tmp_path / f"o{orientation}.jpg", exif, img)
    out, info = open_image(path, max_pixels=CAP)
    (right, bottom), swapped = ORIENTATIONS[orientation]
    size = (40, 60) if swapped else (60, 40)
    check_rgb(out, info, size, "JPEG")
    assert info.orientation == orientation
    w, h = size
    corner = (w - 4 if right else 3, h - 4 if bottom else 3)
    assert close_to(out.getpixel(corner), RED), (corner, out.getpixel(corner))
    # the opposite corner is blue
    assert close_to(out.getpixel((3 if right else w - 4, 3 if bottom else h - 4)), BLUE)


@pytest.mark.parametrize(
    "fmt, ext, pillow_format",
    [("PNG", "png", "PNG"), ("WEBP", "webp", "WEBP"), ("BMP", "bmp", "BMP"), ("TIFF", "tif", "TIFF"),
     ("GIF", "gif", "GIF"), ("HEIF", "heic", "HEIF"), ("AVIF", "avif", "AVIF"), ("JPEG", "jpg", "JPEG")],
)
def test_formats(tmp_path, fmt, ext, pillow_format):
    register_image_formats()  # pillow_heif's saver for HEIF
    img = Image.new("RGB", (64, 48), GREEN)
    img.paste(RED, (0, 0, 32, 48))
    path = tmp_path / f"img.{ext}"
    img.save(path, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP", "HEIF", "AVIF") else {}))
    out, info = open_image(path, max_pixels=CAP)
    check_rgb(out, info, (64, 48), pillow_format)
    assert close_to(out.getpixel((8, 24)), RED) and close_to(out.getpixel((56, 24)), GREEN)
    assert info.taken_at is None
    # bytes work as well as paths, and give the same answer
    out2, info2 = open_image(path.read_bytes(), max_pixels=CAP)
    assert info2 == info and out2.tobytes() == out.tobytes()


def test_rgba_png_transparency_becomes_white(tmp_path):
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 10, 20))
    img.save(tmp_path / "a.png")
    out, _ = open_image(tmp_path / "a.png", max_pixels=CAP)
    assert out.mode == "RGB" and out.getpixel((15, 5)) == WHITE and out.getpixel((5, 5)) == RED


def test_la_alpha_becomes_white():
    img = Image.new("LA", (20, 20), (0, 0))
    img.paste((0, 255), (0, 0, 10, 20))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out, _ = open_image(buf.getvalue(), max_pixels=CAP)
    assert out.getpixel((15, 5)) == WHITE and out.getpixel((5, 5)) == (0, 0, 0)


def test_palette_gif_transparency_becomes_white(tmp_path):
    img = Image.new("P", (20, 20), 1)
    img.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 10, 20))
    img.save(tmp_path / "t.gif", transparency=1)
    out, info = open_image(tmp_path / "t.gif", max_pixels=CAP)
    check_rgb(out, info, (20, 20), "GIF")
    assert out.getpixel((5, 5)) == RED and out.getpixel((15, 5)) == WHITE


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out, info = open_image(tmp_path / "anim.gif", max_pixels=CAP)
    check_rgb(out, info, (16, 16), "GIF")
    assert close_to(out.getpixel((8, 8)), RED, tol=10)


def test_animated_webp_and_multi_image_heic_give_first(tmp_path):
    register_image_formats()
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "multi.heic", format="HEIF", save_all=True, append_images=frames[1:])
    for name in ("anim.webp", "multi.heic"):
        out, _ = open_image(tmp_path / name, max_pixels=CAP)
        assert close_to(out.getpixel((16, 16)), RED), name


def test_multipage_tiff_gives_first_page(tmp_path):
    pages = [Image.new("RGB", (16, 16), c) for c in (BLUE, RED)]
    pages[0].save(tmp_path / "multi.tif", save_all=True, append_images=pages[1:])
    out, _ = open_image(tmp_path / "multi.tif", max_pixels=CAP)
    assert out.getpixel((8, 8)) == BLUE


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(tmp_path, fmt):
    path = tmp_path / f"cmyk.{fmt.lower()}"
    Image.new("CMYK", (24, 24), (255, 0, 0, 0)).save(path, fmt)  # pure cyan
    out, info = open_image(path, max_pixels=CAP)
    check_rgb(out, info, (24, 24), fmt)
    assert close_to(out.getpixel((12, 12)), (0, 255, 255), tol=10)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    img = Image.new("I;16", (32, 8), 32768)
    img.paste(65535, (0, 0, 8, 8))
    img.paste(0, (24, 0, 32, 8))
    img.save(tmp_path / "g16.png")
    out, info = open_image(tmp_path / "g16.png", max_pixels=CAP)
    check_rgb(out, info, (32, 8), "PNG")
    assert close_to(out.getpixel((16, 4)), (128, 128, 128), tol=2)
    assert out.getpixel((4, 4)) == WHITE and out.getpixel((28, 4)) == (0, 0, 0)


def test_float_and_greyscale_modes(tmp_path):
    Image.new("F", (8, 8), 0.5).save(tmp_path / "f.tif")
    out, _ = open_image(tmp_path / "f.tif", max_pixels=CAP)
    assert close_to(out.getpixel((4, 4)), (128, 128, 128), tol=2)
    for mode, value in (("L", 200), ("1", 1)):
        Image.new(mode, (8, 8), value).save(tmp_path / f"{mode}.png")
        out, _ = open_image(tmp_path / f"{mode}.png", max_pixels=CAP)
        assert out.mode == "RGB" and out.getpixel((4, 4)) == ((200,) * 3 if mode == "L" else WHITE)


def test_exif_dates(tmp_path):
    exif = Image.Exif()
    exif[0x0132] = "2000:01:01 00:00:00"
    sub = exif.get_ifd(0x8769)
    sub[0x9004] = "2021:07:04 15:31:00"
    sub[0x9003] = "2021:07:04 15:30:00"
    _, info = open_image(jpeg_with_exif(tmp_path / "orig.jpg", exif), max_pixels=CAP)
    assert info.taken_at == datetime(2021, 7, 4, 15, 30, 0) and info.taken_at.tzinfo is None
    del sub[0x9003]
    _, info = open_image(jpeg_with_exif(tmp_path / "digitized.jpg", exif), max_pixels=CAP)
    assert info.taken_at == datetime(2021, 7, 4, 15, 31, 0)
    only_ifd0 = Image.Exif()
    only_ifd0[0x0132] = "2000:01:02 03:04:05"
    _, info = open_image(jpeg_with_exif(tmp_path / "ifd0.jpg", only_ifd0), max_pixels=CAP)
    assert info.taken_at == datetime(2000, 1, 2, 3, 4, 5)


@pytest.mark.parametrize("value", ["0000:00:00 00:00:00", "    :  :     :  :  ", "garbage", "2021:13:45 99:00:00"])
def test_invalid_exif_date_is_none(tmp_path, value):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = value
    out, info = open_image(jpeg_with_exif(tmp_path / "bad.jpg", exif), max_pixels=CAP)
    assert info.taken_at is None and out.size == (60, 40)


@pytest.mark.filterwarnings("ignore:.*orrupt EXIF")
def test_garbage_exif_segment_does_not_fail(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (60, 40), BLUE).save(buf, "JPEG")
    data = buf.getvalue()
    garbage = bytes(random.Random(1).getrandbits(8) for _ in range(200))
    payload = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + garbage  # TIFF header, then junk
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    out, info = open_image(data[:2] + app1 + data[2:], max_pixels=CAP)
    assert out.size == (60, 40) and (info.width, info.height) == (60, 40)
    assert info.taken_at is None


def test_invalid_orientation_value_is_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 9
    out, info = open_image(jpeg_with_exif(tmp_path / "o9.jpg", exif), max_pixels=CAP)
    assert info.orientation is None and out.size == (60, 40)


def test_draft_decodes_big_jpeg_smaller_but_reports_full_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (90, 120, 150)).save(path, quality=90)
    out, info = open_image(path, max_pixels=CAP, target_size=224)
    assert (info.width, info.height) == (2000, 1500) and info.format == "JPEG"
    assert 224 <= min(out.size) < 1500 and out.mode == "RGB"
    full, _ = open_image(path, max_pixels=CAP)
    assert full.size == (2000, 1500)


def test_draft_with_rotation_reports_displayed_full_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = jpeg_with_exif(tmp_path / "rot.jpg", exif, Image.new("RGB", (1600, 1200), RED))
    out, info = open_image(path, max_pixels=CAP, target_size=224)
    assert (info.width, info.height) == (1200, 1600)
    assert out.width < out.height and min(out.size) >= 224


# ---- errors ----------------------------------------------------------------------------------


def expect_error(source, reason_part, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as excinfo:
        open_image(source, max_pixels=kwargs.pop("max_pixels", CAP), **kwargs)
    assert reason_part in excinfo.value.reason, excinfo.value.reason
    return excinfo.value


def test_error_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    err = expect_error(tmp_path / "empty.jpg", "empty file (0 bytes)")
    assert err.path == str(tmp_path / "empty.jpg")
    expect_error(b"", "empty file (0 bytes)")


def test_error_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not the pixels you are looking for\n")
    expect_error(tmp_path / "notes.jpg", "not an image or unsupported format")


def test_error_random_bytes():
    expect_error(bytes(random.Random(2).getrandbits(8) for _ in range(5000)), "not an image or unsupported format")


def test_error_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    noisy().save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    err = expect_error(tmp_path / "half.jpg", "truncated or corrupt image data (")
    assert len(err.reason) < 150


def test_error_over_pixel_cap(tmp_path):
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    err = expect_error(tmp_path / "a.png", "image too large: 60x40 = ", max_pixels=1000)
    assert err.reason == "image too large: 60x40 = 0.0024 megapixels exceeds the 0.001-megapixel cap"
    assert "--max-image-pixels" in err.hint
    open_image(tmp_path / "a.png", max_pixels=2400)  # exactly at the cap is fine


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a stub: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 10)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_too_large_is_refused_from_the_header_before_decoding():
    err = expect_error(png_header_only(12000, 12000), "image too large")
    assert err.reason == "image too large: 12000x12000 = 144.0 megapixels exceeds the 100.0-megapixel cap"
    # under the cap the same file is decoded, and fails as corrupt: so the cap was checked first
    expect_error(png_header_only(120, 120), "truncated or corrupt image data")


def test_pillow_decompression_bomb_error_is_converted(tmp_path, monkeypatch):
    register_image_formats()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    expect_error(tmp_path / "a.png", "image too large: ")


def test_error_vanished_path(tmp_path):
    err = expect_error(tmp_path / "gone.jpg", "file vanished")
    assert err.path == str(tmp_path / "gone.jpg")
    with pytest.raises(ImageDecodeError, match="file vanished"):
        read_image_bytes(tmp_path / "gone.jpg")


def test_error_directory(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    expect_error(tmp_path / "dir.jpg", "is a directory")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read anything")
def test_error_permission_denied(tmp_path):
    path = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(path)
    path.chmod(0)
    expect_error(path, "permission denied")


def test_read_image_bytes(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc")
    assert read_image_bytes(str(tmp_path / "x.bin")) == b"abc"


def test_threads_give_same_results_as_serial(tmp_path):
    paths = []
    for i in range(12):
        exif = Image.Exif()
        exif[0x0112] = i % 8 + 1
        paths.append(jpeg_with_exif(tmp_path / f"{i}.jpg", exif, noisy((120, 80), seed=i)))
    serial = [open_image(p, max_pixels=CAP) for p in paths]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: open_image(p, max_pixels=CAP), paths * 3))
    for (img, info), (img2, info2) in zip(serial * 3, threaded):
        assert info == info2 and img.tobytes() == img2.tobytes()


# ---- real photos -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*orrupt EXIF")
def test_camera_roll_all_open(shared_datasets):
    root = shared_datasets / "camera_roll"
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 200

    def attempt(row):
        try:
            return row, *open_image(root / row["relative_path"], max_pixels=CAP, target_size=224), None
        except ImageDecodeError as e:
            return row, None, None, e.reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, rows))
    failed = {row["relative_path"]: reason for row, _, _, reason in results if reason is not None}
    expected_failures = {row["relative_path"] for row in rows if row["decode_error"]}
    assert set(failed) == expected_failures, failed
    for row, img, info, reason in results:
        if reason is not None:
            continue
        name = row["relative_path"]
        assert img.mode == "RGB" and img.width > 0 and img.height > 0, name
        img.getpixel((0, 0))  # loaded, usable
        assert info.format == row["format"], name
        stored = (int(row["width"]), int(row["height"]))
        assert {info.width, info.height} == set(stored), name
        assert (info.width > info.height) == (img.width > img.height) or info.width == info.height, name
        if name.startswith("exif_orientation/Landscape_"):
            assert img.width > img.height and info.width > info.height, name
        if name.startswith("exif_orientation/Portrait_"):
            assert img.height > img.width and info.height > info.width, name
