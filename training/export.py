"""Export a trained model as an open_clip `local-dir:` folder: open_clip_config.json + open_clip_model.safetensors.

The layout is that of open_clip's Hugging Face repos (open_clip.push_to_hf_hub.save_for_hf), so the folder loads
with `open_clip.create_model_and_transforms("local-dir:OUT")`, with `clipsearch index --pretrained local-dir:OUT`,
and can be uploaded to the Hub as is. The folder is written next to its destination and renamed into place, and
checked against a skeleton that open_clip builds from the written config, so a reader never sees half an export
and a config that does not describe the weights is caught here rather than at load time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from clipsearch.errors import ClipsearchError
from clipsearch.training.distributed import unwrap_model

log = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ExportError", "export_open_clip_folder", "model_config_for",
           "preprocess_config_for"]

CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME, found first by local-dir:
_EXPORT_FILES = {CONFIG_NAME, WEIGHTS_NAME}


class ExportError(ClipsearchError):
    """The model cannot be written as an open_clip folder."""


def _open_clip():
    import open_clip

    from clipsearch.encoders.openclip import register_model_configs

    register_model_configs()  # so clipsearch-tiny (and any bundled config) resolves by name
    return open_clip


def _not_from_open_clip(record: logging.LogRecord) -> bool:
    return f"{os.sep}open_clip{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip():
    # open_clip logs through the root logger ("initialized randomly" for the skeleton built to check an export,
    # which would only confuse), and with no handler there its logging.warning() would run basicConfig().
    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard:
        root.addHandler(guard)
    root.addFilter(_not_from_open_clip)
    try:
        yield
    finally:
        root.removeFilter(_not_from_open_clip)
        if guard:
            root.removeHandler(guard)


def model_config_for(model: torch.nn.Module, model_name: str, model_cfg: dict | None = None) -> dict:
    """The open_clip model_cfg that rebuilds `model`: `model_cfg`, else open_clip's config for `model_name`.

    What open_clip can change at build time without writing it into any config (force_quick_gelu,
    force_custom_text, force_image_size, force_context_length) is read off the model itself.
    """
    open_clip = _open_clip()
    if model_cfg is None:
        try:
            found = open_clip.get_model_config(model_name.replace("/", "-") if ":" not in model_name else model_name)
        except Exception as e:  # noqa: BLE001 - an unreadable local-dir or an unreachable Hub repo
            raise ExportError(f"cannot read the config of model '{model_name}': {e}",
                              "pass model_cfg= (the dict the model was built from)") from e
        if found is None:
            raise ExportError(f"open_clip has no config for model '{model_name}'",
                              "pass model_cfg= (the dict the model was built from), or the open_clip model name")
        model_cfg = found
    cfg = copy.deepcopy(dict(model_cfg))
    model = unwrap_model(model)
    from open_clip.transformer import QuickGELU

    if any(isinstance(module, QuickGELU) for module in model.modules()):
        cfg["quick_gelu"] = True
    _record_forced_sizes(model, cfg)
    if isinstance(model, open_clip.CustomTextCLIP) and not cfg.get("custom_text") \
            and "hf_model_name" not in cfg.get("text_cfg", {}):
        cfg["custom_text"] = True
    # The towers' base weights were loaded (or not) at build time; the export holds every weight anyway.
    cfg.get("vision_cfg", {}).pop("timm_model_pretrained", None)
    cfg.get("text_cfg", {}).pop("hf_model_pretrained", None)
    return cfg


def _pair(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[-1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _record_forced_sizes(model: torch.nn.Module, cfg: dict) -> None:
    vision_cfg, text_cfg = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    size = getattr(getattr(model, "visual", None), "image_size", None)
    # timm towers take their size from timm's own config; open_clip's image_size only applies to its own towers.
    if size is not None and "timm_model_name" not in vision_cfg and "image_size" in vision_cfg:
        height, width = _pair(size)
        if (height, width) != _pair(vision_cfg["image_size"]):
            vision_cfg["image_size"] = height if height == width else [height, width]
    context_length = getattr(model, "context_length", None)
    if isinstance(context_length, int) and text_cfg and text_cfg.get("context_length", 77) != context_length:
        text_cfg["context_length"] = context_length


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def preprocess_config_for(model: torch.nn.Module, preprocess_cfg: dict | None = None) -> dict:
    """The model's own preprocess_cfg (size, mean, std, interpolation, resize, fill), `preprocess_cfg` on top."""
    from open_clip.transform import PreprocessCfg

    known = {f.name for f in fields(PreprocessCfg)}
    visual = getattr(unwrap_model(model), "visual", None)
    merged = dict(getattr(visual, "preprocess_cfg", None) or {})
    merged.update(preprocess_cfg or {})
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ExportError(f"unknown preprocess_cfg key(s) {', '.join(unknown)}",
                          f"open_clip knows {', '.join(sorted(known))}")
    return _jsonable({k: v for k, v in merged.items() if v is not None})


def _tensors_to_save(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    tensors, seen = {}, set()
    for name, tensor in unwrap_model(model).state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # safetensors refuses tensors that share memory (tied weights): each name gets its own copy.
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if key in seen:
            tensor = tensor.clone()
        elif key is not None:
            seen.add(key)
        tensors[name] = tensor.contiguous()
    return tensors


def _save_tokenizer(cfg: dict, model_name: str, tokenizer: Any, folder: Path) -> None:
    # open_clip's local-dir: loads a Hugging Face tokenizer from the folder itself; the default CLIP BPE tokenizer
    # is built in and needs nothing.
    if not cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        return
    if tokenizer is None:
        try:
            tokenizer = _open_clip().get_tokenizer(model_name)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"model '{model_name}' uses a Hugging Face tokenizer that cannot be loaded here: {e}",
                              "pass tokenizer= (the tokenizer used for training)") from e
    if not hasattr(tokenizer, "save_pretrained"):
        raise ExportError(f"model '{model_name}' needs its Hugging Face tokenizer files in the export, but "
                          f"{type(tokenizer).__name__} cannot save them",
                          "pass the open_clip HFTokenizer used in training")
    tokenizer.save_pretrained(str(folder))


def _check_loadable(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Build the model open_clip would build from the folder (on the meta device: no memory) and compare shapes."""
    open_clip = _open_clip()
    try:
        with _quiet_open_clip(), torch.device("meta"):
            skeleton = open_clip.create_model(f"local-dir:{folder}", load_weights=False, device="meta",
                                              pretrained_image=False, pretrained_text=False)
    except Exception as e:  # noqa: BLE001 - e.g. a Hugging Face text tower whose config needs the Hub
        log.warning("could not check the export in %s against open_clip (%s); it was written unchecked", folder, e)
        return
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    saved = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != saved:
        missing = sorted(set(expected) - set(saved))[:3]
        extra = sorted(set(saved) - set(expected))[:3]
        reshaped = [n for n in sorted(set(saved) & set(expected)) if saved[n] != expected[n]][:3]
        raise ExportError(
            "the model config does not describe the model's weights "
            f"(missing {missing or 'none'}, unexpected {extra or 'none'}, other shapes {reshaped or 'none'})",
            "pass model_cfg= with the exact config the model was built from (including any force_* overrides)")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_folder(staged: Path, out_dir: Path) -> None:
    """Move the staged export to out_dir, replacing an earlier export there."""
    if not out_dir.exists():
        os.replace(staged, out_dir)
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder", "choose another export folder")
    foreign = [p.name for p in out_dir.iterdir() if p.name not in _EXPORT_FILES] \
        if not (out_dir / CONFIG_NAME).is_file() else []
    if foreign:
        raise ExportError(f"{out_dir} already holds other files ({', '.join(sorted(foreign)[:3])}) and no export",
                          "export into a new or empty folder (an earlier export there is replaced)")
    previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, previous / "export")  # out_dir is missing only between these two renames
    try:
        os.replace(staged, out_dir)
    except OSError:
        os.replace(previous / "export", out_dir)  # put the earlier export back (kept in `previous` if this fails)
        shutil.rmtree(previous, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open a folder for this (and needs no such step).
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def export_open_clip_folder(model: torch.nn.Module, model_name: str, out_dir: str | os.PathLike, *,
                            model_cfg: dict | None = None, preprocess_cfg: dict | None = None,
                            tokenizer: Any = None, dtype: torch.dtype | None = None,
                            info: dict | None = None) -> Path:
    """Write `model` as an open_clip local-dir folder at `out_dir` (replacing an earlier export) and return its path.

    model_name: the open_clip name (or hf-hub:/local-dir: reference) the model was built from, for its config
    unless `model_cfg` is given; preprocess_cfg: overrides of the model's own; tokenizer: saved into the folder when
    the model uses a Hugging Face tokenizer; dtype: cast floating weights (e.g. torch.float16 halves the file);
    info: JSON-able provenance stored under "clipsearch" in the config (open_clip ignores it).
    """
    out_dir = Path(out_dir).expanduser().absolute()
    cfg = model_config_for(model, model_name, model_cfg)
    config = {"model_cfg": cfg, "preprocess_cfg": preprocess_config_for(model, preprocess_cfg)}
    if info:
        config["clipsearch"] = {"source_model": model_name, **_jsonable(dict(info))}
    tensors = _tensors_to_save(model, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        from safetensors.torch import save_file

        (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
        save_file(tensors, str(staged / WEIGHTS_NAME), metadata={"format": "pt"})
        _save_tokenizer(cfg, model_name, tokenizer, staged)
        _check_loadable(staged, tensors)
        for path in staged.iterdir():
            if path.is_file():
                _fsync(path)
        os.chmod(staged, 0o755)  # mkdtemp makes it private; an export is meant to be shared
        _replace_folder(staged, out_dir)
        _fsync_folder(out_dir.parent)
    except OSError as e:
        raise ExportError(f"cannot write the export to {out_dir}: {e}",
                          "check that the folder is writable and the disk has room") from e
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    log.info("exported %s (%d tensors) to %s", model_name, len(tensors), out_dir)
    return out_dir
