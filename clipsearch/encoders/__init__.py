"""Image/text encoders: the Encoder interface, model identity, and loading (open_clip or a registered factory).

Nothing here imports torch or open_clip at import time: `clipsearch --help` must stay fast.
"""

from __future__ import annotations

import abc
import functools
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from clipsearch.errors import ClipsearchError, ConfigError

if TYPE_CHECKING:  # only for annotations; importing these for real would pull in torch
    import numpy as np
    from PIL import Image

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
RANDOM_WEIGHTS = ("", "none", "random")
WEIGHTS_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")
DEVICES = ("auto", "cpu", "cuda", "mps")
RUNTIMES = ("auto", "torch", "openvino")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags with bf16 matmul instructions

__all__ = [
    "Encoder",
    "EncoderSpec",
    "built_model_folder",
    "cpu_has_native_bf16",
    "encoder_spec_from_settings",
    "is_random_weights",
    "load_encoder",
    "model_id_for",
    "register_encoder",
    "resolve_device",
]


class Encoder(abc.ABC):
    """A model that maps images and texts into one L2-normalised embedding space."""

    model_id: str  # stable identity stored with every vector (see model_id_for)
    dim: int  # embedding dimension
    image_size: int  # side length preprocess() produces (lets the loader use JPEG draft decoding)
    device: str  # resolved device: 'cpu', 'cuda' or 'mps'

    @abc.abstractmethod
    def preprocess(self, image: "Image.Image") -> Any:
        """Turn one RGB PIL image into one model input ([3,H,W] CPU tensor or array); thread-safe, no model access."""

    @abc.abstractmethod
    def encode_images(self, batch: Sequence[Any]) -> "np.ndarray":
        """Encode preprocess() outputs into float32 [n, dim] L2-normalised rows ((0, dim) for none)."""

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> "np.ndarray":
        """Encode texts into float32 [n, dim] L2-normalised rows ((0, dim) for none)."""

    def warm_up(self) -> None:
        """Run one tiny text and image encode so the first real query pays no lazy initialisation (default: no-op)."""

    def prepare_images(self) -> None:
        """Load now what encode_images loads on first use, if anything (default: nothing to do)."""

    def decodes_jpegs(self) -> bool:
        """Whether decode_jpegs() decodes JPEGs where the model runs (a CUDA model with torchvision; default: no)."""
        return False

    def decode_jpegs(self, datas: Sequence[bytes], orientations: Sequence[int | None]) -> list[Any]:
        """JPEG bytes -> model inputs for encode_images, decoded on the model's device; None for one it can't decode."""
        raise NotImplementedError("this encoder decodes no JPEGs itself: check decodes_jpegs() first")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'model_id', '?')!r}, device={getattr(self, 'device', '?')!r})"


@dataclass(frozen=True)
class EncoderSpec:
    """What to load: model name, pretrained tag/file/none, device, precision, weights cache folder, runtime.

    runtime: torch (open_clip for both towers), openvino (both towers compiled by OpenVINO on the CPU, texts on
    torch where the text tower cannot be exported), or auto (OpenVINO where it is installed and the work runs on
    an x86-64 CPU). The commands pass the runtime setting; the default here is torch for other callers.
    """

    model: str
    pretrained: str
    device: str = "auto"
    precision: str = "auto"
    cache_dir: Path | None = None
    runtime: str = "torch"


def is_random_weights(pretrained: str | None) -> bool:
    """Whether `pretrained` asks for random (untrained) weights: none, random or empty."""
    return pretrained is None or pretrained.strip().lower() in RANDOM_WEIGHTS


def looks_like_path(pretrained: str) -> bool:
    """Whether `pretrained` names a file rather than a tag (exists, has a weights suffix or a path separator)."""
    if Path(pretrained).expanduser().exists():
        return True
    if pretrained.lower().endswith(WEIGHTS_SUFFIXES):
        return True
    return any(sep in pretrained for sep in ("/", "\\")) or pretrained.startswith(("~", "."))


def _absolute(path: str) -> Path:
    # resolve() so the same file reached via different relative paths/symlinks gets one identity
    return Path(path).expanduser().resolve()


def split_reference(model: str, pretrained: str) -> tuple[str, str]:
    """(model, pretrained) with an `hf-hub:`/`local-dir:` reference given as --pretrained moved to the model."""
    if (pretrained or "").strip().startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return pretrained.strip(), ""
    return model, pretrained


def model_id_for(model: str, pretrained: str) -> str:
    """The identity of (model, pretrained) without loading anything.

    `{model}/{tag lower-cased}`, `{model}/random` for none, `{model}/file:{absolute path}` for a weights
    file; for `hf-hub:`/`local-dir:` models the model string alone (local-dir path made absolute).
    A `pretrained` that is an existing directory stands for `local-dir:` that directory.
    """
    model, pretrained = split_reference(model, pretrained)
    if model.startswith(HF_HUB_PREFIX):
        return model
    if model.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + str(_absolute(model[len(LOCAL_DIR_PREFIX):]))
    if is_random_weights(pretrained):
        return f"{model}/random"
    pretrained = pretrained.strip()
    if Path(pretrained).expanduser().is_dir():
        return LOCAL_DIR_PREFIX + str(_absolute(pretrained))
    if looks_like_path(pretrained):
        return f"{model}/file:{_absolute(pretrained)}"
    return f"{model}/{pretrained.lower()}"


_REGISTRY: dict[str, Callable[[EncoderSpec], Encoder]] = {}
_REGISTRY_LOCK = threading.Lock()


def register_encoder(prefix: str, factory: Callable[[EncoderSpec], Encoder]) -> None:
    """Build model names starting with `prefix` with `factory` instead of open_clip (re-registering replaces)."""
    if not prefix:
        raise ValueError("an encoder prefix must not be empty (it would capture every model)")
    with _REGISTRY_LOCK:
        _REGISTRY[prefix] = factory


def unregister_encoder(prefix: str) -> None:
    """Remove a registered prefix (no error when absent)."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(prefix, None)


def load_encoder(spec: EncoderSpec) -> Encoder:
    """Load the encoder a spec names: a registered factory by prefix (longest wins), else open_clip."""
    with _REGISTRY_LOCK:
        matches = sorted((p for p in _REGISTRY if spec.model.startswith(p)), key=len, reverse=True)
        factory = _REGISTRY[matches[0]] if matches else None
    if factory is not None:
        log.debug("model %s built by the encoder registered for %r", spec.model, matches[0])
        return factory(spec)
    from clipsearch.encoders.openvino import ExportUnsupported, OpenVinoEncoder, choose_runtime, insists_on_openvino
    from clipsearch.encoders.openvino import openvino_failed

    if choose_runtime(spec) == "openvino":
        explicit = insists_on_openvino(spec)  # else auto: fall back to torch
        try:
            return OpenVinoEncoder(spec)
        except ExportUnsupported as e:
            if explicit:
                raise ConfigError(f"model {spec.model} cannot run under OpenVINO ({e})",
                                  "use --runtime auto or torch for this model") from e
            log.info("model %s runs on torch: its image tower cannot run under OpenVINO (%s)", spec.model, e)
        except ClipsearchError:
            raise  # the model itself is wrong or missing: torch would say the same
        except Exception as e:  # noqa: BLE001 - OpenVINO itself failed (an unsupported CPU, a broken install)
            if explicit:
                raise openvino_failed(spec, e) from e
            log.warning("OpenVINO could not run model %s (%s): using torch", spec.model, e)
    from clipsearch.encoders.openclip import OpenClipEncoder  # heavy: torch + open_clip

    return OpenClipEncoder(spec)


def encoder_spec_from_settings(settings: Any, runtime: str = "torch") -> EncoderSpec:
    """The EncoderSpec that resolved Settings describe (runtime: settings.runtime for indexing work)."""
    return EncoderSpec(
        model=settings.model,
        pretrained=settings.pretrained,
        device=settings.device,
        precision=settings.precision,
        cache_dir=settings.model_cache_dir,
        runtime=runtime,
    )


def built_model_folder(cache_dir: str | Path | None) -> Path:
    """Where built and exported models are kept: <model cache dir>/clipsearch-built, else the user's cache dir."""
    if cache_dir:
        return Path(cache_dir) / "clipsearch-built"
    import platformdirs

    return Path(platformdirs.user_cache_dir("clipsearch", appauthor=False)) / "built-models"


def normalize_rows(rows: Any) -> "np.ndarray":
    """Rows as float32 divided by their L2 norm (at least 1e-12, as torch's F.normalize)."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.float32(1e-12))


def warn_random_weights(model: str, pretrained: str) -> None:
    """Say, once per load, that a model has random weights (results meaningless)."""
    log.warning("model %s has RANDOM weights (pretrained=%s): search results will be meaningless; use them only "
                "for tests and benchmarks", model, pretrained)


def remove_abandoned(folder: Path, pattern: str, older_than_s: float = 3600) -> None:
    """Delete files or folders matching `pattern` in `folder` older than an hour: writes a killed process left."""
    cutoff = time.time() - older_than_s
    for leftover in folder.glob(pattern):
        try:
            if leftover.stat().st_mtime >= cutoff:
                continue  # perhaps another process's work in progress
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink()
        except OSError:
            pass


def cpu_flags_have_native_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text lists a CPU flag for native bf16 matmuls (avx512_bf16 or amx_bf16)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # x86 only: other architectures have no such line and count as not native
            return any(flag in value.split() for flag in NATIVE_BF16_FLAGS)
    return False


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (Linux x86 with avx512_bf16/amx_bf16); False elsewhere."""
    # Without these instructions bf16 is emulated and slower than fp32, so macOS, ARM and older x86 say no.
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_flags_have_native_bf16(f.read())
    except OSError:
        return False


def gpu_may_be_present() -> bool:
    """Whether a GPU torch could use may be here (NVIDIA or AMD device nodes, nvidia-smi, macOS), without importing torch."""
    # Cheap checks only: the callers decide things before (or instead of) paying torch's import.
    if sys.platform == "darwin":
        return True  # Apple MPS
    if any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
        return True
    return shutil.which("nvidia-smi") is not None


def model_may_run_on_gpu(device: str) -> bool:
    """Whether a model loaded for `device` (auto, cpu, cuda[:N], mps) will probably run on a GPU."""
    name = (device or "auto").strip().lower()
    return name.startswith("cuda") or name == "mps" or (name == "auto" and gpu_may_be_present())


def resolve_device(device: str) -> str:
    """'auto' -> cuda, else mps, else cpu; an explicit device that is not available raises ConfigError."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{device}' was asked for but CUDA is not available here",
                "use --device cpu (or auto); for a GPU install a CUDA build of torch and check `nvidia-smi`",
            )
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(
                f"device '{device}' does not exist (this machine has {torch.cuda.device_count()} CUDA device(s))",
                "use --device cuda (the first GPU) or cuda:N with N below the device count",
            )
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                "device 'mps' was asked for but Apple MPS is not available here",
                "use --device cpu (or auto); MPS needs Apple silicon and a macOS build of torch",
            )
        return "mps"
    raise ConfigError(f"unknown device '{device}'", f"use one of {', '.join(DEVICES)}")
