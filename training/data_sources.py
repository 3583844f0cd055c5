"""Training data sources on plain files: caption tables (CSV/TSV), sidecar-caption folders, class folders, labels CSVs.

A source knows its samples (in a fixed order) and reads one sample's raw parts on demand; it never decodes or
transforms images (training/data.py does that) and never raises for one bad sample at open time, only when that
sample is read (SampleError), so the loader can replace and count it. Webdataset shards live in data_shards.py.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from clipsearch.errors import ConfigError
from clipsearch.images import SUPPORTED_EXTENSIONS
from clipsearch.search.evaluation import read_classes, read_labels

log = logging.getLogger(__name__)

# open_clip's --csv-img-key/--csv-caption-key defaults come first; clipsearch's own eval CSV columns next.
DEFAULT_IMAGE_COLUMN, DEFAULT_CAPTION_COLUMN = "filepath", "title"
_IMAGE_COLUMN_FALLBACKS = ("relative_path", "filepath", "image", "image_path", "path", "file")
_CAPTION_COLUMN_FALLBACKS = ("caption", "title", "text", "captions")
_MAX_PROBLEMS_LOGGED = 5


class SampleError(Exception):
    """One sample cannot be used (unreadable image, empty caption...); `reason` is short."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FileSource:
    """Samples whose images are files: caption lists, sidecar caption files, or class labels (exactly one kind)."""

    def __init__(self, kind: str, root: Path, paths: Sequence[str], *, captions: Sequence[tuple[str, ...]] | None = None,
                 caption_files: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None):
        self.kind = kind
        self.root = Path(root)
        self.paths = list(paths)  # absolute
        self.caption_lists = list(captions) if captions is not None else None
        self.caption_files = list(caption_files) if caption_files is not None else None
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.incomplete: list[tuple[str, str]] = []  # samples dropped at open, (id, reason)

    def __len__(self) -> int:
        return len(self.paths)

    def sample_id(self, i: int) -> str:
        """A readable id for messages: the image path relative to the source's folder when inside it."""
        return _relative(self.paths[i], self.root)

    def image(self, i: int) -> str:
        """The image file's path (open_image reads and decodes it)."""
        if not os.path.isfile(self.paths[i]):
            raise SampleError("missing file")
        return self.paths[i]

    def captions(self, i: int) -> list[str]:
        """The sample's candidate captions (one is chosen per epoch); SampleError when there is none."""
        if self.caption_lists is not None:
            found = [c for c in self.caption_lists[i] if c]
        elif self.caption_files is not None:
            found = read_caption_file(self.caption_files[i])
        else:
            raise SampleError("this source has class labels, not captions")
        if not found:
            raise SampleError("empty caption")
        return found


def read_caption_file(path: str) -> list[str]:
    """The non-blank lines of a sidecar caption file, each one caption."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise SampleError("caption file vanished") from e
    except UnicodeDecodeError as e:
        raise SampleError("caption file is not UTF-8 text") from e
    except OSError as e:
        raise SampleError(f"caption file unreadable: {e.strerror or e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension clipsearch can decode."""
    return os.path.splitext(name)[1].lower() in SUPPORTED_EXTENSIONS


def list_images(root: Path) -> list[Path]:
    """Image files under root, recursively, in sorted (deterministic) order; hidden files and folders skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / f for f in sorted(files) if not f.startswith(".") and is_image_name(f))
    return found


def _log_dropped(source: FileSource, what: str) -> None:
    if source.incomplete:
        shown = "; ".join(f"{sid} ({why})" for sid, why in source.incomplete[:_MAX_PROBLEMS_LOGGED])
        log.warning("%d %s left out: %s%s", len(source.incomplete), what, shown,
                    " ..." if len(source.incomplete) > _MAX_PROBLEMS_LOGGED else "")


# ---- tables ---------------------------------------------------------------------------------------------------------

def table_separator(path: Path, separator: str | None) -> str:
    """The given separator, else tab for .tsv or a header line with tabs (open_clip writes TSV named .csv), else comma."""
    if separator:
        return "\t" if separator in ("\\t", "tab") else separator
    if path.suffix.lower() == ".tsv":
        return "\t"
    return "\t" if "\t" in read_header_line(path) else ","


def read_header_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the table {path}: {e}", "give a UTF-8 CSV or TSV file with a header row") from e


def read_table(path: Path, separator: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV/TSV file, cells stripped."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=separator)
            header = [c.strip() for c in next(reader, [])]
            rows = [[c.strip() for c in row] for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"cannot read the table {path}: {e}", "give a UTF-8 CSV or TSV file with a header row") from e
    if not header:
        raise ConfigError(f"the table {path} is empty", "give a header row naming the image and caption columns")
    return header, rows


def pick_column(header: Sequence[str], wanted: str, default: str, fallbacks: Sequence[str]) -> str | None:
    """`wanted` when the header has it; when `wanted` is the default, the first fallback the header has."""
    if wanted in header:
        return wanted
    if wanted == default:
        return next((c for c in fallbacks if c in header), None)
    return None


def _path_base(table: Path, first_path: str) -> Path:
    """Relative paths are taken from the table's folder, or from the working directory when only that fits
    (open_clip resolves them from the working directory)."""
    base = table.resolve().parent
    if first_path and not Path(first_path).is_absolute() and not (base / first_path).exists() and Path(first_path).exists():
        log.info("image paths in %s are relative to the working directory, not the table's folder", table)
        return Path.cwd()
    return base


def _absolute(base: Path, path: str) -> str:
    return os.path.normpath(os.path.join(base, path))


def open_caption_table(path: Path, image_column: str, caption_column: str, separator: str | None) -> FileSource:
    """A caption table: one row per (image, caption); rows of the same image become one sample with several captions
    (so an image never meets itself as a negative in a batch, unlike one-sample-per-row)."""
    sep = table_separator(path, separator)
    header, rows = read_table(path, sep)
    image_col = pick_column(header, image_column, DEFAULT_IMAGE_COLUMN, _IMAGE_COLUMN_FALLBACKS)
    caption_col = pick_column(header, caption_column, DEFAULT_CAPTION_COLUMN, _CAPTION_COLUMN_FALLBACKS)
    if image_col is None or caption_col is None:
        missing = image_column if image_col is None else caption_column
        raise ConfigError(f"{path} has no column {missing!r} (it has: {', '.join(header)})",
                          "set data image_column / caption_column to the header's names, or separator if it is not "
                          f"{'a tab' if sep == chr(9) else repr(sep)}")
    ii, ci = header.index(image_col), header.index(caption_col)
    grouped: dict[str, list[str]] = {}
    for row in rows:
        image = row[ii] if ii < len(row) else ""
        if image:
            grouped.setdefault(image, []).append(row[ci] if ci < len(row) else "")
    if not grouped:
        raise ConfigError(f"the table {path} has no rows with an image path", "one row per (image, caption)")
    base = _path_base(path, next(iter(grouped)))
    return FileSource("csv", base, [_absolute(base, p) for p in grouped],
                      captions=[tuple(c for c in caps if c) for caps in grouped.values()])


def open_labels_table(path: Path, classes_file: str | None) -> FileSource:
    """A `relative_path,label` CSV (the format `clipsearch eval` reads) as class-labelled samples."""
    labelled = read_labels(path, classes_file)
    base = _path_base(path, labelled.paths[0])
    return FileSource("labels-csv", base, [_absolute(base, p) for p in labelled.paths], labels=labelled.labels,
                      class_names=labelled.classnames)


# ---- folders --------------------------------------------------------------------------------------------------------

def open_captions_folder(root: Path, images: list[Path] | None = None) -> FileSource:
    """Images with a same-stem .txt beside them (every non-blank line a caption); images without one are left out."""
    images = list_images(root) if images is None else images
    paths, caption_files, missing = [], [], []
    for image in images:
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            paths.append(str(image))
            caption_files.append(str(sidecar))
        else:
            missing.append((_relative(str(image), root), "no caption file beside it"))
    source = FileSource("captions-folder", root, paths, caption_files=caption_files)
    source.incomplete = missing
    _log_dropped(source, f"images in {root} without a .txt caption were")
    if not paths:
        raise ConfigError(f"no image in {root} has a caption file",
                          "put IMAGE.txt (one caption a line) beside each IMAGE.jpg, or use class folders")
    return source


def class_display_name(folder: str) -> str:
    """A class folder's name as a caption word: underscores read as spaces (golden_retriever -> golden retriever)."""
    return folder.replace("_", " ").strip()


def open_class_folders(root: Path, classes_file: str | None) -> FileSource:
    """ROOT/CLASS/…/image files, class = the top folder; classes_file (optional) lists folder names: subset and order."""
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes_file:
        wanted = read_classes(classes_file)
        absent = [c for c in wanted if c not in folders]
        if absent:
            raise ConfigError(f"{root} has no folder for the class(es) {', '.join(absent[:5])} named in {classes_file}",
                              "the classes file lists class folder names, one a line")
        folders = wanted
    paths, labels = [], []
    for label, name in enumerate(folders):
        for image in list_images(root / name):
            paths.append(str(image))
            labels.append(label)
    if not paths:
        raise ConfigError(f"no images in class folders under {root}", "lay out ROOT/CLASS_NAME/image.jpg")
    used = set(labels)
    empty = [name for label, name in enumerate(folders) if label not in used]
    if empty:
        log.warning("class folder(s) without images under %s: %s", root, ", ".join(empty[:10]))
    return FileSource("class-folders", root, paths, labels=labels,
                      class_names=[class_display_name(name) for name in folders])


def folder_kind(root: Path) -> tuple[str, list[Path] | None]:
    """What a folder holds: webdataset shards, sidecar-captioned images, or class folders (+ the image listing)."""
    if any(f.is_file() and f.name.lower().endswith((".tar", ".tar.gz", ".tgz")) for f in root.iterdir()):
        return "webdataset", None
    images = list_images(root)
    if any(image.with_suffix(".txt").is_file() for image in images):
        return "captions-folder", images
    if any(image.parent != root for image in images):
        return "class-folders", None
    raise ConfigError(f"{root} holds no training data clipsearch recognises",
                      "give a folder of .tar/.tar.gz shards, images with .txt captions beside them, class folders "
                      "(ROOT/CLASS/image.jpg), or a CSV/TSV of image paths and captions")


def table_kind(path: Path, image_column: str, caption_column: str, separator: str | None) -> str:
    """csv when the header has a caption column, labels-csv when it has relative_path and label."""
    sep = table_separator(path, separator)
    header = [c.strip() for c in next(csv.reader([read_header_line(path)], delimiter=sep), [])]
    if pick_column(header, caption_column, DEFAULT_CAPTION_COLUMN, _CAPTION_COLUMN_FALLBACKS):
        return "csv"
    if "label" in header and "relative_path" in header:
        return "labels-csv"
    raise ConfigError(f"{path} has neither a caption column nor relative_path,label (it has: {', '.join(header)})",
                      "name the columns with data image_column / caption_column, or give a relative_path,label CSV")
