"""OpenClipEncoder: an Encoder backed by open_clip, with weight resolution that fails fast when offline."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from clipsearch.encoders import (
    HF_HUB_PREFIX,
    LOCAL_DIR_PREFIX,
    Encoder,
    EncoderSpec,
    is_random_weights,
    looks_like_path,
    model_id_for,
    resolve_device,
)
from clipsearch.errors import ConfigError, UnknownModelError, WeightsUnavailableError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
HUB_PROBE_TIMEOUT_S = 3.0
DEFAULT_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

# Serialises loads: the Hub offline switch below is process-global while it is on.
_LOAD_LOCK = threading.Lock()
_CONFIGS_LOCK = threading.Lock()
_configs_added = False


def register_model_configs() -> None:
    """Make clipsearch's bundled model configs (clipsearch-tiny) known to open_clip; idempotent."""
    global _configs_added
    with _CONFIGS_LOCK:
        if _configs_added:
            return
        import clipsearch.model_configs

        open_clip.add_model_config(Path(clipsearch.model_configs.__file__).resolve().parent)
        _configs_added = True


@dataclass(frozen=True)
class _Source:
    """Where the weights come from, in the form open_clip wants."""

    kind: str  # 'tag', 'file', 'local-dir', 'hf-hub' or 'random'
    model: str  # model name handed to open_clip
    pretrained: str | None  # pretrained handed to open_clip (None for schemas and random)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_model_name(model: str) -> str:
    """The open_clip name of a built-in model (open_clip maps '/' to '-'), or UnknownModelError."""
    name = model.replace("/", "-")
    known = open_clip.list_models()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownModelError(
        f"unknown model '{model}'",
        hint + "`python -c 'import open_clip; print(open_clip.list_models())'` lists the built-in ones; "
        "hf-hub:org/repo and local-dir:/path also work",
    )


def _resolve_source(spec: EncoderSpec) -> _Source:
    """Validate model and pretrained (no I/O beyond stat) and say where the weights come from."""
    model = spec.model.strip()
    pretrained = (spec.pretrained or "").strip()
    if model.startswith(HF_HUB_PREFIX):
        log.debug("model %s comes with its own weights; pretrained=%r is ignored", model, pretrained)
        return _Source("hf-hub", model, None)
    if model.startswith(LOCAL_DIR_PREFIX):
        path = Path(model[len(LOCAL_DIR_PREFIX):]).expanduser().resolve()
        return _Source("local-dir", f"{LOCAL_DIR_PREFIX}{path}", None)
    if not is_random_weights(pretrained) and Path(pretrained).expanduser().is_dir():
        # A folder as --pretrained is a local-dir model: it holds its own config, so --model is moot.
        path = Path(pretrained).expanduser().resolve()
        log.info("pretrained %s is a folder: loading it as %s%s (model %s ignored)", pretrained, LOCAL_DIR_PREFIX, path, model)
        return _Source("local-dir", f"{LOCAL_DIR_PREFIX}{path}", None)
    name = _check_model_name(model)
    if is_random_weights(pretrained):
        return _Source("random", name, None)
    if open_clip.get_pretrained_cfg(name, pretrained):
        return _Source("tag", name, pretrained)
    if looks_like_path(pretrained):
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"weights file {path} for model '{model}' does not exist",
                "check the --pretrained path, or pass an open_clip tag or `none`",
            )
        return _Source("file", name, str(path))
    tags = open_clip.list_pretrained_tags_by_model(name)
    known = f"known tags for {name}: {', '.join(tags)}" if tags else f"open_clip has no pretrained tags for {name}"
    raise UnknownModelError(
        f"unknown pretrained tag '{pretrained}' for model '{model}'",
        f"{known}; or a local weights file path (.bin/.pt/.pth/.safetensors), or `none` for random weights",
    )


def _hub_cache(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"


def _offline_reason() -> str:
    """Why the Hub cannot be reached ('' when it can, or when a proxy makes a direct probe meaningless)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants
    except ImportError:
        return ""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return ""
    # huggingface_hub retries unreachable hosts with backoff (~45 s before it gives up), so probe once
    # ourselves and switch it to cache-only mode when the host cannot be reached.
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot reach {host}:{port}: {_short(e, 120)}"
    return ""


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """Put huggingface_hub in cache-only mode for the block (it reads HF_HUB_OFFLINE only at import)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        enabled = False
    if not enabled:
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _safetensors_name(filename: str) -> str:
    # Mirrors open_clip.pretrained._get_safe_alternatives: the .safetensors twin it tries first.
    if filename == DEFAULT_HF_WEIGHTS:
        return "open_clip_model.safetensors"
    return filename.rsplit(".", 1)[0] + ".safetensors"


def _repo_not_found(e: BaseException) -> bool:
    try:
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        return False
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RepositoryNotFoundError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _offline_hint(repo: str, filename: str) -> str:
    return (
        f"on a connected machine download {filename} (or {_safetensors_name(filename)}) from "
        f"https://huggingface.co/{repo} and pass --pretrained /path/to/that/file; or copy a populated model "
        "cache folder here and point --model-cache-dir (CLIPSEARCH_MODEL_CACHE_DIR) at it"
    )


def _fetch_weights(source: _Source, cache_dir: str | None, offline: str) -> None:
    """Make sure the weights are local (download or cache) before building, raising our errors."""
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    via = f" ({offline}; only the local cache was checked)" if offline else ""
    if source.kind == "tag":
        cfg = open_clip.get_pretrained_cfg(source.model, source.pretrained)
        # open_clip's hf_hub entries are 'org/repo/' (default file) or 'org/repo/filename'.
        repo, filename = os.path.split(cfg.get("hf_hub", ""))
        filename = filename or DEFAULT_HF_WEIGHTS
        where = f"Hugging Face Hub repo {repo}" if repo else f"URL {cfg.get('url')}"
        try:
            if download_pretrained(cfg, cache_dir=cache_dir):
                return
            error: BaseException = RuntimeError("open_clip has no download source for this tag")
        except Exception as e:  # noqa: BLE001 - every failure here means "no weights"
            error = e
        raise WeightsUnavailableError(
            f"cannot get the '{source.pretrained}' weights for model '{source.model}': tried {where}{via} "
            f"with cache {_hub_cache(cache_dir)}: {'not in the cache' if offline else _short(error)}",
            _offline_hint(repo, filename) if repo else "download the file on a connected machine and pass --pretrained /path/to/it",
        ) from error
    if source.kind == "hf-hub":
        repo = source.model[len(HF_HUB_PREFIX):]
        try:
            download_pretrained_from_hf(repo, filename="open_clip_config.json", cache_dir=cache_dir)
            # open_clip would silently fall back to random weights if this failed inside create_model.
            download_pretrained_from_hf(repo, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001
            if _repo_not_found(e):
                raise UnknownModelError(
                    f"Hugging Face Hub has no repo '{repo}' (or it is private or gated)",
                    "check the name after hf-hub:; for gated repos log in with `hf auth login`",
                ) from e
            raise WeightsUnavailableError(
                f"cannot get model '{source.model}': tried Hugging Face Hub repo {repo}{via} "
                f"with cache {_hub_cache(cache_dir)}: {'not in the cache' if offline else _short(e)}",
                _offline_hint(repo, DEFAULT_HF_WEIGHTS).replace(
                    "pass --pretrained /path/to/that/file", "put it with open_clip_config.json in a folder and pass "
                    "--model local-dir:/path/to/folder"
                ),
            ) from e
    if source.kind == "local-dir":
        _check_local_dir(Path(source.model[len(LOCAL_DIR_PREFIX):]))


def _check_local_dir(path: Path) -> None:
    layout = (
        "a local-dir model folder holds open_clip_config.json ({\"model_cfg\": ..., \"preprocess_cfg\": ...}) and "
        "open_clip_model.safetensors or open_clip_pytorch_model.bin, like an open_clip Hugging Face repo"
    )
    if not path.is_dir():
        raise WeightsUnavailableError(f"model folder {path} does not exist", layout)
    if not (path / "open_clip_config.json").is_file():
        raise WeightsUnavailableError(f"model folder {path} has no open_clip_config.json", layout)
    if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in path.iterdir()):
        # open_clip would warn and carry on with random weights; refuse instead.
        raise WeightsUnavailableError(f"model folder {path} has no weights file (.safetensors/.bin/.pth)", layout)


@contextlib.contextmanager
def _no_implicit_root_handler():
    """Stop open_clip's module-level logging.* calls from running logging.basicConfig() as a side effect."""
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


def _build(source: _Source, cache_dir: str | None):
    """Create model, eval transform and tokenizer on the CPU; random init is seeded so processes agree."""
    # fork_rng(devices=[]) keeps the caller's RNG untouched and never initialises CUDA; the model is
    # built on the CPU so random weights are identical whatever device it later runs on.
    with _no_implicit_root_handler(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.model, pretrained=source.pretrained, device="cpu", precision="fp32", cache_dir=cache_dir
        )
    with _no_implicit_root_handler():
        tokenizer = open_clip.get_tokenizer(source.model, cache_dir=cache_dir)
    return model, preprocess, tokenizer


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _precision_plan(device: str, precision: str) -> tuple[torch.dtype, bool]:
    """(dtype the model runs in, whether to wrap forward passes in CUDA fp16 autocast)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16, False
    if device.startswith("cuda"):
        return torch.float32, precision in ("auto", "fp16")
    if precision == "fp16":
        if device == "mps":
            return torch.float16, False
        log.warning("precision fp16 is not supported on %s; using fp32 (bf16 is the fast option on CPU)", device)
    return torch.float32, False


class OpenClipEncoder(Encoder):
    """An open_clip CLIP model: tag, weights file, none (seeded random), hf-hub: or local-dir: sources."""

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.device = resolve_device(spec.device)
        precision = (spec.precision or "auto").strip().lower()
        self._dtype, self._autocast = _precision_plan(self.device, precision)
        self.precision = "fp16-autocast" if self._autocast else _DTYPE_NAMES[self._dtype]
        self.model_id = model_id_for(spec.model, spec.pretrained)
        cache_dir = str(Path(spec.cache_dir).expanduser()) if spec.cache_dir else None
        register_model_configs()
        source = _resolve_source(spec)
        with _LOAD_LOCK:
            offline = _offline_reason() if source.kind in ("tag", "hf-hub") else ""
            if offline:
                log.info("Hugging Face Hub unavailable (%s): using cached weights only", offline)
            with _hub_offline(bool(offline)):
                _fetch_weights(source, cache_dir, offline)
                try:
                    model, self._transform, self._tokenizer = _build(source, cache_dir)
                except Exception as e:  # noqa: BLE001 - a bad file/folder must not surface as a traceback
                    if source.kind == "random":
                        raise
                    what = source.pretrained or source.model
                    raise WeightsUnavailableError(
                        f"cannot load weights {what} for model '{spec.model}': {_short(e)}",
                        "the file may be corrupt, truncated or made for a different model; check --model matches "
                        "the weights, or download them again",
                    ) from e
        if source.kind == "random":
            log.warning(
                "model %s has RANDOM weights (pretrained=%s): search results will be meaningless; "
                "use this only for tests and benchmarks", spec.model, spec.pretrained,
            )
        model = model.to(self.device, dtype=self._dtype) if self._dtype != torch.float32 else model.to(self.device)
        self.model = model.eval()
        size = self.model.visual.preprocess_cfg.get("size", 224)
        self.image_size = int(max(size) if isinstance(size, (tuple, list)) else size)
        self.dim = int(getattr(self.model.visual, "output_dim", 0) or self._probe_dim())
        log.info("loaded %s on %s (%s), dim %d", self.model_id, self.device, self.precision, self.dim)

    def _probe_dim(self) -> int:
        # Some towers (timm, HF text) do not expose output_dim: ask the model once.
        blank = torch.zeros(3, self.image_size, self.image_size)
        return self._run(self.model.encode_image, blank.unsqueeze(0), cast=True).shape[1]

    def _run(self, fn, x: torch.Tensor, cast: bool) -> np.ndarray:
        x = x.to(self.device, dtype=self._dtype if cast else None, non_blocking=True)
        with torch.inference_mode():
            autocast = torch.autocast("cuda", dtype=torch.float16) if self._autocast else contextlib.nullcontext()
            with autocast:
                out = fn(x)
            out = F.normalize(out.float(), dim=-1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)

    def preprocess(self, image: Any) -> torch.Tensor:
        """RGB PIL image -> CPU float tensor [3, image_size, image_size] (the model's eval transform)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._transform(image)

    def encode_images(self, batch: Sequence[torch.Tensor]) -> np.ndarray:
        """preprocess() outputs -> float32 [n, dim], L2-normalised rows."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(self.model.encode_image, torch.stack(list(batch)), cast=True)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [n, dim], L2-normalised rows."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Token ids stay integer: only image inputs are cast to the model dtype.
        return self._run(self.model.encode_text, self._tokenizer(list(texts)), cast=False)
