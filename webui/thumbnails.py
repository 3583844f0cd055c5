"""Renditions for the web UI: grid thumbnails and browser-viewable copies, generated once and kept on disk.

Files live only in the cache folder, as <folder>/<key[:2]>/<key>-<size>.jpg (display renditions:
<key>-d<size>.jpg). The key is derived from the file's content hash when the catalog has one, so a moved
photo keeps its thumbnail, else from its path and modification time; an edited photo gets a new key.
Writes go to a temp file in the same folder and are renamed into place, so concurrent requests, a full
disk or a killed server never leave a half-written rendition behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image, ImageCms

from clipsearch.errors import ImageDecodeError, LibraryError
from clipsearch.images import open_image

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 400  # longest side in px of grid thumbnails (sharp on 2x screens for ~200px cells)
DISPLAY_SIZE = 2048  # longest side of the display rendition (formats browsers cannot show, and big photos)
BROWSER_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "AVIF", "BMP"})  # Pillow format names browsers show

MIN_SIZE = 16
THUMBNAIL_QUALITY = 82
DISPLAY_QUALITY = 85
# Part of every key: bump it when renditions change (size rules, quality, colour handling) to regenerate.
_RENDITION_VERSION = "1"
_TEMP_SUFFIX = ".tmp"
_ABANDONED_AFTER_S = 3600
_SHARD_RE = re.compile(r"^[0-9a-f]{2}$")
_FORMAT_ALIASES = {"MPO": "JPEG"}  # phone JPEGs with a preview image: Pillow says MPO, browsers see a JPEG


class RenditionCache:
    """Thumbnails and browser-viewable renditions of library images, generated once and kept on disk."""

    def __init__(self, folder: Path, max_pixels: int):
        self.folder = Path(folder)
        self.max_pixels = max_pixels
        self._guard = threading.Lock()
        self._in_flight: dict[str, list] = {}  # file name -> [lock, number of threads using it]
        self._remove_abandoned_temp_files()

    # --- public API ------------------------------------------------------------------------------

    def thumbnail(self, path: str, content_hash: str | None, mtime_ns: int, size: int = THUMBNAIL_SIZE) -> Path:
        """A JPEG of the upright image with its longest side at most `size` (never enlarged); cached.

        Raises ImageDecodeError when the photo cannot be read (show a placeholder), LibraryError when the
        cache folder cannot be written, ValueError for a size outside MIN_SIZE..DISPLAY_SIZE.
        """
        if not isinstance(size, int) or isinstance(size, bool) or not MIN_SIZE <= size <= DISPLAY_SIZE:
            raise ValueError(f"thumbnail size must be an integer from {MIN_SIZE} to {DISPLAY_SIZE}, not {size!r}")
        key = self._key(path, content_hash, mtime_ns)
        return self._rendition(path, self._path(key, f"{size}"), size, THUMBNAIL_QUALITY)

    def display(self, path: str, content_hash: str | None, mtime_ns: int) -> Path:
        """A JPEG browsers can show (for HEIC, TIFF...): upright, longest side at most DISPLAY_SIZE; cached."""
        key = self._key(path, content_hash, mtime_ns)
        return self._rendition(path, self._path(key, f"d{DISPLAY_SIZE}"), DISPLAY_SIZE, DISPLAY_QUALITY)

    @staticmethod
    def needs_display_rendition(fmt: str | None) -> bool:
        """True when browsers cannot show this Pillow format (HEIF, TIFF, unknown...) as it is."""
        if not fmt:
            return True
        name = fmt.strip().upper()
        return _FORMAT_ALIASES.get(name, name) not in BROWSER_FORMATS

    def size_bytes(self) -> int:
        """Total bytes of the files in the cache folder."""
        total = 0
        for root, _dirs, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
                except OSError:
                    pass  # removed meanwhile
        return total

    def clear(self) -> None:
        """Delete every rendition (they are regenerated on demand); other files in the folder are left.

        Writes in progress are left to finish; a request served meanwhile may regenerate its rendition.
        """
        removed = 0
        cutoff = time.time() - _ABANDONED_AFTER_S
        for shard in self._shards():
            for entry in _scandir(shard):
                try:
                    if entry.name.endswith(_TEMP_SUFFIX) and entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                        continue  # another thread's write in progress: it is renamed into place in a moment
                    if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise self._write_error(e, "clear") from e
            try:
                os.rmdir(shard)
            except OSError:
                pass  # not empty: a rendition was written meanwhile
        log.info("removed %d cached renditions from %s", removed, self.folder)

    # --- internals -------------------------------------------------------------------------------

    @staticmethod
    def _key(path: str | os.PathLike, content_hash: str | None, mtime_ns: int) -> str:
        if content_hash:
            material = b"hash\0" + str(content_hash).encode("utf-8", "surrogateescape")
        else:
            material = b"path\0" + os.fsencode(path) + b"\0" + str(int(mtime_ns)).encode()
        return hashlib.sha256(_RENDITION_VERSION.encode() + b"\0" + material).hexdigest()[:32]

    def _path(self, key: str, variant: str) -> Path:
        return self.folder / key[:2] / f"{key}-{variant}.jpg"

    def _rendition(self, path: str | os.PathLike, target: Path, size: int, quality: int) -> Path:
        if _is_complete(target):
            return target
        entry = self._enter(target.name)
        try:
            with entry[0]:  # one thread makes it; the others wait and reuse it
                if _is_complete(target):
                    return target
                started = time.perf_counter()
                data = self._render(path, size, quality)
                self._write(target, data)
                log.debug("made %s (%d bytes) from %s in %.0f ms",
                          target.name, len(data), os.fspath(path), (time.perf_counter() - started) * 1000)
                return target
        finally:
            self._leave(target.name)

    def _enter(self, name: str) -> list:
        with self._guard:
            entry = self._in_flight.setdefault(name, [threading.Lock(), 0])
            entry[1] += 1
            return entry

    def _leave(self, name: str) -> None:
        with self._guard:
            entry = self._in_flight[name]
            entry[1] -= 1
            if not entry[1]:
                del self._in_flight[name]

    def _render(self, path: str | os.PathLike, size: int, quality: int) -> bytes:
        """Decode (reduced, EXIF-rotated, RGB on white), resize, convert to sRGB and encode a JPEG in memory."""
        img, _info = open_image(path, max_pixels=self.max_pixels, target_size=size)  # raises ImageDecodeError
        try:
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            img = _to_srgb(img, os.fspath(path))
            out = io.BytesIO()
            # No exif=: the pixels are already upright, and browsers must not rotate them a second time.
            img.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
        except MemoryError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"could not make a {size}px rendition ({e})", path=os.fspath(path)) from e
        return out.getvalue()

    def _write(self, target: Path, data: bytes) -> None:
        for attempt in (1, 2):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=_TEMP_SUFFIX, dir=target.parent)
                break
            except FileNotFoundError as e:  # clear() removed the shard folder between mkdir and mkstemp
                if attempt == 2:
                    raise self._write_error(e, "write") from e
            except OSError as e:
                raise self._write_error(e, "write") from e
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise self._write_error(e, "write") from e
            raise

    def _write_error(self, e: OSError, action: str) -> LibraryError:
        reason = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = f"the disk holding {self.folder} is full: free some space (cached thumbnails can be deleted safely)"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = (f"make {self.folder} writable, or point data_dir (--data-dir / CLIPSEARCH_DATA_DIR) "
                    "to a writable folder")
        else:
            hint = f"check that {self.folder} is a writable folder on a healthy disk"
        return LibraryError(f"cannot {action} the thumbnail cache in {self.folder}: {reason}", hint=hint)

    def _shards(self) -> list[str]:
        return [e.path for e in _scandir(self.folder) if _SHARD_RE.match(e.name) and e.is_dir(follow_symlinks=False)]

    def _remove_abandoned_temp_files(self) -> None:
        # A server killed mid-write leaves its temp file behind; an hour-old one is nobody's work in progress.
        cutoff = time.time() - _ABANDONED_AFTER_S
        for shard in self._shards():
            for entry in _scandir(shard):
                if not entry.name.endswith(_TEMP_SUFFIX):
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass


def _is_complete(target: Path) -> bool:
    # Only whole files are ever renamed into place; an empty one can only come from a crash of the disk itself.
    try:
        return target.stat().st_size > 0
    except OSError:
        return False


def _scandir(folder: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _to_srgb(img: Image.Image, name: str) -> Image.Image:
    """Convert pixels tagged with an RGB ICC profile (Display P3, Adobe RGB...) to sRGB, the profile we can drop."""
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return img  # e.g. a CMYK profile left on pixels Pillow already converted to RGB
        description = (profile.profile.profile_description or "").strip().lower()
        if description.startswith("srgb"):
            return img
        # A fresh sRGB profile per call (0.1 ms): LittleCMS profile objects are not safe to share across threads.
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.profileToProfile(img, profile, srgb, outputMode="RGB")
    except Exception as e:  # a broken profile only costs colour accuracy
        log.debug("ignoring the ICC profile of %s: %s", name, e)
        return img
