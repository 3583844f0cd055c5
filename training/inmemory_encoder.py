"""ModelEncoder: the clipsearch Encoder interface around a live (training) model, for evaluation during training.

clipsearch.search.evaluation.evaluate_zeroshot / evaluate_retrieval take any Encoder, so scoring a model mid-run
uses exactly the code of `clipsearch eval`. Encoding switches the model to eval mode for the call only and puts
every submodule's train/eval flag back afterwards (a locked tower may be kept in eval mode on purpose).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipsearch.encoders import Encoder
from clipsearch.training.distributed import unwrap_model

__all__ = ["ModelEncoder"]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class ModelEncoder(Encoder):
    """Encode with a model being trained: its eval transform, its tokenizer, on its device, without gradients."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: str | torch.device = "cpu",
                 model_id: str = "training", *, autocast_dtype: torch.dtype | None = None):
        # DDP's forward would wait for the other ranks: evaluation (often on rank 0 only) runs the bare model.
        self.model = unwrap_model(model)
        self._transform = preprocess
        self._tokenizer = tokenizer
        self.device = str(device)
        self.model_id = model_id
        self._autocast_dtype = autocast_dtype
        visual = getattr(self.model, "visual", None)
        size = (getattr(visual, "preprocess_cfg", None) or {}).get("size") or getattr(visual, "image_size", 224)
        self.image_size = int(max(size) if isinstance(size, (tuple, list)) else size)
        self.dim = int(getattr(visual, "output_dim", 0) or self._probe_dim())

    @classmethod
    def for_open_clip(cls, model: torch.nn.Module, model_name: str, device: str | torch.device = "cpu",
                      model_id: str = "training", *, tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                      autocast_dtype: torch.dtype | None = None) -> "ModelEncoder":
        """A ModelEncoder with the eval transform of the model's preprocess_cfg and (default) open_clip's tokenizer."""
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from clipsearch.encoders.openclip import register_model_configs

        register_model_configs()
        bare = unwrap_model(model)
        transform = image_transform_v2(PreprocessCfg(**bare.visual.preprocess_cfg), is_train=False)
        return cls(model, transform, tokenizer or open_clip.get_tokenizer(model_name), device, model_id,
                   autocast_dtype=autocast_dtype)

    def _input_dtype(self) -> torch.dtype:
        # A model converted to bf16/fp16 wants inputs of its own dtype; under autocast fp32 inputs are right.
        parameter = next(self.model.parameters(), None)
        return parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        device_type = torch.device(self.device).type
        autocast = (torch.autocast(device_type, dtype=self._autocast_dtype) if self._autocast_dtype is not None
                    else contextlib.nullcontext())
        with _eval_mode(self.model), torch.inference_mode(), autocast:
            out = fn(x)
        out = F.normalize(out.float(), dim=-1)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)

    def _probe_dim(self) -> int:
        # Some towers (timm, HF) do not expose output_dim: ask the model once.
        blank = torch.zeros(1, 3, self.image_size, self.image_size, dtype=self._input_dtype())
        return int(self._run(self.model.encode_image, blank).shape[1])

    def preprocess(self, image: Any) -> torch.Tensor:
        """RGB PIL image -> CPU float tensor [3, H, W] (the model's eval transform)."""
        return self._transform(image if image.mode == "RGB" else image.convert("RGB"))

    def encode_images(self, batch: Sequence[torch.Tensor]) -> np.ndarray:
        """preprocess() outputs -> float32 [n, dim], L2-normalised rows."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(self.model.encode_image, torch.stack(list(batch)).to(self._input_dtype()))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [n, dim], L2-normalised rows."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(self.model.encode_text, self._tokenizer(list(texts)))
