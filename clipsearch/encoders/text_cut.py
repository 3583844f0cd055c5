"""Exact text-token cut: run a causal CLIP text tower only up to the last position it pools from.

open_clip pads every query to the full context (77 tokens) and its encode_text adds the full-size
positional embedding and causal mask, so it refuses a shorter batch. For the standard causal tower the
output pooled at the EOT position depends only on the tokens up to it, so the padding after the batch's
last EOT is wasted work (about 3x for one short query). This module recognises that tower, runs it on a
cut batch with the positional embedding and mask sliced to match, and verifies the cut at load time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool

log = logging.getLogger(__name__)

# Pool types whose pooled position is found from the tokens themselves (the EOT token), so a cut that keeps
# it is exact. 'last' pools the final position (padding in a full-context batch) and 'first'/'none' suit
# bidirectional towers: those never get the cut.
EXACT_POOL_TYPES = ("argmax", "eos")
VERIFY_TOLERANCE = 1e-5  # max abs difference of the L2-normalised embeddings, fp32
# Two probes of different lengths, so the cut batch also holds padding after the shorter one's EOT.
PROBE_TEXTS = ("a photo", "a long description of a red bicycle leaning against a brick wall at night in the rain")


@dataclass(frozen=True)
class CausalTextTower:
    """open_clip's standard causal text tower, run on a batch cut after its last pooled (EOT) position."""

    owner: torch.nn.Module  # holds token_embedding, positional_embedding, transformer, attn_mask, ln_final, ...
    pool_type: str
    eos_id: int | None

    def cut_length(self, tokens: torch.Tensor) -> int:
        """Tokens needed for this batch: the last position the tower pools from, plus one."""
        # The same rule text_global_pool uses, so the kept prefix always holds the pooled position (for open_clip's
        # tokenizer: the EOT token, the largest id in each row).
        if self.pool_type == "argmax":
            pooled = tokens.argmax(dim=-1)
        else:
            pooled = (tokens == self.eos_id).int().argmax(dim=-1)
        return int(pooled.max()) + 1 if tokens.numel() else tokens.shape[-1]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features of a (possibly cut) token batch [n, L], L <= context length."""
        # Mirrors open_clip's CLIP.encode_text / TextTransformer.forward (no CLS token, no pad mask: checked in
        # find_causal_tower), except that the positional embedding and causal mask are sliced to L.
        # Attributes are read on every call so a later .to(device/dtype) of the model is always seen.
        # index_select rather than [:L] slices: torch.export (the OpenVINO text export) specialises a slice that may
        # span the whole tensor, and would refuse a dynamic length reaching the full context.
        m = self.owner
        kept = torch.arange(tokens.shape[1], device=tokens.device)
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)
        x = x + m.positional_embedding.index_select(0, kept).to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask.index_select(0, kept).index_select(1, kept))
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x


def _is_causal_mask(mask: Any) -> bool:
    """Whether `mask` is open_clip's additive causal mask: -inf strictly above the diagonal, 0 elsewhere."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    mask = mask.float()
    return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())


def find_causal_tower(model: torch.nn.Module) -> tuple[CausalTextTower | None, str]:
    """The model's text tower if it is open_clip's standard causal one (else None), and why not."""
    # Only the exact encode_text/forward code that CausalTextTower.encode mirrors: a subclass (CoCa, ...) or
    # a Hugging Face / timm tower may compute anything.
    if type(model).encode_text is open_clip.CLIP.encode_text:
        owner, pool_type, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif type(model).encode_text is open_clip.CustomTextCLIP.encode_text and type(model.text) is TextTransformer:
        owner, pool_type, eos_id = model.text, model.text.pool_type, model.text.eos_id
        if owner.cls_emb is not None or owner.use_pad_mask or owner.output_tokens:
            return None, "text tower has a CLS token, a padding mask or token outputs"
    else:
        return None, f"text tower of {type(model).__name__} is not open_clip's standard transformer"
    if not _is_causal_mask(getattr(owner, "attn_mask", None)):
        return None, "text tower is not causal (no causal attention mask)"
    if pool_type not in EXACT_POOL_TYPES:
        return None, f"text tower pools '{pool_type}', not at the EOT token"
    if owner.positional_embedding.shape[0] != owner.attn_mask.shape[0]:
        return None, "text positional embedding and attention mask differ in length"
    return CausalTextTower(owner, pool_type, eos_id), ""


def plan_text_cut(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                  device: str) -> CausalTextTower | None:
    """The tower to run cut batches with, or None to keep the full context; call on the fp32 model."""
    tower, why = find_causal_tower(model)
    if tower is None:
        log.debug("text truncation off: %s", why)
        return None
    try:
        tokens = tokenizer(list(PROBE_TEXTS))
        length = tower.cut_length(tokens)
        with torch.inference_mode():
            tokens = tokens.to(device)
            full = F.normalize(model.encode_text(tokens).float(), dim=-1)
            cut = F.normalize(tower.encode(tokens[:, :length]).float(), dim=-1)
        diff = float((full - cut).abs().max())
    except Exception as e:  # noqa: BLE001 - any surprise means "not the tower we mirror": keep the full context
        log.warning("text truncation off: verifying it failed (%s: %s)", type(e).__name__, e)
        return None
    if not diff < VERIFY_TOLERANCE:  # also refuses NaN
        log.warning("text truncation off: cut and full-context embeddings differ by %.2g on a probe", diff)
        return None
    log.debug("text truncation on (probe cut to %d of %d tokens, max diff %.2g)", length, tokens.shape[1], diff)
    return tower
