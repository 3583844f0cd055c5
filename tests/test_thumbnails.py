"""Tests for clipsearch.webui.thumbnails: cached, upright, atomic JPEG renditions for the web UI."""

from __future__ import annotations

import csv
import errno
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageCms

import clipsearch.webui.thumbnails as thumbnails
from clipsearch.errors import ImageDecodeError, LibraryError
from clipsearch.webui.thumbnails import (
    BROWSER_FORMATS,
    DISPLAY_SIZE,
    THUMBNAIL_SIZE,
    RenditionCache,
)
from tests.fakes import make_image

CAP = 100_000_000
RED, WHITE = (230, 20, 20), (255, 255, 255)


def close_to(pixel, expected, tol=30) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


@pytest.fixture
def cache(tmp_path) -> RenditionCache:
    return RenditionCache(tmp_path / "cache", max_pixels=CAP)


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Count the decodes the cache does (it calls clipsearch.webui.thumbnails.open_image)."""
    calls: list[str] = []
    real = thumbnails.open_image

    def counting(source, **kwargs):
        calls.append(os.fspath(source))
        return real(source, **kwargs)

    monkeypatch.setattr(thumbnails, "open_image", counting)
    return calls


def check_jpeg(path: Path, bound: int = THUMBNAIL_SIZE) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "JPEG"
        assert img.mode == "RGB"
        assert max(img.size) <= bound
        assert "exif" not in img.info and 0x0112 not in img.getexif()
        img.load()
        return img.size


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def photo(tmp_path: Path, name: str, size=(800, 600), color=RED, noise: int = 1) -> Path:
    return make_image(tmp_path / "photos" / name, color, size=size, noise=noise)


# --- formats, sizes, orientation --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.jpg", "a.png", "a.webp", "a.gif", "a.bmp", "a.tif"])
def test_thumbnail_of_each_format(tmp_path, cache, name):
    source = photo(tmp_path, name, size=(1000, 500))
    out = cache.thumbnail(str(source), None, source.stat().st_mtime_ns)
    assert out.is_relative_to(cache.folder)
    assert out.parent.name == out.name[:2] and out.name.endswith(f"-{THUMBNAIL_SIZE}.jpg")
    assert check_jpeg(out) == (400, 200)
    with Image.open(out) as img:
        assert close_to(img.getpixel((200, 100)), RED, tol=40)


def test_png_alpha_is_composited_on_white(tmp_path, cache):
    img = Image.new("RGBA", (600, 300), (0, 0, 0, 0))  # transparent black
    img.paste((*RED, 255), (300, 0, 600, 300))
    source = tmp_path / "alpha.png"
    img.save(source)
    out = cache.thumbnail(str(source), None, 1)
    assert check_jpeg(out) == (400, 200)
    with Image.open(out) as thumb:
        assert close_to(thumb.getpixel((50, 100)), WHITE, tol=8)
        assert close_to(thumb.getpixel((350, 100)), RED)


@pytest.mark.parametrize(
    "size, bound, expected",
    [((1000, 500), THUMBNAIL_SIZE, (400, 200)), ((500, 1000), 100, (50, 100)), ((3000, 3000), 256, (256, 256)),
     ((64, 48), THUMBNAIL_SIZE, (64, 48)), ((2000, 10), 400, (400, 2))],
)
def test_longest_side_is_bounded_and_small_images_are_not_enlarged(tmp_path, cache, size, bound, expected):
    source = photo(tmp_path, "p.jpg", size=size, noise=0)
    out = cache.thumbnail(str(source), None, 1, size=bound)
    assert out.name.endswith(f"-{bound}.jpg")
    assert check_jpeg(out, bound) == expected


def test_sizes_are_separate_files(tmp_path, cache):
    source = photo(tmp_path, "p.jpg")
    small, big = cache.thumbnail(str(source), "h", 1, size=100), cache.thumbnail(str(source), "h", 1)
    assert small != big and small.parent == big.parent
    assert check_jpeg(small, 100) == (100, 75) and check_jpeg(big) == (400, 300)


@pytest.mark.parametrize("size", [0, 15, DISPLAY_SIZE + 1, -400, 400.0, True, "400"])
def test_unreasonable_size_is_refused(tmp_path, cache, size):
    source = photo(tmp_path, "p.jpg")
    with pytest.raises(ValueError):
        cache.thumbnail(str(source), None, 1, size=size)
    assert not cache.folder.exists() or not any(cache.folder.rglob("*.jpg"))


def test_exif_orientation_is_applied_and_not_left_for_the_browser(tmp_path, cache):
    img = Image.new("RGB", (800, 600), (20, 40, 230))
    img.paste(RED, (0, 0, 200, 150))  # the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    source = tmp_path / "rotated.jpg"
    img.save(source, "JPEG", quality=95, exif=exif)
    out = cache.thumbnail(str(source), None, 1)
    assert check_jpeg(out) == (300, 400)  # sides swapped, EXIF stripped
    with Image.open(out) as thumb:
        assert close_to(thumb.getpixel((280, 20)), RED)  # stored top-left is now top-right
        assert not close_to(thumb.getpixel((20, 20)), RED)


def test_display_rendition_is_an_upright_bounded_jpeg(tmp_path, cache):
    source = photo(tmp_path, "scan.tif", size=(3000, 1500), noise=0)
    out = cache.display(str(source), "h1", 1)
    assert out.name.endswith(f"-d{DISPLAY_SIZE}.jpg")
    assert check_jpeg(out, DISPLAY_SIZE) == (2048, 1024)
    small = photo(tmp_path, "small.tif", size=(300, 200))
    assert check_jpeg(cache.display(str(small), None, 1), DISPLAY_SIZE) == (300, 200)
    # A 2048px thumbnail and the display rendition of the same photo are separate files.
    assert cache.thumbnail(str(source), "h1", 1, size=DISPLAY_SIZE) != out


def test_needs_display_rendition():
    assert BROWSER_FORMATS == frozenset({"JPEG", "PNG", "WEBP", "GIF", "AVIF", "BMP"})
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "AVIF", "BMP", "MPO", "jpeg", "webp"):
        assert not RenditionCache.needs_display_rendition(fmt), fmt
    for fmt in ("HEIF", "HEIC", "TIFF", "PPM", "", None):
        assert RenditionCache.needs_display_rendition(fmt), fmt


# --- caching and keys -------------------------------------------------------------------------------


def test_second_call_does_not_regenerate(tmp_path, cache, decodes):
    source = photo(tmp_path, "p.jpg")
    first = cache.thumbnail(str(source), None, 5)
    stamp = first.stat().st_mtime_ns
    assert cache.thumbnail(str(source), None, 5) == first
    assert RenditionCache(cache.folder, CAP).thumbnail(str(source), None, 5) == first  # a restarted server too
    assert decodes == [str(source)]
    assert first.stat().st_mtime_ns == stamp


def test_changed_file_gets_a_new_thumbnail(tmp_path, cache, decodes):
    source = photo(tmp_path, "p.jpg", color=RED)
    old = cache.thumbnail(str(source), None, source.stat().st_mtime_ns)
    make_image(source, "blue", size=(800, 600))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    new = cache.thumbnail(str(source), None, source.stat().st_mtime_ns)
    assert new != old and len(decodes) == 2
    with Image.open(new) as img:
        assert close_to(img.getpixel((10, 10)), (20, 40, 230), tol=40)
    # With content hashes: a new hash is a new thumbnail.
    assert cache.thumbnail(str(source), "hash-a", 1) != cache.thumbnail(str(source), "hash-b", 1)


def test_same_content_hash_at_another_path_reuses_the_thumbnail(tmp_path, cache, decodes):
    source = photo(tmp_path, "p.jpg")
    first = cache.thumbnail(str(source), "abc123", source.stat().st_mtime_ns)
    moved = tmp_path / "elsewhere" / "renamed.jpg"
    moved.parent.mkdir()
    source.rename(moved)
    assert cache.thumbnail(str(moved), "abc123", moved.stat().st_mtime_ns + 1) == first
    assert decodes == [str(source)]
    # Without a hash the path is part of the key.
    assert cache.thumbnail(str(moved), None, 1) != first


def test_nothing_is_written_next_to_the_photos(tmp_path, cache):
    sources = [photo(tmp_path, f"p{i}.{ext}") for i, ext in enumerate(["jpg", "png", "tif"])]
    before = sorted(os.listdir(tmp_path / "photos"))
    for source in sources:
        cache.thumbnail(str(source), None, 1)
        cache.display(str(source), None, 1)
    assert sorted(os.listdir(tmp_path / "photos")) == before
    assert sorted(os.listdir(tmp_path)) == ["cache", "photos"]


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"this is not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 40, None])
def test_unreadable_photo_raises_image_decode_error(tmp_path, cache, content):
    source = tmp_path / "bad.jpg"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(ImageDecodeError) as caught:
        cache.thumbnail(str(source), None, 1)
    assert caught.value.path == str(source) and caught.value.reason
    assert not cache.folder.exists() or not [p for p in cache.folder.rglob("*") if p.is_file()]


def test_truncated_jpeg_raises_image_decode_error(tmp_path, cache):
    good = photo(tmp_path, "good.jpg", size=(1200, 900), noise=3)
    source = tmp_path / "truncated.jpg"
    source.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ImageDecodeError):
        cache.display(str(source), None, 1)
    assert not temp_files(tmp_path)


def test_image_over_the_pixel_cap_is_refused(tmp_path):
    source = photo(tmp_path, "big.png", size=(400, 300))
    with pytest.raises(ImageDecodeError, match="too large"):
        RenditionCache(tmp_path / "cache", max_pixels=100_000).thumbnail(str(source), None, 1)


def test_full_disk_raises_library_error_and_leaves_no_temp_file(tmp_path, cache, monkeypatch):
    source = photo(tmp_path, "p.jpg")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(thumbnails.os, "replace", full)
    with pytest.raises(LibraryError) as caught:
        cache.thumbnail(str(source), None, 1)
    assert "No space left" in caught.value.message and "full" in caught.value.hint
    assert str(cache.folder) in caught.value.message
    assert not temp_files(cache.folder)
    assert not list(cache.folder.rglob("*.jpg"))
    monkeypatch.undo()
    check_jpeg(cache.thumbnail(str(source), None, 1))  # works again once there is space


def test_unwritable_cache_folder_raises_library_error(tmp_path, cache, monkeypatch):
    source = photo(tmp_path, "p.jpg")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(thumbnails.tempfile, "mkstemp", refuse)
    with pytest.raises(LibraryError) as caught:
        cache.thumbnail(str(source), None, 1)
    assert "writable" in caught.value.hint


def test_interrupted_write_removes_its_temp_file(tmp_path, cache, monkeypatch):
    source = photo(tmp_path, "p.jpg")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(thumbnails.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.thumbnail(str(source), None, 1)
    assert not temp_files(cache.folder)


def test_abandoned_temp_files_are_removed_on_start(tmp_path):
    shard = tmp_path / "cache" / "ab"
    shard.mkdir(parents=True)
    old, fresh, kept = shard / ".abcd-400.x1.tmp", shard / ".abcd-400.x2.tmp", shard / "abcd-400.jpg"
    for path in (old, fresh, kept):
        path.write_bytes(b"x")
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    RenditionCache(tmp_path / "cache", CAP)
    assert not old.exists() and fresh.exists() and kept.exists()


def test_empty_cached_file_is_regenerated(tmp_path, cache):
    source = photo(tmp_path, "p.jpg")
    out = cache.thumbnail(str(source), None, 1)
    out.write_bytes(b"")  # what a power cut right after the rename could leave
    assert cache.thumbnail(str(source), None, 1) == out
    check_jpeg(out)


# --- concurrency ------------------------------------------------------------------------------------


def test_eight_threads_same_image_decode_once_and_all_succeed(tmp_path, cache, decodes):
    source = photo(tmp_path, "p.jpg", size=(1600, 1200))
    barrier = threading.Barrier(8)

    def request(_):
        barrier.wait()
        return cache.thumbnail(str(source), "same", 1)

    with ThreadPoolExecutor(8) as pool:
        results = set(pool.map(request, range(8)))
    assert len(results) == 1
    check_jpeg(results.pop())
    assert len(decodes) == 1
    assert not temp_files(cache.folder)
    assert not cache._in_flight


def test_two_caches_on_one_folder_write_the_same_file_concurrently(tmp_path, decodes):
    # Like two server processes: no shared lock, both generate and rename over each other; both succeed.
    source = photo(tmp_path, "p.jpg", size=(1600, 1200))
    caches = [RenditionCache(tmp_path / "cache", CAP) for _ in range(8)]
    barrier = threading.Barrier(8)

    def request(cache):
        barrier.wait()
        return cache.thumbnail(str(source), None, 1)

    with ThreadPoolExecutor(8) as pool:
        results = set(pool.map(request, caches))
    assert len(results) == 1
    check_jpeg(results.pop())
    assert len(decodes) >= 1
    assert not temp_files(tmp_path / "cache")


def test_eight_threads_many_images(tmp_path, cache):
    colors = ["red", "green", "blue", "yellow", "cyan"]
    sources = [photo(tmp_path, f"{c}.{ext}", color=c, size=(700, 500))
               for c in colors for ext in ("jpg", "png")]
    jobs = [(s, kind) for s in sources for kind in ("thumb", "thumb", "small", "display")]

    def request(job):
        source, kind = job
        if kind == "display":
            return source, kind, cache.display(str(source), None, 1)
        size = 120 if kind == "small" else THUMBNAIL_SIZE
        return source, kind, cache.thumbnail(str(source), None, 1, size=size)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(request, jobs))
    paths = {path for _s, _k, path in results}
    assert len(paths) == len(sources) * 3
    for source, kind, path in results:
        bound = {"thumb": THUMBNAIL_SIZE, "small": 120, "display": DISPLAY_SIZE}[kind]
        check_jpeg(path, bound)
    assert not temp_files(cache.folder)
    assert not cache._in_flight


# --- size and clearing ------------------------------------------------------------------------------


def test_size_bytes_and_clear(tmp_path, cache, decodes):
    assert cache.size_bytes() == 0  # the folder does not exist yet
    cache.clear()
    outs = [cache.thumbnail(str(photo(tmp_path, f"p{i}.jpg", noise=i + 1)), None, 1) for i in range(5)]
    assert cache.size_bytes() == sum(p.stat().st_size for p in outs) > 0
    (cache.folder / "README.txt").write_text("not a rendition")
    cache.clear()
    assert not any(p.exists() for p in outs)
    assert cache.size_bytes() == len("not a rendition")
    assert (cache.folder / "README.txt").exists()
    assert cache.thumbnail(str(tmp_path / "photos" / "p0.jpg"), None, 1) == outs[0]  # regenerated on demand
    assert len(decodes) == 6


def test_clear_leaves_writes_in_progress_and_removes_abandoned_ones(tmp_path, cache):
    out = cache.thumbnail(str(photo(tmp_path, "p.jpg")), None, 1)
    in_progress, abandoned = out.parent / f".{out.stem}.a1.tmp", out.parent / f".{out.stem}.b2.tmp"
    in_progress.write_bytes(b"half")
    abandoned.write_bytes(b"half")
    hours_ago = time.time() - 7200
    os.utime(abandoned, (hours_ago, hours_ago))
    cache.clear()
    assert not out.exists() and not abandoned.exists() and in_progress.exists()


# --- the real camera roll ---------------------------------------------------------------------------


def _camera_roll(shared_datasets: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    roll = shared_datasets / "camera_roll"
    with open(roll / "manifest.csv", newline="") as handle:
        return roll, {row["relative_path"]: row for row in csv.DictReader(handle)}


def test_every_camera_roll_photo_gets_a_thumbnail(shared_datasets, tmp_path):
    roll, manifest = _camera_roll(shared_datasets)
    cache = RenditionCache(tmp_path / "cache", CAP)

    def make(relative):
        try:
            return relative, cache.thumbnail(str(roll / relative), None, 1), None
        except ImageDecodeError as e:
            return relative, None, e

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(make, sorted(manifest)))
    failed = {relative for relative, _out, error in results if error}
    assert failed == {p for p, row in manifest.items() if row["decode_error"]}
    formats = set()
    for relative, out, error in results:
        if error:
            continue
        formats.add(manifest[relative]["format"])
        width, height = check_jpeg(out)
        name = Path(relative).name
        if relative.startswith("exif_orientation/"):  # upright after EXIF orientation
            assert (width > height) if name.startswith("Landscape") else (height > width), relative
    assert {"JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF", "BMP", "GIF"} <= formats
    assert not temp_files(cache.folder)


def test_heic_display_rendition(shared_datasets, tmp_path):
    roll, manifest = _camera_roll(shared_datasets)
    cache = RenditionCache(tmp_path / "cache", CAP)
    # An iPhone HEIC (Display P3 profile) and an AV1-coded HEIF; every HEIF gets a thumbnail above.
    heif = ["exif_samples/heic__IMG_5195.HEIC", "pillow_testimages/avif__hopper.heif"]
    for relative in heif:
        assert RenditionCache.needs_display_rendition(manifest[relative]["format"])
        width, height = check_jpeg(cache.display(str(roll / relative), None, 1), DISPLAY_SIZE)
        stored = int(manifest[relative]["width"]), int(manifest[relative]["height"])
        if max(stored) >= DISPLAY_SIZE:
            assert max(width, height) == DISPLAY_SIZE


def test_wide_gamut_profile_is_converted_to_srgb(shared_datasets, tmp_path):
    # The iPhone JPEG carries a Display P3 profile; borrow it (read at test time, never copied into the repo).
    with Image.open(shared_datasets / "camera_roll" / "heic_samples"
                    / "nature__jpeg__991825f7-2cd0-444f-86f6-5815a4330948.jpg") as iphone:
        p3 = iphone.info["icc_profile"]
    assert "P3" in ImageCms.ImageCmsProfile(io.BytesIO(p3)).profile.profile_description
    color = (200, 60, 40)
    tagged, plain = tmp_path / "p3.jpg", tmp_path / "plain.jpg"
    Image.new("RGB", (100, 100), color).save(tagged, quality=95, icc_profile=p3)
    Image.new("RGB", (100, 100), color).save(plain, quality=95)
    cache = RenditionCache(tmp_path / "cache", CAP)
    with Image.open(cache.thumbnail(str(plain), None, 1)) as img:
        assert close_to(img.getpixel((50, 50)), color, tol=4)
        assert "icc_profile" not in img.info
    with Image.open(cache.thumbnail(str(tagged), None, 1)) as img:
        r, g, b = img.getpixel((50, 50))
        assert "icc_profile" not in img.info
    assert r > color[0] + 8  # P3 red is beyond sRGB red: more saturated once converted
