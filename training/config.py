"""TrainConfig: every setting of a training run in one frozen dataclass, loaded from TOML with `key=value` overrides.

A run folder holds the resolved config (`config.toml`, loadable again with `--config`, and `config.json`), so every
run can be repeated or resumed from what it wrote down.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from clipsearch.errors import ConfigError
from clipsearch.training.data import DataSpec

__all__ = ["EvalSetSpec", "TrainConfig", "config_to_dict", "load_config", "merge_settings", "parse_overrides",
           "save_config"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSSES = ("infonce", "siglip")
SCHEDULES = ("cosine", "const")


@dataclass(frozen=True)
class EvalSetSpec:
    """A labelled (zero-shot) or captioned (retrieval) image folder in `clipsearch eval`'s layout."""

    images_dir: str
    labels_csv: str | None = None  # relative_path,label -> zero-shot top-1/top-5
    captions_csv: str | None = None  # relative_path,caption -> text<->image recall@k
    classes_file: str | None = None
    templates_file: str | None = None
    name: str | None = None  # shown in logs and plots; default: the folder's name
    limit: int | None = None  # at most this many images (None: TrainConfig.eval_limit)

    def __post_init__(self):
        if (self.labels_csv is None) == (self.captions_csv is None):
            raise ConfigError(f"eval set {self.images_dir!r} needs exactly one of labels_csv or captions_csv",
                              "labels_csv for zero-shot classification, captions_csv for retrieval")

    @property
    def label(self) -> str:
        """The set's name in logs: `name`, else the images folder's name."""
        return self.name or Path(self.images_dir).name or "eval"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `train(config)` writes a run folder under `output`."""

    # model: any open_clip architecture, from scratch ("" = random init) or from pretrained weights
    model: str = "clipsearch-tiny"
    pretrained: str = ""  # tag (e.g. laion2b_s34b_b79k), weights file, hf-hub:org/repo or local-dir:/path
    cache_dir: str | None = None
    # data
    data: DataSpec | None = None
    holdout: float = 0.0  # held out of `data` for eval: a fraction (< 1) or a number of samples (>= 1)
    eval_sets: tuple[EvalSetSpec, ...] = ()  # extra eval sets (e.g. a reference set for the WiSE-FT trade-off)
    eval_limit: int = 1000  # images per eval set, keeps periodic evals quick (0: all)
    workers: int = 2  # DataLoader worker processes (0: decode in the training process)
    # optimisation (open_clip_train's defaults for ViTs)
    batch_size: int = 64  # global micro-batch, split over data-parallel ranks
    accum_steps: int = 1  # micro-batches per optimiser step (contrastive-correct: features cached, as open_clip)
    epochs: int = 1
    steps: int | None = None  # optimiser steps; overrides epochs when set
    lr: float = 5e-4
    weight_decay: float = 0.2  # not applied to gains, biases, embeddings' 1-d params or the temperature
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 100  # linear warm-up steps (capped at the run's length)
    schedule: str = "cosine"  # cosine | const (after warm-up)
    grad_clip: float | None = None  # max global grad norm
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    grad_checkpointing: bool = False
    loss: str = "infonce"  # infonce (CLIP) | siglip
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # adapting pretrained weights
    lock_image: bool = False  # LiT: freeze the image tower...
    lock_image_unlocked_groups: int = 0  # ...except its last N layer groups
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    wise_ft_alpha: float | None = None  # export interpolate(original, fine-tuned, alpha) instead of the fine-tuned weights
    wise_ft_sweep: tuple[float, ...] = ()  # evaluate these alphas on the eval sets and report the trade-off
    # run folder, logging, checkpoints
    output: str = "runs"
    name: str | None = None  # run folder name under output (default: date-time and model)
    eval_every: int = 0  # steps between evals (0: only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # checkpoints kept
    log_every: int = 1  # steps between CSV/TensorBoard rows
    resume: str | None = None  # a checkpoint file, a run folder (its latest checkpoint), or "latest" (newest run in output)
    export: bool = True  # write RUN/export (open_clip local-dir format) at the end
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = True  # TensorBoard event files when tensorboard is installed

    def __post_init__(self):
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("batch_size", "accum_steps", "epochs", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("warmup", "eval_limit", "eval_every", "checkpoint_every", "workers", "lock_image_unlocked_groups",
                     "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be at least 1, not {self.steps}", "leave it out to train for `epochs`")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, not {self.lr}")
        if self.weight_decay < 0 or self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0 (or left out)")
        if self.holdout < 0 or (self.holdout >= 1 and self.holdout != int(self.holdout)):
            raise ConfigError(f"holdout {self.holdout} is neither a fraction below 1 nor a whole number of samples")
        for alpha in ((self.wise_ft_alpha,) if self.wise_ft_alpha is not None else ()) + tuple(self.wise_ft_sweep):
            if not 0.0 <= alpha <= 1.0:
                raise ConfigError(f"WiSE-FT alpha {alpha} is outside [0, 1]",
                                  "0 keeps the original weights, 1 the fine-tuned ones")

    @property
    def total_batch(self) -> int:
        """Samples per optimiser step over all ranks."""
        return self.batch_size * self.accum_steps

    def resolved(self) -> "TrainConfig":
        """The same config with every path made absolute (what a run folder records)."""

        def absolute(path: str | None) -> str | None:
            return None if path in (None, "") or ":" in path.split("/")[0] else os.path.abspath(os.path.expanduser(path))

        data = self.data
        if data is not None:
            data = dataclasses.replace(data, path=absolute(data.path), classes_file=absolute(data.classes_file))
        eval_sets = tuple(
            dataclasses.replace(s, **{k: absolute(getattr(s, k)) for k in
                                      ("images_dir", "labels_csv", "captions_csv", "classes_file", "templates_file")})
            for s in self.eval_sets
        )
        pretrained = self.pretrained
        if pretrained and Path(pretrained).expanduser().exists():
            pretrained = os.path.abspath(os.path.expanduser(pretrained))
        resume = self.resume if self.resume in (None, "latest") else absolute(self.resume)
        return dataclasses.replace(self, data=data, eval_sets=eval_sets, pretrained=pretrained, output=absolute(self.output),
                                   cache_dir=absolute(self.cache_dir), resume=resume)


def _check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


# --- building from plain data (TOML tables, overrides) -------------------------------------------------------------

def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3)
    return ConfigError(f"unknown setting '{where}{key}'",
                       (f"did you mean {', '.join(close)}? " if close else "") + f"known: {', '.join(names)}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (from TOML or an override) as the field type `hint`, or a ConfigError naming the setting."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, Iterable):
            value = [value]
        item = args[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, str) and hint is DataSpec:
            return DataSpec(path=value)  # `data = "train.csv"` is shorthand for a table with just the path
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table of settings, not {value!r}")
        return _build(hint, value, where + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a whole number, not {value!r}") from None
        if number != int(number):
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        return int(number)
    if hint is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return str(value)
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(cls, key, prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (e.g. an eval set's images_dir) is missing
        raise ConfigError(f"incomplete settings {prefix.rstrip('.') or cls.__name__}: {e}") from e


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """`["lr=1e-3", "data.path=x.csv"]` as a nested dict; values read as TOML (strings may go unquoted)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE", "e.g. --set lr=1e-4 --set data.path=train.csv")
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word or a path
        target = nested
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {pair!r} sets a key inside {part!r}, which is not a table")
        target[parts[-1]] = value
    return nested


def merge_settings(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` on top, tables merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_settings(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """A TrainConfig from a TOML file (or the defaults) with `key=value` (dotted for tables) overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read the training config {path}: {e}", "give a TOML file, see `clipsearch train --help`") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}", "fix the line it names") from e
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return _build(TrainConfig, merge_settings(values, extra))


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a plain dict (e.g. config_to_dict's output or a checkpoint's copy)."""
    return _build(TrainConfig, values)


# --- saving ---------------------------------------------------------------------------------------------------------

def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON/TOML-ready data; None values are left out (the defaults are None again on load)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                    if getattr(value, f.name) is not None}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(config: TrainConfig) -> str:
    """The config as TOML that load_config reads back to an equal TrainConfig."""
    values = config_to_dict(config)
    lines = ["# resolved training config, written by clipsearch train; reuse with --config"]
    tables = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif key == "eval_sets":
            continue
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for spec in values.get("eval_sets", []):
        lines += ["", "[[eval_sets]]"] + [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
    return "\n".join(lines) + "\n"


def save_config(config: TrainConfig, run_dir: str | Path) -> Path:
    """Write run_dir/config.toml and run_dir/config.json (atomically); returns the TOML path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("config.toml", config_to_toml(config)),
                       ("config.json", json.dumps(config_to_dict(config), indent=2) + "\n")):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, run_dir / name)
    return run_dir / "config.toml"
