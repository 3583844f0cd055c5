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
from PIL import Image

from clipsearch.encoders import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, Encoder, EncoderSpec, cpu_has_native_bf16
from clipsearch.encoders import is_random_weights, looks_like_path, model_id_for, resolve_device, split_reference
from clipsearch.encoders import built_model_folder, warn_random_weights
from clipsearch.encoders.model_cache import cache_key, load_built, save_built
from clipsearch.encoders.image_cut import find_class_token_tower, plan_image_cut
from clipsearch.encoders.text_cut import find_causal_tower, plan_text_cut
from clipsearch.errors import ConfigError, UnknownModelError, WeightsUnavailableError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
HUB_PROBE_TIMEOUT_S = 3.0
DEFAULT_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_LOCAL_DIR_LAYOUT = (
    'a local-dir model folder holds open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}) and '
    "open_clip_model.safetensors or open_clip_pytorch_model.bin, like an open_clip Hugging Face repo"
)
_LOAD_LOCK = threading.Lock()  # serialises loads: the Hub offline switch is process-global while on
_configs_added = False


def register_model_configs() -> None:
    """Make clipsearch's bundled model configs (clipsearch-tiny) known to open_clip; idempotent."""
    global _configs_added
    with _LOAD_LOCK:
        if not _configs_added:
            import clipsearch.model_configs

            open_clip.add_model_config(Path(clipsearch.model_configs.__file__).resolve().parent)
            _configs_added = True


@dataclass(frozen=True)
class _Source:
    kind: str  # 'tag', 'file', 'local-dir', 'hf-hub' or 'random'
    model: str  # model name handed to open_clip
    pretrained: str | None  # pretrained handed to open_clip (None for schemas and random weights)


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_model_name(model: str) -> str:
    name = model.replace("/", "-")  # as open_clip does: 'ViT-B/32' is 'ViT-B-32'
    known = open_clip.list_models()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    raise UnknownModelError(
        f"unknown model '{model}'",
        (f"did you mean {', '.join(close)}? " if close else "")
        + "`python -c 'import open_clip; print(open_clip.list_models())'` lists the built-in ones; "
        "hf-hub:org/repo and local-dir:/path also work",
    )


def _resolve_source(spec: EncoderSpec) -> _Source:
    """Validate model and pretrained without loading anything and say where the weights come from."""
    model, pretrained = split_reference(spec.model.strip(), (spec.pretrained or "").strip())
    if model.startswith(HF_HUB_PREFIX):
        return _Source("hf-hub", model, None)  # the repo holds its own weights: pretrained is moot
    if model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model[len(LOCAL_DIR_PREFIX):]).expanduser().resolve()
        return _Source("local-dir", f"{LOCAL_DIR_PREFIX}{folder}", None)
    if not is_random_weights(pretrained) and Path(pretrained).expanduser().is_dir():
        # A folder as --pretrained is a local-dir model: it holds its own config, so --model is moot.
        log.info("pretrained %s is a folder: loading it as a local-dir model (model %s ignored)", pretrained, model)
        return _Source("local-dir", LOCAL_DIR_PREFIX + str(Path(pretrained).expanduser().resolve()), None)
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
    raise UnknownModelError(
        f"unknown pretrained tag '{pretrained}' for model '{model}'",
        (f"known tags for {name}: {', '.join(tags)}" if tags else f"open_clip has no pretrained tags for {name}")
        + "; or a local weights file path (.bin/.pt/.pth/.safetensors), or `none` for random weights",
    )


def _offline_reason() -> str:
    """Why the Hub cannot be reached ('' when it can, or when a proxy makes a direct probe meaningless)."""
    # Read the env var now: huggingface_hub only read it when first imported.
    if any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants
    except ImportError:
        return ""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return ""
    # huggingface_hub retries an unreachable host with backoff (~45 s before it gives up), so probe once
    # and switch it to cache-only mode when the host cannot be reached.
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot reach {host}:{port}: {_short(e, 120)}"
    return ""


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """Cache-only huggingface_hub for the block: it reads the HF_HUB_OFFLINE env var only at import."""
    try:
        from huggingface_hub import constants
    except ImportError:
        enabled = False
    previous = constants.HF_HUB_OFFLINE if enabled else None
    if enabled:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if enabled:
            constants.HF_HUB_OFFLINE = previous


def _hub_cache(cache_dir: str | None) -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        HF_HUB_CACHE = "~/.cache/huggingface/hub"
    return cache_dir or HF_HUB_CACHE


def _repo_not_found(e: BaseException | None) -> bool:
    try:
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        return False
    for _ in range(10):  # open_clip re-raises inside except blocks, so the Hub's error is in the chain
        if e is None or isinstance(e, RepositoryNotFoundError):
            return e is not None
        e = e.__cause__ or e.__context__
    return False


def _offline_hint(repo: str, filename: str, use: str = "pass --pretrained /path/to/that/file") -> str:
    # open_clip tries the .safetensors twin first (open_clip.pretrained._get_safe_alternatives)
    twin = filename.rsplit(".", 1)[0] + ".safetensors"
    twin = "open_clip_model.safetensors" if filename == DEFAULT_HF_WEIGHTS else twin
    return (
        f"on a connected machine download {filename} (or {twin}) from https://huggingface.co/{repo} and {use}; "
        "or copy a populated model cache folder here and point --model-cache-dir (CLIPSEARCH_MODEL_CACHE_DIR) at it"
    )


def _fetch_weights(source: _Source, cache_dir: str | None, offline: str) -> None:
    """Make sure the weights are local (downloaded or cached) before building, raising our errors."""
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    tried = f" ({offline}; only the local cache was checked)" if offline else ""
    tried += f" with cache {_hub_cache(cache_dir)}"
    if source.kind == "tag":
        cfg = open_clip.get_pretrained_cfg(source.model, source.pretrained)
        repo, filename = os.path.split(cfg.get("hf_hub", ""))  # 'org/repo/' (default file) or 'org/repo/file'
        where = f"Hugging Face Hub repo {repo}" if repo else f"URL {cfg.get('url')}"
        try:
            if download_pretrained(cfg, cache_dir=cache_dir):
                return
            raise RuntimeError("open_clip has no download source for this tag")
        except Exception as e:  # noqa: BLE001 - every failure here means "no weights"
            raise WeightsUnavailableError(
                f"cannot get the '{source.pretrained}' weights for model '{source.model}': tried {where}{tried}: "
                + ("not in the cache" if offline else _short(e)),
                _offline_hint(repo, filename or DEFAULT_HF_WEIGHTS) if repo
                else "download the file on a connected machine and pass --pretrained /path/to/it",
            ) from e
    elif source.kind == "hf-hub":
        repo = source.model[len(HF_HUB_PREFIX):]
        try:
            download_pretrained_from_hf(repo, filename="open_clip_config.json", cache_dir=cache_dir)
            # Inside create_model a failed weights download only warns and leaves random weights.
            download_pretrained_from_hf(repo, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001
            if _repo_not_found(e):
                raise UnknownModelError(
                    f"Hugging Face Hub has no repo '{repo}' (or it is private or gated)",
                    "check the name after hf-hub:; for a gated repo log in with `hf auth login`",
                ) from e
            raise WeightsUnavailableError(
                f"cannot get model '{source.model}': tried Hugging Face Hub repo {repo}{tried}: "
                + ("not in the cache" if offline else _short(e)),
                _offline_hint(repo, DEFAULT_HF_WEIGHTS, "put it with open_clip_config.json in a folder, then pass "
                              "--model local-dir:/path/to/folder"),
            ) from e
    elif source.kind == "local-dir":
        path = Path(source.model[len(LOCAL_DIR_PREFIX):])
        if not path.is_dir():
            raise WeightsUnavailableError(f"model folder {path} does not exist", _LOCAL_DIR_LAYOUT)
        if not (path / "open_clip_config.json").is_file():
            raise WeightsUnavailableError(f"model folder {path} has no open_clip_config.json", _LOCAL_DIR_LAYOUT)
        if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in path.iterdir()):
            # open_clip would warn and carry on with random weights: refuse instead.
            raise WeightsUnavailableError(f"model folder {path} has no weights file", _LOCAL_DIR_LAYOUT)


@contextlib.contextmanager
def _no_implicit_root_handler():
    """Stop open_clip's module-level logging.warning() calls from running logging.basicConfig()."""
    root, guard = logging.getLogger(), logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(guard)
    try:
        yield
    finally:
        if added:
            root.removeHandler(guard)


def _quick_gelu(source: _Source) -> bool:
    """Whether the tag was trained with QuickGELU (open_clip only warns about it; clipsearch honours it)."""
    if source.kind != "tag":
        return False
    return bool(open_clip.get_pretrained_cfg(source.model, source.pretrained).get("quick_gelu"))


def _built_cache_key(source: _Source) -> str | None:
    """Key of the built-model cache, or None when this source is not cached."""
    config = open_clip.get_model_config(source.model) or {}
    if config.get("text_cfg", {}).get("hf_tokenizer_name") or "timm_model_name" in config.get("vision_cfg", {}):
        return None  # tokenizers and towers from other libraries may need the Hub: keep the normal path
    return cache_key(source.kind, source.model, source.pretrained, _quick_gelu(source))


def _build(source: _Source, cache_dir: str | None):
    """Model (on the CPU, fp32), eval transform and tokenizer; random init is seeded so processes agree."""
    # fork_rng(devices=[]) leaves the caller's RNG untouched and never initialises CUDA; building on the
    # CPU makes random weights identical whatever device the model later runs on.
    # Tags trained with QuickGELU (e.g. ViT-B-32 'openai') only get a warning from open_clip; honour them.
    with _no_implicit_root_handler(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(
            source.model, pretrained=source.pretrained, device="cpu", precision="fp32", cache_dir=cache_dir,
            force_quick_gelu=_quick_gelu(source),
        )
        tokenizer = open_clip.get_tokenizer(source.model, cache_dir=cache_dir)
    return model, preprocess, tokenizer


def _precision_plan(device: str, precision: str) -> tuple[torch.dtype, bool]:
    """(dtype the model runs in, whether forward passes run under CUDA fp16 autocast).

    auto: fp16 autocast on CUDA (fp32 weights, so nothing is lost, and fp16 runs on every CUDA GPU); bf16
    weights on a CPU with native bf16 (3-4x fp32 for images, embeddings at cosine >= 0.999); else fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return torch.bfloat16, False  # a converted model: autocast on the CPU re-casts weights every call (slower)
    if device.startswith("cuda"):
        return torch.float32, precision in ("auto", "fp16")
    if precision == "auto" and device == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, False
    if precision == "fp16":
        if device == "mps":
            return torch.float16, False
        log.warning("precision fp16 is not supported on %s; using fp32 (bf16 is the fast option there)", device)
    return torch.float32, False


_JPEGS_PER_DECODE = 16


def _image_size(model: torch.nn.Module) -> int:
    size = model.visual.preprocess_cfg.get("size", 224)
    return int(max(size) if isinstance(size, (tuple, list)) else size)


class OpenClipEncoder(Encoder):
    """An open_clip model from a tag, weights file, none (seeded random), hf-hub: or local-dir: source."""

    runtime = "torch"

    def __init__(self, spec: EncoderSpec, cache_built: bool = True):
        """Load the model a spec names (cache_built: keep the built model in the built-model cache)."""
        self.spec = spec
        self.device = resolve_device(spec.device)  # config errors first, before any slow loading
        self._dtype, self._autocast = _precision_plan(self.device, (spec.precision or "auto").strip().lower())
        self.precision = "fp16-autocast" if self._autocast else _DTYPE_NAMES[self._dtype]
        self.model_id = model_id_for(spec.model, spec.pretrained)
        cache_dir = str(Path(spec.cache_dir).expanduser()) if spec.cache_dir else None
        register_model_configs()
        source = _resolve_source(spec)
        built_key = _built_cache_key(source)
        # One cache file per precision: converting 150M weights to bf16 costs more than loading them.
        key = f"{built_key}-{_DTYPE_NAMES[self._dtype]}" if built_key else None
        cached = load_built(built_model_folder(cache_dir), key, source.model, _quick_gelu(source)) if key else None
        if cached is not None:
            model, self._transform, metadata = cached
            self._tokenizer = open_clip.get_tokenizer(source.model, cache_dir=cache_dir)
            # The cut was verified in fp32 when the cache was written; the tower found now is that same code path.
            self._text_tower = find_causal_tower(model)[0] if metadata.get("text_cut") == "verified" else None
            self._image_tower = find_class_token_tower(model)[0] if metadata.get("image_cut") == "verified" else None
        else:
            model = self._build_first_time(spec, source, cache_dir).eval()
            # Decided in fp32 on the CPU, before any conversion, so the check is exact whatever precision runs.
            self._text_tower = plan_text_cut(model, self._tokenizer, "cpu")
            self._image_tower = plan_image_cut(model, _image_size(model))
            model = model.to(dtype=self._dtype)
            if key and cache_built:
                save_built(built_model_folder(cache_dir), key, model, {
                    "text_cut": "verified" if self._text_tower is not None else "off",
                    "image_cut": "verified" if self._image_tower is not None else "off"})
        if source.kind == "random":
            warn_random_weights(spec.model, spec.pretrained)
        self.text_truncation = self._text_tower is not None
        self.model = model.to(self.device).eval()
        self.image_size = _image_size(self.model)
        self.dim = int(getattr(self.model.visual, "output_dim", 0) or self._probe_dim())
        log.info("loaded %s on %s (%s), dim %d, text truncation %s, image class-token cut %s", self.model_id,
                 self.device, self.precision, self.dim, "on" if self.text_truncation else "off",
                 "on" if self._image_tower is not None else "off")

    @property
    def image_tower(self) -> torch.nn.Module | None:
        """The verified class-token cut of the image tower (same features as model.visual), or None."""
        return self._image_tower

    @property
    def tokenizer(self) -> Any:
        """The model's open_clip tokenizer."""
        return self._tokenizer

    def _build_first_time(self, spec: EncoderSpec, source: _Source, cache_dir: str | None):
        """Fetch weights if needed and build the fp32 CPU model the slow way; sets transform and tokenizer."""
        with _LOAD_LOCK:
            offline = _offline_reason() if source.kind in ("tag", "hf-hub") else ""
            if offline:
                log.info("Hugging Face Hub unavailable (%s): using cached weights only", offline)
            with _hub_offline(bool(offline)):
                _fetch_weights(source, cache_dir, offline)
                try:
                    model, self._transform, self._tokenizer = _build(source, cache_dir)
                    return model
                except Exception as e:  # noqa: BLE001 - a bad file or folder must not surface as a traceback
                    if source.kind == "random":
                        raise
                    raise WeightsUnavailableError(
                        f"cannot load weights {source.pretrained or source.model} for model '{spec.model}': "
                        + _short(e),
                        "the file may be corrupt, truncated or made for another model: check that --model matches "
                        "the weights, or download them again",
                    ) from e

    def _probe_dim(self) -> int:
        # Some towers (timm, HF) do not expose output_dim: ask the model once.
        return self._run(self.model.encode_image, torch.zeros(1, 3, self.image_size, self.image_size), True).shape[1]

    def _run(self, fn, x: torch.Tensor, cast: bool) -> np.ndarray:
        if self.device.startswith("cuda") and x.device.type == "cpu":
            # A page-locked copy lets the host-to-device transfer run asynchronously (DMA) instead of staging.
            x = x.pin_memory()
        x = x.to(self.device, dtype=self._dtype if cast else None, non_blocking=True)
        with torch.inference_mode():
            # Only CUDA ever sees autocast, so CPU runs never touch CUDA APIs.
            with torch.autocast("cuda", dtype=torch.float16) if self._autocast else contextlib.nullcontext():
                out = fn(x)
            out = F.normalize(out.float(), dim=-1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)

    def preprocess(self, image: Any) -> torch.Tensor:
        """RGB PIL image -> CPU float tensor [3, image_size, image_size] (the model's eval transform)."""
        return self._transform(image if image.mode == "RGB" else image.convert("RGB"))

    def encode_images(self, batch: Sequence[torch.Tensor]) -> np.ndarray:
        """preprocess() or decode_jpegs() outputs -> float32 [n, dim], L2-normalised rows."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        inputs = list(batch)
        if any(t.device.type != "cpu" for t in inputs):  # some decoded on the GPU already: gather them there
            inputs = [t.to(self.device, non_blocking=True) for t in inputs]
        # The cut tower (class token only in the last block) gives the same features with less work.
        tower = self.model.encode_image if self._image_tower is None else self._image_tower
        return self._run(tower, torch.stack(inputs), cast=True)

    def decodes_jpegs(self) -> bool:
        """Whether decode_jpegs() decodes on this model's device: CUDA with torchvision's nvJPEG decoder."""
        from clipsearch.encoders.gpu_jpeg import gpu_jpeg_decoding_available, transform_supported

        return gpu_jpeg_decoding_available(self.device) and transform_supported(self.model.visual.preprocess_cfg)

    def decode_jpegs(self, datas: Sequence[bytes], orientations: Sequence[int | None]) -> list[torch.Tensor | None]:
        """JPEG bytes -> model inputs on the model's device (None: that one must be decoded with Pillow)."""
        from clipsearch.encoders.gpu_jpeg import decode_jpegs, preprocess_on_device

        cfg = {**self.model.visual.preprocess_cfg, "size": self.image_size}
        out: list[torch.Tensor | None] = []
        with torch.inference_mode():
            # A few at a time: full-size photos take tens of MB each on the GPU until they are resized.
            for start in range(0, len(datas), _JPEGS_PER_DECODE):
                images = decode_jpegs(datas[start : start + _JPEGS_PER_DECODE],
                                      orientations[start : start + _JPEGS_PER_DECODE], self.device)
                out.extend(None if image is None else preprocess_on_device(image, cfg) for image in images)
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [n, dim], L2-normalised rows."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self._tokenizer(list(texts))
        # Token ids stay integers: only image inputs are cast to the model dtype.
        if self._text_tower is None:
            return self._run(self.model.encode_text, tokens, cast=False)
        # Cut on the CPU, before the transfer: the padding after the batch's last EOT cannot change the result.
        return self._run(self._text_tower.encode, tokens[:, : self._text_tower.cut_length(tokens)], cast=False)

    def warm_up(self) -> None:
        """Encode one short text and one blank image so the first real query pays no lazy initialisation."""
        # Kernel selection, allocator pools and (CUDA) context set-up happen on the first forward pass of each tower.
        self.encode_texts(["a photo"])
        self.encode_images([self.preprocess(Image.new("RGB", (self.image_size, self.image_size)))])
