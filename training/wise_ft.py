"""WiSE-FT (Wortsman et al., 2022): interpolate fine-tuned and original weights to keep robustness while adapting.

θ(α) = (1 − α)·θ_original + α·θ_finetuned, tensor by tensor. α = 0 and α = 1 return the endpoint tensors
bit for bit (a computed blend would turn -0.0 into 0.0 and is not guaranteed exact); integer and boolean buffers
(counters, masks), which cannot be blended, come from the nearer endpoint.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Iterable, Mapping

import torch

from clipsearch.errors import ConfigError
from clipsearch.training.distributed import unwrap_model

log = logging.getLogger(__name__)

__all__ = ["interpolate_weights", "wise_ft_sweep"]


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"WiSE-FT alpha must be between 0 and 1, got {alpha}",
                          "0 keeps the original weights, 1 the fine-tuned ones; 0.5 is the paper's usual choice")
    return alpha


def _check_compatible(original: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> None:
    if original.keys() != finetuned.keys():
        only_original = sorted(set(original) - set(finetuned))[:3]
        only_finetuned = sorted(set(finetuned) - set(original))[:3]
        raise ConfigError(
            "the original and fine-tuned weights name different tensors "
            f"(only in original: {only_original or 'none'}; only in fine-tuned: {only_finetuned or 'none'})",
            "interpolate two checkpoints of the same architecture (the fine-tuned run's starting model and its result)")
    for name, tensor in original.items():
        if tuple(tensor.shape) != tuple(finetuned[name].shape):
            raise ConfigError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the original weights but "
                f"{tuple(finetuned[name].shape)} in the fine-tuned ones",
                "interpolate two checkpoints of the same architecture and image/text sizes")


def interpolate_weights(original: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """A new state dict (1 − α)·original + α·finetuned; α = 0 and 1 give exact copies of the endpoints."""
    alpha = _check_alpha(alpha)
    _check_compatible(original, finetuned)
    blended: dict[str, torch.Tensor] = {}
    for name, start in original.items():
        end = finetuned[name]
        if alpha == 0.0:
            blended[name] = start.detach().clone()
        elif alpha == 1.0:
            blended[name] = end.detach().clone()
        elif start.is_floating_point() or start.is_complex():
            # Blend in at least fp32 so bf16/fp16 weights lose nothing beyond the final rounding.
            work = torch.promote_types(start.dtype, torch.float32)
            mixed = torch.lerp(start.detach().to(work), end.detach().to(device=start.device, dtype=work), alpha)
            blended[name] = mixed.to(start.dtype)
        else:
            blended[name] = (start if alpha < 0.5 else end).detach().clone()
    return blended


def _state(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # No copies: the sweep only reads these, and loads each blend into its own copy of the model.
    if isinstance(model, Mapping):
        return {name: tensor.detach() for name, tensor in model.items()}
    return {name: tensor.detach() for name, tensor in unwrap_model(model).state_dict().items()}


def wise_ft_sweep(original_model: torch.nn.Module | Mapping[str, torch.Tensor], finetuned_model: torch.nn.Module,
                  alphas: Iterable[float], evaluate: Callable[[torch.nn.Module], Mapping[str, Any]]) -> list[dict]:
    """Evaluate the interpolated model at each α: rows {"alpha": α, **evaluate(model)} in the order given.

    `original_model` may be a module or a state dict; the models passed in are left unchanged (a copy of the
    fine-tuned model is loaded with each blend and handed to `evaluate`).
    """
    alphas = [_check_alpha(alpha) for alpha in alphas]
    if not alphas:
        raise ConfigError("a WiSE-FT sweep needs at least one alpha", "e.g. alphas 0, 0.25, 0.5, 0.75, 1")
    theta_0, theta_1 = _state(original_model), _state(finetuned_model)
    _check_compatible(theta_0, theta_1)
    work = copy.deepcopy(unwrap_model(finetuned_model))
    rows = []
    for alpha in alphas:
        work.load_state_dict(interpolate_weights(theta_0, theta_1, alpha))
        metrics = dict(evaluate(work))
        if "alpha" in metrics:
            raise ValueError("evaluate() must not return a metric named 'alpha' (it names the row's blend)")
        log.info("WiSE-FT alpha %.3g: %s", alpha, metrics)
        rows.append({"alpha": alpha, **metrics})
    return rows
