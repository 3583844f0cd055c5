"""Training and adapting CLIP encoders (`clipsearch train`): `train(TrainConfig) -> run folder`.

Attributes load on first use, so `import clipsearch.training` stays cheap (torch comes in with `train`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipsearch.training.config import EvalSetSpec, TrainConfig, load_config
    from clipsearch.training.loop import train

__all__ = ["EvalSetSpec", "TrainConfig", "load_config", "train"]

_WHERE = {"train": "loop", "TrainConfig": "config", "EvalSetSpec": "config", "load_config": "config"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"clipsearch.training.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clipsearch.training' has no attribute {name!r}")
