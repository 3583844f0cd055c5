"""Contrastive objectives: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss, single-process or across ranks.

Numerically the same as open_clip's `ClipLoss` and `SigLipLoss` on the same features (tests hold us to it), with
open_clip's distributed scheme for InfoNCE: every rank gathers the whole global batch's features, optionally
keeping their gradients (`gather_with_grad`), and either scores the full global logit matrix or only its own rows
(`local_loss`, O(n·N) instead of O(N²) memory). Two things differ from open_clip on purpose:

- a `logit_bias` is added once to each direction (open_clip adds it twice when one direction is a transposed view);
- the single-process and global InfoNCE compute one logit matrix and use its transpose (one matmul, not two).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipsearch.training.distributed import unwrap_model

__all__ = ["LOSS_KINDS", "ContrastiveLoss", "clamp_logit_scale_", "gather_features"]

LOSS_KINDS = ("infonce", "siglip")


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, *, local_loss: bool,
                    gather_with_grad: bool, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's features concatenated in rank order ([N, d] each, N = world_size × local batch).

    With `gather_with_grad` the gathered rows stay in the autograd graph (their gradients flow back to the rank
    that produced them, summed over ranks); without it only this rank's own rows carry gradients, and not even
    those when `local_loss` (which then uses the local features directly), as in open_clip.
    """
    if world_size <= 1:
        return image_features, text_features
    import torch.distributed as dist
    import torch.distributed.nn as dist_nn

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"gather_features for world_size {world_size} needs an initialised process group "
                           "(call clipsearch.training.distributed.init_distributed() first, under torchrun)")
    if gather_with_grad:
        return torch.cat(dist_nn.all_gather(image_features), dim=0), torch.cat(dist_nn.all_gather(text_features), dim=0)
    gathered_images = [torch.empty_like(image_features) for _ in range(world_size)]
    gathered_texts = [torch.empty_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_images, image_features.contiguous())
    dist.all_gather(gathered_texts, text_features.contiguous())
    if not local_loss:
        # Put this rank's own (graph-connected) features back so its rows still receive gradients.
        gathered_images[rank] = image_features
        gathered_texts[rank] = text_features
    return torch.cat(gathered_images, dim=0), torch.cat(gathered_texts, dim=0)


class ContrastiveLoss(torch.nn.Module):
    """CLIP InfoNCE (`infonce`) or SigLIP sigmoid (`siglip`) loss over L2-normalised image and text features."""

    def __init__(self, kind: str = "infonce", *, local_loss: bool = False, gather_with_grad: bool = True,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}: use one of {', '.join(LOSS_KINDS)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within a world of size {world_size}")
        self.kind = kind
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self._labels: dict[tuple[torch.device, int], torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"rank={self.rank}, world_size={self.world_size}")

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar loss; `logit_scale` is the exp'd temperature the model returns, `logit_bias` SigLIP's bias."""
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must pair up row by row")
        if self.kind == "siglip":
            return self._siglip(image_features, text_features, logit_scale, logit_bias)
        return self._infonce(image_features, text_features, logit_scale, logit_bias)

    def _targets(self, device: torch.device, n: int, offset: int) -> torch.Tensor:
        # Cached per (device, size): a fixed batch size makes this one allocation for the whole run.
        key = (device, n)
        if key not in self._labels:
            self._labels[key] = torch.arange(n, device=device, dtype=torch.long)
        labels = self._labels[key]
        return labels + offset if offset else labels

    def _infonce(self, image_features, text_features, logit_scale, logit_bias):
        local_rows = self.world_size > 1 and self.local_loss
        if self.world_size > 1:
            all_images, all_texts = gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size)
        else:
            all_images, all_texts = image_features, text_features
        if local_rows:
            # This rank's rows only: its images against every text, its texts against every image.
            logits_per_image = logit_scale * image_features @ all_texts.T
            logits_per_text = logit_scale * text_features @ all_images.T
        else:
            logits_per_image = logit_scale * all_images @ all_texts.T
            logits_per_text = logits_per_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        offset = self.rank * logits_per_image.shape[0] if local_rows else 0
        labels = self._targets(logits_per_image.device, logits_per_image.shape[0], offset)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def _siglip(self, image_features, text_features, logit_scale, logit_bias):
        # Each rank scores its own images against every rank's texts (positives on its diagonal block) and divides
        # by its local batch: the mean over ranks is then the single-process loss on the global batch. The texts
        # are always gathered with gradients, as open_clip's neighbour exchange does; `local_loss` is moot here.
        n = image_features.shape[0]
        if self.world_size > 1:
            _, texts = gather_features(image_features, text_features, local_loss=True, gather_with_grad=True,
                                       rank=self.rank, world_size=self.world_size)
        else:
            texts = text_features
        logits = logit_scale * image_features @ texts.T
        if logit_bias is not None:
            logits = logits + logit_bias
        signs = -torch.ones_like(logits)
        columns = torch.arange(n, device=logits.device) + self.rank * n
        signs[torch.arange(n, device=logits.device), columns] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


@torch.no_grad()
def clamp_logit_scale_(model: torch.nn.Module, max_scale: float = 100.0) -> None:
    """Clamp the model's log temperature to [0, ln max_scale] in place (after each optimiser step, as CLIP does)."""
    if max_scale < 1:
        raise ValueError(f"max_scale must be at least 1 (a logit scale below 1 is never wanted), got {max_scale}")
    scale = getattr(unwrap_model(model), "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        raise AttributeError(f"{type(unwrap_model(model)).__name__} has no logit_scale parameter to clamp")
    scale.clamp_(0, math.log(max_scale))
