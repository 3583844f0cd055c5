"""Camera basics for the image page: make and model, lens, exposure, date and place, read from EXIF."""

from __future__ import annotations

import logging
import math
import os
import re
from datetime import datetime
from numbers import Real
from typing import Any, Callable

from PIL import Image

from clipsearch.images import register_image_formats

log = logging.getLogger(__name__)

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _SOFTWARE, _DATETIME = 0x010F, 0x0110, 0x0131, 0x0132
_EXPOSURE_TIME, _F_NUMBER = 0x829A, 0x829D
_ISO, _ISO_SPEED = 0x8827, 0x8833
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_SHUTTER_SPEED_APEX, _APERTURE_APEX = 0x9201, 0x9202
_FOCAL_LENGTH, _FOCAL_LENGTH_35MM, _LENS_MODEL = 0x920A, 0xA405, 0xA434
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4

_MAX_TEXT = 120
_DATE_RE = re.compile(r"(\d{4})[:\-/.](\d{1,2})[:\-/.](\d{1,2})[ T]+(\d{1,2}):(\d{1,2}):(\d{1,2})")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# Trailing company words that only make "NIKON CORPORATION NIKON D70" longer.
_COMPANY_SUFFIX_RE = re.compile(
    r"[\s,]+(?:corporation|corp\.?|company|co\.?,?\s*ltd\.?|co\.?|ltd\.?|inc\.?|gmbh|ag|imaging)\s*$",
    re.IGNORECASE,
)


def camera_info(path: str | os.PathLike) -> dict[str, str]:
    """Camera facts formatted for people, only those found and valid; {} for files without usable EXIF.

    Keys: camera, lens, aperture, exposure, iso, focal_length, taken, software, gps. Never raises:
    broken EXIF, odd values and unreadable or vanished files only leave keys out (logged at debug).
    """
    name = os.fspath(path)
    try:
        register_image_formats()
        with Image.open(name) as img:
            exif = img.getexif()
            ifd0 = dict(exif.items())
            exif_ifd = _sub_ifd(exif, _EXIF_IFD, name)
            gps_ifd = _sub_ifd(exif, _GPS_IFD, name)
    except FileNotFoundError:
        return {}
    except MemoryError:
        raise
    except Exception as e:  # not an image, unreadable, EXIF too broken to parse
        log.debug("no camera info for %s: %s", name, e)
        return {}

    found: dict[str, str] = {}
    fields: list[tuple[str, Callable[[], str | None]]] = [
        ("camera", lambda: _camera(ifd0.get(_MAKE), ifd0.get(_MODEL))),
        ("lens", lambda: _text(exif_ifd.get(_LENS_MODEL))),
        ("aperture", lambda: _aperture(exif_ifd.get(_F_NUMBER), exif_ifd.get(_APERTURE_APEX))),
        ("exposure", lambda: _exposure(exif_ifd.get(_EXPOSURE_TIME), exif_ifd.get(_SHUTTER_SPEED_APEX))),
        ("iso", lambda: _iso(exif_ifd.get(_ISO), exif_ifd.get(_ISO_SPEED))),
        ("focal_length", lambda: _focal_length(exif_ifd.get(_FOCAL_LENGTH), exif_ifd.get(_FOCAL_LENGTH_35MM))),
        ("taken", lambda: _taken(exif_ifd.get(_DATETIME_ORIGINAL), exif_ifd.get(_DATETIME_DIGITIZED),
                                 ifd0.get(_DATETIME))),
        ("software", lambda: _text(ifd0.get(_SOFTWARE))),
        ("gps", lambda: _gps(gps_ifd)),
    ]
    for key, read in fields:
        try:
            value = read()
        except Exception as e:  # one odd value never costs the others
            log.debug("unreadable EXIF %s in %s: %s", key, name, e)
            continue
        if value:
            found[key] = value
    return found


def _sub_ifd(exif: Image.Exif, tag: int, name: str) -> dict[int, Any]:
    try:
        return dict(exif.get_ifd(tag).items())
    except Exception as e:
        log.debug("unreadable EXIF sub-IFD 0x%04x in %s: %s", tag, name, e)
        return {}


# --- value cleaning ----------------------------------------------------------------------------


def _text(value: object) -> str | None:
    """A printable, trimmed string from an EXIF text value (bytes, NUL padding, control characters)."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value).split(b"\x00", 1)[0]
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("latin-1")
    if not isinstance(value, str):
        return None
    value = value.split("\x00", 1)[0]
    value = " ".join(_CONTROL_RE.sub(" ", value).split())
    if not value or not any(c.isalnum() for c in value):
        return None  # "", "----", "   " are placeholders, not names
    return value if len(value) <= _MAX_TEXT else value[: _MAX_TEXT - 1] + "…"


def _number(value: object) -> float | None:
    """A finite float from an EXIF number: int, float, IFDRational (zero denominator -> None), tuples."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (tuple, list)):
        return _number(value[0]) if value else None  # a multi-valued tag: the first value counts
    if isinstance(value, (bytes, bytearray, str)):
        text = _text(value)
        try:
            value = float(text) if text else None
        except ValueError:
            return None
        return value if value is not None and math.isfinite(value) else None
    denominator = getattr(value, "denominator", 1)
    if isinstance(denominator, (int, float)) and denominator == 0:
        return None
    if not isinstance(value, Real):
        return None
    try:
        result = float(value)
    except (ArithmeticError, ValueError, TypeError):
        return None
    return result if math.isfinite(result) else None


def _plain(x: float, decimals: int = 1) -> str:
    """2.0 -> "2", 2.8 -> "2.8", 4.25 -> "4.2"."""
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# --- fields ------------------------------------------------------------------------------------


def _camera(make_value: object, model_value: object) -> str | None:
    make, model = _text(make_value), _text(model_value)
    if make:
        shorter = make
        while (trimmed := _COMPANY_SUFFIX_RE.sub("", shorter)) != shorter and trimmed:
            shorter = trimmed
        make = shorter
    if not model:
        return make
    if not make:
        return model
    first_word = model.split()[0].lower()
    if model.lower().startswith(make.lower()) or first_word in {w.lower() for w in make.split()}:
        return model  # "Canon" + "Canon EOS 40D", "EASTMAN KODAK" + "KODAK CX7530"
    return f"{make} {model}"


def _aperture(f_number: object, apex: object) -> str | None:
    f = _number(f_number)
    if f is None or not 0.5 <= f <= 256:
        av = _number(apex)  # ApertureValue in APEX: f = 2 ** (Av / 2)
        f = 2 ** (av / 2) if av is not None and -2 < av < 16 else None
    if f is None or not 0.5 <= f <= 256:
        return None
    return f"f/{_plain(f)}"


def _exposure(exposure_time: object, apex: object) -> str | None:
    t = _number(exposure_time)
    if t is None or not 0 < t <= 100_000:
        tv = _number(apex)  # ShutterSpeedValue in APEX: t = 2 ** -Tv
        t = 2 ** -tv if tv is not None and -17 < tv < 20 else None
    if t is None or not 0 < t <= 100_000:
        return None
    if t >= 1:
        return f"{_plain(t)} s"
    reciprocal = 1 / t
    if reciprocal >= 2.95 or abs(reciprocal - round(reciprocal)) < 0.02 * reciprocal:
        return f"1/{round(reciprocal)} s"
    return f"{_plain(t, 2)} s"  # 0.4 s and 0.8 s, not a rounded 1/2 s or 1/1 s


def _iso(iso: object, iso_speed: object) -> str | None:
    for value in (iso, iso_speed):
        n = _number(value)
        if n is not None and 1 <= n < 10_000_000:
            return f"ISO {round(n)}"
    return None


def _focal_length(focal: object, focal_35mm: object) -> str | None:
    mm = _number(focal)
    if mm is None or not 0 < mm < 10_000:
        return None
    text = f"{_plain(mm, 2 if mm < 10 else 1)} mm"  # phones: 4.25 mm
    equivalent = _number(focal_35mm)
    if equivalent is not None and 0 < equivalent < 10_000 and round(equivalent) != round(mm):
        text += f" ({round(equivalent)} mm equiv.)"
    return text


def _taken(*values: object) -> str | None:
    for value in values:
        text = _text(value)
        match = _DATE_RE.search(text) if text else None
        if not match:
            continue
        try:
            return datetime(*(int(g) for g in match.groups())).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:  # "0000:00:00 00:00:00" and other placeholders
            continue
    return None


def _degrees(value: object) -> float | None:
    """Degrees from an EXIF GPS coordinate: (deg, min, sec) rationals, or one decimal number."""
    if isinstance(value, (tuple, list)):
        if not value or len(value) > 3:
            return None
        parts = [_number(v) for v in value]
        if any(p is None or p < 0 for p in parts):
            return None
        return sum(p / 60**i for i, p in enumerate(parts))
    return _number(value)


def _gps(gps: dict[int, Any]) -> str | None:
    if not gps:
        return None
    lat, lon = _degrees(gps.get(_GPS_LAT)), _degrees(gps.get(_GPS_LON))
    if lat is None or lon is None:
        return None
    lat_ref = (_text(gps.get(_GPS_LAT_REF)) or "N")[:1].upper()
    lon_ref = (_text(gps.get(_GPS_LON_REF)) or "E")[:1].upper()
    if lat_ref not in "NS" or lon_ref not in "EW":
        return None
    lat = -abs(lat) if lat_ref == "S" else lat
    lon = -abs(lon) if lon_ref == "W" else lon
    if not (-90 <= lat <= 90 and -180 <= lon <= 180) or (lat == 0 and lon == 0):
        return None  # (0, 0) is what cameras without a fix write
    return f"{lat:.5f}, {lon:.5f}"
