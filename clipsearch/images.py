"""Robust image reading for the indexer: every format we index, EXIF orientation, RGB, short errors."""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL import features as pil_features
from PIL.JpegImagePlugin import JpegImageFile

from clipsearch.errors import ImageDecodeError

log = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
     ".heic", ".heif", ".hif", ".avif"}
)

_TOO_LARGE_HINT = "raise max_image_pixels (--max-image-pixels) if this image is genuine"
_EXIF_IFD, _ORIENTATION, _DATETIME = 0x8769, 0x0112, 0x0132
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_DATE_RE = re.compile(r"(\d{4})[:\-/.](\d{1,2})[:\-/.](\d{1,2})[ T]+(\d{1,2}):(\d{1,2}):(\d{1,2})")
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

_register_lock = threading.Lock()
_registered = False


@dataclass(frozen=True)
class ImageInfo:
    """Facts about one image: displayed full-resolution size, Pillow format, EXIF date and orientation."""

    width: int
    height: int
    format: str
    taken_at: datetime | None
    orientation: int | None


def register_image_formats() -> None:
    """Register HEIF/HEIC (pillow_heif) and check AVIF support; safe to call often and from many threads."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except ImportError:
            log.warning("pillow_heif is not installed: HEIC/HEIF photos cannot be read")
        if not pil_features.check("avif"):
            log.warning("this Pillow has no AVIF support (needs Pillow >= 11.3): AVIF photos cannot be read")
        # Load every Pillow plugin now: Image.open's lazy plugin loading is not thread-safe.
        Image.init()
        # We enforce our own cap (open_image's max_pixels) from the header before decoding, so
        # Pillow's global decompression-bomb limit is switched off once, here, under the lock.
        # Toggling it per call would race between decoder threads and could not exceed Pillow's
        # default (~179 MP hard error) when the user raises max_image_pixels.
        Image.MAX_IMAGE_PIXELS = None
        _registered = True


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """Read a whole file, turning OS failures into ImageDecodeError with a short reason."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise ImageDecodeError("file vanished", path=name) from e
    except PermissionError as e:
        raise ImageDecodeError("permission denied", path=name) from e
    except IsADirectoryError as e:
        raise ImageDecodeError("is a directory", path=name) from e
    except OSError as e:
        raise ImageDecodeError(f"unreadable: {e.strerror or e}", path=name) from e
    if not data:
        raise ImageDecodeError("empty file (0 bytes)", path=name)
    return data


def _megapixels(pixels: float) -> str:
    mp = pixels / 1e6
    return f"{mp:.1f}" if mp >= 0.1 else f"{mp:.2g}"


def _too_large(size: str, pixels: float, cap: float, path: str | None = None) -> ImageDecodeError:
    return ImageDecodeError(
        f"image too large: {size}{_megapixels(pixels)} megapixels exceeds the {_megapixels(cap)}-megapixel cap",
        path=path,
        hint=_TOO_LARGE_HINT,
    )


def _short(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
    return text if len(text) <= 100 else text[:97] + "..."


def _parse_exif_date(value: object) -> datetime | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, str):
        return None
    m = _DATE_RE.search(value)
    if not m:
        return None
    try:
        return datetime(*(int(g) for g in m.groups()))
    except ValueError:
        return None


def _read_exif(img: Image.Image) -> tuple[datetime | None, int | None]:
    """(taken_at, orientation) from the image's EXIF; anything broken reads as None."""
    try:
        exif = img.getexif()
    except Exception as e:  # broken EXIF never fails a file
        log.debug("unreadable EXIF: %s", e)
        return None, None
    taken_at = None
    try:
        sub = exif.get_ifd(_EXIF_IFD)
        for tag in (_DATETIME_ORIGINAL, _DATETIME_DIGITIZED):
            taken_at = taken_at or _parse_exif_date(sub.get(tag))
    except Exception as e:
        log.debug("unreadable EXIF sub-IFD: %s", e)
    try:
        taken_at = taken_at or _parse_exif_date(exif.get(_DATETIME))
        orientation = exif.get(_ORIENTATION)
    except Exception as e:
        log.debug("unreadable EXIF IFD0: %s", e)
        orientation = None
    valid = isinstance(orientation, int) and not isinstance(orientation, bool) and 1 <= orientation <= 8
    return taken_at, orientation if valid else None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float greyscale image to 8-bit L (not clipped)."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    else:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16") or (lo >= 0 and 255 < hi <= 65535):
            arr = arr / 257.0
        elif not (lo >= 0 and hi <= 255):
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB: alpha composited over white, CMYK converted, deep greyscale scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if (mode == "P" and "transparency" in img.info) or mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _to_8bit(img).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"unsupported colour mode {mode}") from e


def _decode(data: bytes, max_pixels: int, target_size: int | None) -> tuple[Image.Image, ImageInfo]:
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise _too_large(f"{width}x{height} = ", width * height, max_pixels)
        fmt = img.format or "unknown"
        if isinstance(img, JpegImageFile):
            fmt = "JPEG"  # MPO (phone JPEGs with a preview image) is a JPEG to users
            if target_size:
                img.draft("RGB", (target_size, target_size))
        # The file is in memory: hand the decoder all of it in one call. Pillow releases the GIL per call, and in
        # 64 KiB blocks a 4 MB JPEG re-acquires it ~60 times, each a wait while another thread runs Python (the
        # model loading beside the decoders: decoding was 4x slower then, 2x with one call).
        img.decodermaxblock = max(img.decodermaxblock, len(data))
        img.load()
        taken_at, orientation = _read_exif(img)
        rgb = _to_rgb(img)
        if target_size:
            rgb = _reduce_towards(rgb, target_size)
        transpose = _ORIENTATION_TRANSPOSE.get(orientation)
        if transpose is not None:
            # Rotate after reducing: fewer pixels to move. Same mapping as ImageOps.exif_transpose.
            rgb = rgb.transpose(transpose)
            if orientation in _SWAPS_SIDES:
                width, height = height, width
        if rgb is img:
            rgb = img.copy()  # the original is closed on leaving the with block
        rgb.load()
    return rgb, ImageInfo(width, height, fmt, taken_at, orientation)


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _reduce_towards(img: Image.Image, target_size: int) -> Image.Image:
    """Box-reduce by a whole factor while the shorter side stays >= target_size (what JPEG draft does for JPEG).

    A model resizes to target_size anyway; reducing first makes that resize, the rotation and the copy cheap
    for large PNG, WebP, HEIC and TIFF photos, and finishes what draft's 1/8 limit leaves for huge JPEGs.
    """
    factor = min(img.size) // target_size
    return img.reduce(factor) if factor >= 2 else img


def read_jpeg_header(data: bytes, max_pixels: int) -> ImageInfo | None:
    """ImageInfo of a JPEG a GPU decoder can take as it is (RGB or greyscale, within max_pixels); else None.

    Reads only the header and EXIF. None sends the file down open_image's path, which decodes what this
    refuses (CMYK, odd files) or reports it in its own words.
    """
    register_image_formats()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if not isinstance(img, JpegImageFile) or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            if width * height > max_pixels:
                return None
            taken_at, orientation = _read_exif(img)
    except Exception as e:  # noqa: BLE001 - anything odd is for open_image to decode or explain
        log.debug("not a plain JPEG (%s)", e)
        return None
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return ImageInfo(width, height, "JPEG", taken_at, orientation)


def open_image(
    source: bytes | str | os.PathLike, *, max_pixels: int, target_size: int | None = None
) -> tuple[Image.Image, ImageInfo]:
    """Decode an image file or its bytes to a loaded, upright RGB image plus its ImageInfo."""
    register_image_formats()
    path = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageDecodeError("empty file (0 bytes)")
    else:
        path = os.fspath(source)
        data = read_image_bytes(path)
    try:
        return _decode(data, max_pixels, target_size)
    except ImageDecodeError as e:
        if path is None:
            raise
        raise ImageDecodeError(e.reason, path=path, hint=e.hint) from (e.__cause__ or e)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        numbers = [int(n) for n in re.findall(r"\d+", str(e))]  # "Image size (N pixels) exceeds limit of M"
        if len(numbers) < 2:
            raise ImageDecodeError(f"image too large: {_short(e)}", path=path, hint=_TOO_LARGE_HINT) from e
        raise _too_large("", numbers[0], numbers[1], path) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not an image or unsupported format", path=path) from e
    except MemoryError:
        raise
    except Exception as e:  # OSError, SyntaxError, ValueError, struct.error... from the decoders
        raise ImageDecodeError(f"truncated or corrupt image data ({_short(e)})", path=path) from e
