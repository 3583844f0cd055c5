"""A cache of built open_clip models, so later processes start fast.

Building a model the usual way initialises every weight randomly, then parses the checkpoint over them
(ViT-B-32: about 0.8 s of init plus the checkpoint read, and a Hub lookup for tags). The cache keeps every
parameter and buffer of the built model, already converted to the precision it runs in, in one safetensors
file; a later load builds the structure on PyTorch's meta device (no init, no memory) and assigns the tensors
to it, so neither the init nor the conversion is paid again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from clipsearch.encoders import remove_abandoned

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: metadata says whether the image class-token cut was verified


def cache_key(kind: str, model: str, pretrained: str | None, quick_gelu: bool) -> str | None:
    """A key naming exactly what was built, or None for sources that are not cached (hub and local-dir)."""
    if kind not in ("tag", "file", "random"):
        return None
    identity: dict[str, Any] = {
        "format": CACHE_FORMAT, "open_clip": open_clip.__version__, "torch": torch.__version__.split("+")[0],
        "kind": kind, "model": model, "pretrained": pretrained, "quick_gelu": quick_gelu,
    }
    if kind == "file":
        stat = os.stat(pretrained)  # a replaced weights file must not load stale tensors
        identity["file"] = [os.path.realpath(pretrained), stat.st_size, stat.st_mtime_ns]
    if kind == "random":
        identity["seed"] = 0
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return f"{model.replace('/', '-')}-{digest}"


def load_built(folder: Path, key: str, model: str, quick_gelu: bool):
    """(model, preprocess, metadata) from the cache, or None when absent or unusable (then build normally)."""
    path = folder / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata())
        preprocess_cfg = json.loads(metadata.pop("preprocess_cfg"))
        tensors = load_file(str(path))
        with torch.device("meta"):  # allocate nothing and skip the random init: every tensor comes from the file
            built = open_clip.create_model(model, pretrained=None, device="meta", force_quick_gelu=quick_gelu)
        _assign(built, tensors)
        leftover = [name for name, t in (*built.named_parameters(), *built.named_buffers()) if t.is_meta]
        if leftover:
            raise ValueError(f"tensors missing from the cache: {leftover[:3]}")
        open_clip.set_model_preprocess_cfg(built, preprocess_cfg)
        preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    except Exception as e:  # a damaged or foreign cache file only costs a normal build
        log.info("ignoring cached model %s (%s)", path, e)
        return None
    return built, preprocess, metadata


def save_built(folder: Path, key: str, built: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write the built model atomically; a failure (full disk, read-only cache) only loses the speed-up."""
    try:
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous() for name, t in _named_tensors(built)}
        metadata = {**(metadata or {}), "preprocess_cfg": json.dumps(built.visual.preprocess_cfg)}
        folder.mkdir(parents=True, exist_ok=True)
        remove_abandoned(folder, "*.tmp")  # temp files of saves killed mid-write
        fd, tmp = tempfile.mkstemp(prefix=key, suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, folder / f"{key}.safetensors")
        finally:
            Path(tmp).unlink(missing_ok=True)
    except Exception as e:
        log.info("could not cache the built model in %s (%s)", folder, e)


def _named_tensors(module: torch.nn.Module):
    # Non-persistent buffers (e.g. the text tower's causal mask) are not in state_dict() but must be cached:
    # on the meta device they would otherwise stay empty.
    yield from module.named_parameters()
    yield from module.named_buffers()


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=owner._parameters[attr].requires_grad)
        elif attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            raise ValueError(f"unexpected tensor {name}")
