"""WebDataset tar shards read with the standard library's tarfile: indexed once per open, then random access.

A shard holds samples as consecutive members sharing a key: `KEY.jpg` (or png, webp, ... any image format clipsearch
decodes) plus `KEY.txt` (a caption) and/or `KEY.cls` (a class index, or name, into a class list). Grouping follows
webdataset: the key is the member path up to the first dot of its file name, the extension the rest, lower-cased;
a new sample starts when the key changes or an extension repeats.

Access strategy: every shard is indexed once (tarfile walks the headers; only the tiny .cls members are read) and
the index is cached as JSON under CACHE_DIR/training-shards, keyed by the shard's path, size and modification time,
so later opens cost a JSON read; a changed shard is indexed again. A plain .tar is then read in place (seek + read
from per-process handles). A gzipped shard cannot be seeked, so on first use it is gunzipped (zlib, C speed) to a
temporary tar, indexed, and its used payloads (image, caption) are copied into a compact cache "pack": about the
size of the images themselves, without the tar's 512-byte headers and padding. Uncached shards are indexed in
parallel processes. Unlike webdataset's streaming shuffle buffer this gives a true global shuffle and exact,
decode-free resume; the price is random reads, which local disks and the page cache serve well.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipsearch.errors import ConfigError
from clipsearch.images import SUPPORTED_EXTENSIONS
from clipsearch.training.data_sources import SampleError

log = logging.getLogger(__name__)

PACK_FORMAT = 1
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Preferred image member when a sample has several (webdataset's "jpg;png;jpeg;webp" order, then the rest).
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp") + tuple(sorted(e[1:] for e in SUPPORTED_EXTENSIONS
                                                          if e[1:] not in ("jpg", "png", "jpeg", "webp")))
_WANTED = frozenset(IMAGE_EXTS) | {"txt", "cls"}
_GZIP_MAGIC = b"\x1f\x8b"
_BRACE_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def braceexpand(pattern: str) -> list[str]:
    """Expand `{a,b}` alternatives and `{0000..0004}` numeric ranges (zero-padded like the bounds), nested or not."""
    depth, start = 0, -1
    for pos, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1:pos], pattern[pos + 1:]
                return [head + choice + rest for choice in _brace_choices(body) for rest in braceexpand(tail)]
    return [pattern]


def _brace_choices(body: str) -> list[str]:
    numeric = _BRACE_RANGE.match(body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.lstrip("-").startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        return [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    parts, depth, last = [], 0, 0
    for pos, char in enumerate(body):
        depth += char == "{"
        depth -= char == "}"
        if char == "," and depth == 0:
            parts.append(body[last:pos])
            last = pos + 1
    parts.append(body[last:])
    return [expanded for part in parts for expanded in braceexpand(part)]


def is_shard_name(name: str) -> bool:
    """Whether a file name looks like a tar shard (.tar, .tar.gz, .tgz)."""
    return name.lower().endswith(SHARD_SUFFIXES)


def looks_like_shards(path: str) -> bool:
    """Whether a data path names shards (a list with ::, a brace pattern, a glob, or a .tar/.tar.gz file)."""
    return "::" in path or bool(re.search(r"\{.*\}|[*?\[]", path)) or is_shard_name(path)


def expand_shards(path: str) -> list[Path]:
    """The shard files a path names: `a::b` lists, brace patterns, globs, or a folder of shards (sorted)."""
    shards: list[Path] = []
    for part in path.split("::"):
        part = os.path.expanduser(part.strip())
        if not part:
            continue
        if os.path.isdir(part):
            found = sorted(p for p in Path(part).iterdir() if p.is_file() and is_shard_name(p.name))
            if not found:
                raise ConfigError(f"the folder {part} holds no .tar or .tar.gz shards", "give the shards' folder or pattern")
            shards.extend(found)
            continue
        for expanded in braceexpand(part):
            if re.search(r"[*?\[]", expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise ConfigError(f"no shard matches {expanded}", "check the data path pattern")
                shards.extend(Path(m) for m in matches)
            elif os.path.isfile(expanded):
                shards.append(Path(expanded))
            else:
                raise ConfigError(f"the shard {expanded} does not exist",
                                  "check the data path; brace ranges look like train-{0000..0004}.tar.gz")
    if not shards:
        raise ConfigError(f"the data path {path!r} names no shards", "give shard files, a pattern or a folder of shards")
    return shards


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits a member path: up to / after the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class ShardIndex:
    """One shard's complete samples in tar order, with where their payloads lie in `file`."""

    file: str  # the plain tar itself, or the decompressed pack of a gzipped shard
    name: str  # the shard's file name, for sample ids
    keys: list[str] = field(default_factory=list)
    image: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, size, extension)
    text: list[tuple[int, int] | None] = field(default_factory=list)
    cls: list[str | None] = field(default_factory=list)
    incomplete: list[tuple[str, str]] = field(default_factory=list)  # (key, why it was left out)

    def to_json(self) -> dict:
        return {"keys": self.keys, "image": self.image, "text": self.text, "cls": self.cls,
                "incomplete": self.incomplete}


class _Grouper:
    """Collects consecutive members into samples and records the complete ones in a ShardIndex."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self.key: str | None = None
        self.parts: dict[str, tuple[int, int, bytes | None]] = {}

    def add(self, key: str, ext: str, offset: int, size: int, payload: bytes | None) -> None:
        if key != self.key or ext in self.parts:
            self.flush()
            self.key = key
        self.parts[ext] = (offset, size, payload)

    def flush(self) -> None:
        if self.key is None:
            return
        key, parts = self.key, self.parts
        self.key, self.parts = None, {}
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None:
            self.index.incomplete.append((key, "no image member"))
            return
        if "txt" not in parts and "cls" not in parts:
            self.index.incomplete.append((key, "no .txt caption nor .cls class"))
            return
        self.index.keys.append(key)
        self.index.image.append((parts[image_ext][0], parts[image_ext][1], image_ext))
        self.index.text.append(parts["txt"][:2] if "txt" in parts else None)
        cls = parts.get("cls")
        self.index.cls.append(cls[2].decode("utf-8", "replace").strip() if cls and cls[2] is not None else None)


def _is_gzipped(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _index_tar(tar_path: Path, index: ShardIndex) -> ShardIndex:
    """Walk a plain tar's headers into `index` (offsets into tar_path); a damaged tail keeps the samples before it."""
    grouper = _Grouper(index)
    with tarfile.open(tar_path, "r:") as tar:  # a file that is not a tar at all fails here, as a ConfigError
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if ext not in _WANTED:
                    continue
                payload = tar.extractfile(member).read() if ext == "cls" else None
                grouper.add(key, ext, member.offset_data, member.size, payload)
        except (tarfile.TarError, EOFError, OSError) as e:
            # A truncated download keeps the samples before the damage (as webdataset's error handlers do).
            log.warning("shard %s is damaged after %d samples (%s): using those", index.name, len(index.keys), e)
            index.incomplete.append(("<rest of shard>", f"damaged: {e}"))
    grouper.flush()
    return index


def _decompress(path: Path, target) -> str | None:
    """Gunzip `path` into the open file `target` in C-speed chunks, keeping everything before any damage.

    Returns the damage, or None. (gzip.open would drop the last chunk it was decoding when the stream breaks.)
    """
    inflater = zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                while chunk:
                    target.write(inflater.decompress(chunk))
                    chunk = inflater.unused_data if inflater.eof else b""
                    if inflater.eof and chunk:  # concatenated gzip members
                        inflater = zlib.decompressobj(wbits=31)
        target.write(inflater.flush())
    except zlib.error as e:
        return str(e)
    return None if inflater.eof else "the compressed stream ends early"


def _pack_payloads(index: ShardIndex, tar_path: Path, out) -> None:
    """Copy the used payloads (image, caption) of `index` from tar_path to `out`, repointing the offsets there."""
    with open(tar_path, "rb") as tar:
        def copy(offset: int, size: int) -> int:
            tar.seek(offset)
            data = tar.read(size)
            at = out.tell()
            out.write(data)
            return at
        index.image = [(copy(off, size), size, ext) for off, size, ext in index.image]
        index.text = [(copy(*text), text[1]) if text else None for text in index.text]


def _cache_paths(path: Path, cache_dir: Path) -> tuple[Path, Path, dict]:
    stat = path.stat()
    source = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": PACK_FORMAT}
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20]
    stem = f"{path.name.split('.')[0][:60]}-{digest}"
    folder = cache_dir / "training-shards"
    return folder / f"{stem}.json", folder / f"{stem}.pack", source


def _load_cached(meta: Path, source: dict, name: str) -> ShardIndex | None:
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
        if saved.get("source") != source or Path(saved["file"]).stat().st_size != saved["file_size"]:
            return None
        return ShardIndex(saved["file"], name, saved["keys"], [tuple(x) for x in saved["image"]],
                          [tuple(x) if x else None for x in saved["text"]], saved["cls"],
                          [tuple(x) for x in saved["incomplete"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomically(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)  # concurrent ranks may both build a pack: the last rename wins, both complete
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_index(path: Path, cache_dir: Path) -> ShardIndex:
    meta, pack, source = _cache_paths(path, cache_dir)
    meta.parent.mkdir(parents=True, exist_ok=True)
    if not _is_gzipped(path):
        index = _index_tar(path, ShardIndex(str(path), path.name))
    else:
        index = ShardIndex(str(pack), path.name)
        fd, tmp = tempfile.mkstemp(dir=meta.parent, prefix=f".{path.name}.", suffix=".tar")
        try:
            with os.fdopen(fd, "wb") as f:
                damage = _decompress(path, f)
            if damage:
                log.warning("gzipped shard %s is damaged (%s): using the samples before the damage", path, damage)
                index.incomplete.append(("<rest of shard>", f"damaged: {damage}"))
            _index_tar(Path(tmp), index)
            _write_atomically(pack, lambda out: _pack_payloads(index, Path(tmp), out))
        finally:
            Path(tmp).unlink(missing_ok=True)
    body = {"source": source, "file": index.file, "file_size": Path(index.file).stat().st_size, **index.to_json()}
    _write_atomically(meta, lambda f: f.write(json.dumps(body).encode()))
    return index


def index_shard(path: Path, cache_dir: Path) -> ShardIndex:
    """Index one shard, or load its index from the cache (plain: read in place; gzipped: via its cache pack)."""
    try:
        meta, _, source = _cache_paths(path, cache_dir)
        return _load_cached(meta, source, path.name) or _build_index(path, cache_dir)
    except tarfile.TarError as e:
        raise ConfigError(f"cannot read the shard {path}: {e}", "check that it is a .tar or .tar.gz file") from e
    except OSError as e:
        raise ConfigError(f"cannot read the shard {path}: {e}",
                          "check the file's permissions and that the cache folder is writable") from e


def index_shards(paths: list[Path], cache_dir: Path) -> list[ShardIndex]:
    """Index every shard, building the uncached ones in parallel processes (tarfile's header parsing is pure Python)."""
    found: dict[int, ShardIndex] = {}
    for n, path in enumerate(paths):
        meta, _, source = _cache_paths(path, cache_dir)
        cached = _load_cached(meta, source, path.name)
        if cached is not None:
            found[n] = cached
    todo = [n for n in range(len(paths)) if n not in found]
    processes = min(len(todo), os.cpu_count() or 1, 16)
    if todo:
        log.info("indexing %d shard(s) once (cached under %s)", len(todo), cache_dir / "training-shards")
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            for n, index in zip(todo, pool.map(index_shard, [paths[n] for n in todo], [cache_dir] * len(todo))):
                found[n] = index
    else:
        found.update((n, index_shard(paths[n], cache_dir)) for n in todo)
    return [found[n] for n in range(len(paths))]


def _class_index(text: str | None, by_name: dict[str, int], n: int) -> int:
    if text is None:
        return -1
    try:
        value = int(text)
    except ValueError:
        return by_name.get(text.lower(), -1)
    return value if 0 <= value < n else -1


class ShardSource:
    """Samples from indexed shards; payloads read with per-process file handles (safe under DataLoader fork)."""

    kind = "webdataset"

    def __init__(self, shards: list[ShardIndex], class_names: list[str] | None):
        self.files = [s.file for s in shards]
        self.names = [s.name for s in shards]
        self.shard_of = np.concatenate([np.full(len(s.keys), n, np.int32) for n, s in enumerate(shards)])
        self.keys = [k for s in shards for k in s.keys]
        self.image_at = np.array([x[:2] for s in shards for x in s.image], np.int64).reshape(-1, 2)
        self.image_ext = [x[2] for s in shards for x in s.image]
        self.text_at = np.array([x or (-1, -1) for s in shards for x in s.text], np.int64).reshape(-1, 2)
        self.class_names = class_names
        by_name = {c.lower(): i for i, c in enumerate(class_names or [])}
        self.labels = np.array([_class_index(c, by_name, len(class_names or [])) for s in shards for c in s.cls],
                               np.int64)
        self.has_cls = any(c is not None for s in shards for c in s.cls)
        self.incomplete = [(f"{s.name}:{key}", why) for s in shards for key, why in s.incomplete]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def sample_id(self, i: int) -> str:
        return f"{self.names[self.shard_of[i]]}:{self.keys[i]}"

    def _read(self, i: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker must not share file offsets with its parent
            self._handles, self._pid = {}, os.getpid()
        shard = int(self.shard_of[i])
        handle = self._handles.get(shard)
        try:
            if handle is None:
                handle = self._handles[shard] = open(self.files[shard], "rb")
            handle.seek(offset)
            data = handle.read(size)
        except OSError as e:
            raise SampleError(f"shard unreadable: {e.strerror or e}") from e
        if len(data) != size:
            raise SampleError("shard truncated since it was indexed")
        return data

    def image(self, i: int) -> bytes:
        """The image member's bytes."""
        offset, size = self.image_at[i]
        if size == 0:
            raise SampleError("empty image member")
        return self._read(i, int(offset), int(size))

    def image_extension(self, i: int) -> str:
        return self.image_ext[i]

    def captions(self, i: int) -> list[str]:
        """The .txt member as one caption; SampleError when absent or empty."""
        offset, size = self.text_at[i]
        if offset < 0:
            raise SampleError("no .txt caption and no usable .cls class")
        try:
            text = self._read(i, int(offset), int(size)).decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise SampleError("caption is not UTF-8 text") from e
        if not text:
            raise SampleError("empty caption")
        return [text]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
