"""Optimiser, learning-rate schedule and tower locking, as open_clip_train sets them up (main.py, scheduler.py)."""

from __future__ import annotations

import logging
import math

import torch

from clipsearch.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["build_optimizer", "build_scheduler", "lock_towers", "lr_factor", "no_weight_decay"]


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Whether a parameter is a gain, bias, norm weight or the temperature (open_clip_train's exclusion rule)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: no weight decay on gains, biases and the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("every parameter is frozen: nothing to train",
                          "unlock a tower (lock_image/lock_text false) or some of its layers (…_unlocked_groups/layers)")
    log.info("optimiser: AdamW over %d tensors (%d without weight decay), %s trainable parameters",
             len(decay) + len(no_decay), len(no_decay), f"{sum(p.numel() for p in decay + no_decay):,}")
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str = "cosine") -> float:
    """The learning rate at optimiser step `step` (0-based) as a fraction of the peak (open_clip's cosine_lr/const_lr)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "const":
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


class _Schedule:
    """A picklable lr lambda (LambdaLR saves callable objects' state in its state_dict)."""

    def __init__(self, warmup: int, total: int, schedule: str):
        self.warmup, self.total, self.schedule = warmup, total, schedule

    def __call__(self, step: int) -> float:
        return lr_factor(step, warmup=self.warmup, total=self.total, schedule=self.schedule)


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total_steps: int,
                    schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 0 (or constant); call .step() after each optimiser step."""
    warmup = min(warmup, max(0, total_steps - 1))  # a warm-up longer than the run would never reach the peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(warmup, total_steps, schedule))


def lock_towers(model: torch.nn.Module, *, lock_image: bool = False, image_unlocked_groups: int = 0,
                freeze_bn_stats: bool = False, lock_text: bool = False, text_unlocked_layers: int = 0,
                freeze_layer_norm: bool = True) -> None:
    """LiT-style locking: freeze the image and/or text tower except the last unlocked groups/layers (open_clip's own)."""
    if lock_image:
        if not hasattr(model, "lock_image_tower"):
            raise ConfigError(f"{type(model).__name__} cannot lock its image tower", "leave lock_image false")
        model.lock_image_tower(unlocked_groups=image_unlocked_groups, freeze_bn_stats=freeze_bn_stats)
    if lock_text:
        if not hasattr(model, "lock_text_tower"):
            raise ConfigError(f"{type(model).__name__} cannot lock its text tower", "leave lock_text false")
        try:
            model.lock_text_tower(unlocked_layers=text_unlocked_layers, freeze_layer_norm=freeze_layer_norm)
        except AssertionError as e:  # open_clip's built-in text tower always freezes its LayerNorms
            raise ConfigError(f"this model's text tower cannot be locked that way: {e}",
                              "set lock_text_freeze_layer_norm = true") from e
    if lock_image or lock_text:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("locked towers: %s of %s parameters stay trainable", f"{trainable:,}", f"{total:,}")
