"""Exact image-token cut: the last block of a class-token-pooled ViT computes the class token only.

A CLIP ViT that pools its class token (open_clip's pool_type 'tok', no attentional pooler) reads nothing of
its last transformer block but the class token's row. That block still needs keys and values from every
token, but its query, output projection and MLP serve that one row: for ViT-B-32, 49 of the 50 rows of the
last block are wasted, about 7% of the tower's work. This module recognises open_clip's standard tower, runs
the last block for the class token alone, and verifies the result against the full tower at load time.
"""

from __future__ import annotations

import logging

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer

log = logging.getLogger(__name__)

VERIFY_TOLERANCE = 1e-5  # max abs difference of the L2-normalised embeddings, fp32
_STANDARD_ENCODE_IMAGE = (open_clip.CLIP.encode_image, open_clip.CustomTextCLIP.encode_image)


class ClassTokenImageTower(torch.nn.Module):
    """open_clip's standard ViT image tower, with its last block computing the class token only."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        self.visual = visual  # shared, not copied: a later .to(device/dtype) of the model is seen here

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features [n, dim] of preprocessed images [n, 3, H, W] (what visual(images) returns)."""
        # Mirrors VisionTransformer.forward with pool_type 'tok' (checked in find_class_token_tower), except
        # that the last ResidualAttentionBlock.forward runs with the class token as its only query.
        v = self.visual
        x = v._embeds(images)
        *blocks, last = v.transformer.resblocks
        for block in blocks:
            x = block(x)
        keys = last.ln_1(x)
        attended = last.attn(keys[:, :1], keys, keys, need_weights=False)[0]
        cls = x[:, :1] + last.ls_1(attended)
        cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
        pooled = v.ln_post(cls[:, 0])  # per-token norm: the same whether before or after pooling
        return pooled @ v.proj if v.proj is not None else pooled


def find_class_token_tower(model: torch.nn.Module) -> tuple[ClassTokenImageTower | None, str]:
    """The model's image tower, cut, if it is open_clip's standard class-token ViT (else None), and why not."""
    # Only the exact code ClassTokenImageTower mirrors: a subclass or a timm / Hugging Face tower may compute
    # anything, and a custom block (scaled cosine attention, qk norm) has another forward.
    if type(model).encode_image not in _STANDARD_ENCODE_IMAGE:
        return None, f"image tower of {type(model).__name__} is not called the standard way"
    visual = model.visual
    if type(visual) is not VisionTransformer:
        return None, f"image tower is a {type(visual).__name__}, not open_clip's ViT"
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.output_tokens:
        return None, "image tower does not pool its class token alone"
    transformer = visual.transformer
    if type(transformer) is not Transformer or not transformer.batch_first or len(transformer.resblocks) < 1:
        return None, "image transformer is not open_clip's standard batch-first transformer"
    last = transformer.resblocks[-1]
    if type(last) is not ResidualAttentionBlock or hasattr(last, "ln_1_kv"):
        return None, f"last image block is a {type(last).__name__}, not the standard self-attention block"
    if not isinstance(last.attn, torch.nn.MultiheadAttention) or not last.attn.batch_first:
        return None, "last image block's attention is not batch-first nn.MultiheadAttention"
    return ClassTokenImageTower(visual), ""


def plan_image_cut(model: torch.nn.Module, image_size: int) -> ClassTokenImageTower | None:
    """The cut tower to run images with, or None to keep the full tower; call on the fp32 CPU model."""
    tower, why = find_class_token_tower(model)
    if tower is None:
        log.debug("image class-token cut off: %s", why)
        return None
    try:
        generator = torch.Generator().manual_seed(0)
        probe = torch.rand(2, 3, image_size, image_size, generator=generator) * 4 - 2  # about normalised pixels
        with torch.inference_mode():
            full = F.normalize(model.encode_image(probe).float(), dim=-1)
            cut = F.normalize(tower(probe).float(), dim=-1)
        diff = float((full - cut).abs().max())
    except Exception as e:  # noqa: BLE001 - any surprise means "not the tower we mirror": keep the full tower
        log.warning("image class-token cut off: verifying it failed (%s: %s)", type(e).__name__, e)
        return None
    if not diff < VERIFY_TOLERANCE:  # also refuses NaN
        log.warning("image class-token cut off: it differs from the full tower by %.2g on a probe", diff)
        return None
    log.debug("image class-token cut on (max diff %.2g)", diff)
    return tower
