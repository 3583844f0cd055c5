"""Build the model to train: any open_clip architecture from scratch or pretrained, with its transforms and tokenizer.

Weight sources are resolved exactly as `clipsearch index` resolves them (tag, weights file, hf-hub:, local-dir:,
none), so offline machines fail fast with the same messages; then open_clip builds the model with its training
transform (augmentation) as well as the evaluation one.
"""

from __future__ import annotations

import logging
import math

import torch

from clipsearch.encoders import EncoderSpec, cpu_has_native_bf16
from clipsearch.encoders import openclip as core
from clipsearch.errors import ConfigError, WeightsUnavailableError

log = logging.getLogger(__name__)

__all__ = ["build_model", "precision_plan"]


def build_model(config, device: torch.device):
    """(model in fp32 on `device`, train transform, eval transform, tokenizer) for config.model/pretrained."""
    import open_clip

    core.register_model_configs()
    spec = EncoderSpec(model=config.model, pretrained=config.pretrained or "none", device=device.type,
                       cache_dir=config.cache_dir)
    source = core._resolve_source(spec)
    siglip = config.loss == "siglip"
    # SigLIP starts from t=10, b=-10 (open_clip_train does the same for --siglip); only for a fresh model, since
    # pretrained weights bring their own scale (and a bias is added below when they lack one)
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip and source.kind == "random" else {}
    with core._LOAD_LOCK:
        offline = core._offline_reason() if source.kind in ("tag", "hf-hub") else ""
        with core._hub_offline(bool(offline)), core._no_implicit_root_handler():
            core._fetch_weights(source, config.cache_dir, offline)
            try:
                model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                    source.model, pretrained=source.pretrained, device=device, precision="fp32", output_dict=True,
                    cache_dir=config.cache_dir, force_quick_gelu=core._quick_gelu(source), **kwargs)
                tokenizer = open_clip.get_tokenizer(source.model, cache_dir=config.cache_dir)
            except Exception as e:  # noqa: BLE001 - a bad file or folder must not surface as a traceback
                if source.kind == "random":
                    raise
                raise WeightsUnavailableError(
                    f"cannot load weights {source.pretrained or source.model} for model '{config.model}': "
                    + core._short(e), "check that the model matches the weights, or download them again") from e
    if siglip and getattr(model, "logit_bias", None) is None:
        model.logit_bias = torch.nn.Parameter(torch.full([], -10.0, device=device))
    if source.kind == "random":
        log.info("training %s from scratch (random initial weights)", source.model)
    else:
        log.info("adapting %s from %s weights %s", source.model, source.kind, source.pretrained or source.model)
    return model, preprocess_train, preprocess_val, tokenizer


def precision_plan(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed) for a precision name on a device.

    auto: bf16 on GPUs that have it and on CPUs with native bf16 instructions, fp16 + loss scaling on older GPUs,
    else fp32. An explicit bf16 on a GPU without it falls back to fp16 with scaling.
    """
    kind = device.type
    if precision == "fp32" or kind not in ("cpu", "cuda"):
        if precision not in ("fp32", "auto"):
            log.warning("precision %s is not supported on %s; training in fp32", precision, kind)
        return None, False
    cuda_bf16 = kind == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if kind == "cuda":
            return (torch.bfloat16, False) if cuda_bf16 else (torch.float16, True)
        return (torch.bfloat16, False) if cpu_has_native_bf16() else (None, False)
    if precision == "bf16":
        if kind == "cuda" and not cuda_bf16:
            log.warning("this GPU has no bf16: using fp16 autocast with loss scaling instead")
            return torch.float16, True
        return torch.bfloat16, False
    if precision == "fp16":
        return torch.float16, True
    raise ConfigError(f"unknown precision {precision!r}", "use auto, fp32, bf16 or fp16")
