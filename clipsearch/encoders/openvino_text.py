"""The text tower under OpenVINO: exported beside the image tower, fed by the torch-free CLIP tokenizer.

Why: a `clipsearch search` from the command line embeds one query. Through torch that process spends about
3.5 s importing torch and open_clip before the 10 ms of work; OpenVINO plus ClipTokenizer need neither, so a
cached text tower answers in well under a second. It also runs a short query about 1.8x faster than torch bf16
here (5.9 against 10.6 ms for ViT-B-32 on Zen 4).

Only open_clip's standard causal text tower is exported (find_causal_tower), with a dynamic batch and a dynamic
token length, so batches are cut after their last end-of-text token exactly as the torch path cuts them. The
export is checked against torch's full-context fp32 embeddings, and the tokenizer token for token against the
model's open_clip tokenizer, before it is kept; otherwise a marker sends later runs straight to torch.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipsearch.encoders import normalize_rows
from clipsearch.encoders.clip_tokenizer import PROBE_TEXTS, ClipTokenizer, matches_open_clip
from clipsearch.encoders import openvino as openvino_runtime
from clipsearch.encoders.openvino import IR_FORMAT, MAX_BATCH, ExportUnsupported

log = logging.getLogger(__name__)

TEXTS_PER_CALL = 256  # label prompt ensembles come by the thousand: bounded batches keep memory flat
MIN_TOKENS = 2  # start + end: the shortest row the tokenizer makes (an empty text)


def text_stem(key: str) -> str:
    """File stem of a model's exported text tower, beside its image tower `key`."""
    return f"{key}-text"


def export_text_tower(torch_encoder: Any, folder: Path, key: str) -> dict | None:
    """Export an fp32 OpenClipEncoder's text tower as IR beside the image tower; its metadata, or None if it can't.

    Never raises for the model: a tower or tokenizer this runtime does not reproduce leaves a marker (later runs
    use torch for texts), and a failed write only logs (the next run tries again).
    """
    stem = text_stem(key)
    started = time.perf_counter()
    try:
        meta, ov_model = _convert(torch_encoder)
    except Exception as e:  # noqa: BLE001 - exporters fail in many ways; each means "texts stay on torch"
        reason = str(e) if isinstance(e, ExportUnsupported) else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        openvino_runtime.mark_unsupported(folder, stem, reason, "text tower")
        return None
    try:
        openvino_runtime.save_ir(folder, stem, ov_model, meta)
    except Exception as e:  # noqa: BLE001 - a full or read-only disk: no verdict on the model, no marker
        log.warning("cannot write the exported text tower to %s (%s): texts use torch this time", folder,
                    e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:300])
        return None
    log.info("exported the text tower of %s to OpenVINO in %.1f s (once per model)", meta["model_id"],
             time.perf_counter() - started)
    return meta


def _convert(torch_encoder: Any) -> tuple[dict, Any]:
    """(metadata, OpenVINO model) of an fp32 encoder's causal text tower, checked against its full-context output."""
    import openvino as ov
    import torch
    from torch.export import Dim, export

    from clipsearch.encoders.text_cut import CausalTextTower, find_causal_tower

    tower, why = find_causal_tower(torch_encoder.model)
    if tower is None:
        raise ExportUnsupported(why)
    why = matches_open_clip(torch_encoder.tokenizer)
    if why:
        raise ExportUnsupported(why)
    context = int(torch_encoder.tokenizer.context_length)
    tokens = torch.from_numpy(ClipTokenizer(context)(PROBE_TEXTS))
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(torch_encoder.model.encode_text(tokens).float(), dim=-1).numpy()

    text_only = CausalTextTower(_text_parts(tower.owner), tower.pool_type, tower.eos_id)

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = text_only.owner  # registers the text weights as this module's own

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return text_only.encode(ids)

    short = tokens[:3]
    example = short[:, :tower.cut_length(short)].clone()  # contiguous: a view of the full rows would pin the length
    with torch.no_grad():
        exported = export(TextTower().eval(), (example,), dynamic_shapes=(
            {0: Dim("batch", min=1, max=MAX_BATCH), 1: Dim("tokens", min=MIN_TOKENS, max=context)},))
    ov_model = ov.convert_model(exported)
    del exported
    meta = {"format": IR_FORMAT, "model_id": torch_encoder.model_id, "dim": int(expected.shape[1]),
            "context_length": context, "pool_type": tower.pool_type, "eos_id": tower.eos_id}
    compiled = openvino_runtime.openvino_core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ids = tokens.numpy()
    agreement = 1.0
    # Cut batches of two lengths and single rows: what search (one query) and label prompts (many) send.
    for rows in (slice(0, 3), slice(0, len(ids)), *(slice(i, i + 1) for i in range(len(ids)))):
        batch = ids[rows]
        got = normalize_rows(np.asarray(compiled(batch[:, :cut_length(batch, meta)])[0], dtype=np.float32))
        agreement = min(agreement, float(np.min(np.sum(got * expected[rows], axis=1))))
    del compiled
    if not agreement >= openvino_runtime.EXPORT_AGREEMENT:
        raise ExportUnsupported(f"exported text tower disagrees with torch (cosine {agreement:.5f})")
    meta["export_agreement"] = agreement
    return meta, ov_model


def _text_parts(owner: Any) -> Any:
    """A module holding only what CausalTextTower.encode reads, so the export carries no image-tower weights."""
    import torch

    parts = torch.nn.Module()
    for name in ("token_embedding", "transformer", "ln_final", "positional_embedding", "text_projection"):
        setattr(parts, name, getattr(owner, name))
    parts.register_buffer("attn_mask", owner.attn_mask, persistent=False)
    return parts


def cut_length(tokens: np.ndarray, meta: dict) -> int:
    """Tokens this batch needs: its last pooled (end-of-text) position plus one, as text_cut decides for torch."""
    if meta["pool_type"] == "argmax":
        pooled = tokens.argmax(axis=1)
    else:
        pooled = (tokens == meta["eos_id"]).argmax(axis=1)
    return max(int(pooled.max()) + 1, MIN_TOKENS) if len(tokens) else tokens.shape[1]


def load_text_meta(folder: Path, key: str) -> dict | None:
    """The exported text tower's metadata; None when not exported yet; ExportUnsupported when it cannot be."""
    return openvino_runtime.load_meta(folder, text_stem(key))


class OpenVinoTextTower:
    """A compiled text tower and its tokenizer; encode() is thread-safe."""

    def __init__(self, folder: Path, key: str, meta: dict, precision: str):
        self.meta = meta
        self.dim = int(meta["dim"])
        started = time.perf_counter()
        with ThreadPoolExecutor(1, thread_name_prefix="clipsearch-tokenizer") as pool:
            # Reading the vocabulary is Python work (0.1 s) and compiling releases the GIL: both at once.
            tokenizer = pool.submit(ClipTokenizer, int(meta["context_length"]))
            self._compiled = openvino_runtime.compile_ir(folder / f"{text_stem(key)}.xml", precision)
            self._tokenizer = tokenizer.result()
        log.info("compiled the text tower of %s with OpenVINO for the CPU (%s) in %.2f s", meta["model_id"], precision,
                 time.perf_counter() - started)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: callers take turns, tokenising outside the lock

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [n, dim], L2-normalised rows."""
        parts = []
        for start in range(0, len(texts), TEXTS_PER_CALL):
            tokens = self._tokenizer(texts[start:start + TEXTS_PER_CALL])
            tokens = np.ascontiguousarray(tokens[:, :cut_length(tokens, self.meta)])
            with self._lock:  # infer() releases the GIL
                self._request.infer({0: tokens})
                parts.append(np.array(self._request.get_output_tensor(0).data, dtype=np.float32))
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalize_rows(np.concatenate(parts))
