"""Training checkpoints for exact resume: weights, optimiser, scheduler, scaler, step, data position and RNG states.

Files are RUN/checkpoints/step-NNNNNNNN.pt, written to a temporary name, flushed and renamed, so a crash mid-write
never leaves a truncated checkpoint under the real name; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipsearch.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "capture_rng", "checkpoint_path", "find_checkpoint", "list_checkpoints", "load_checkpoint",
           "restore_rng", "run_dir_of", "save_checkpoint"]

CHECKPOINTS_DIR = "checkpoints"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def capture_rng() -> dict[str, Any]:
    """This process's random states: Python, NumPy, torch CPU and (when present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back states from capture_rng."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A loaded checkpoint; `rng` holds one capture_rng() per data-parallel rank."""

    path: Path
    step: int
    epoch: int
    batch: int  # next micro-batch of `epoch` to read
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: list[dict[str, Any]]
    config: dict[str, Any]
    extra: dict[str, Any]


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives in a run folder."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of a run folder's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: str | Path, *, step: int, epoch: int, batch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any | None, rng: list[dict[str, Any]],
                    config: dict[str, Any], keep_last: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of `step` atomically, then delete all but the newest `keep_last`."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "batch": batch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "config": config,
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    log.info("checkpoint: %s", path)
    return path


def find_checkpoint(resume: str, output: str | Path) -> Path:
    """The checkpoint `resume` names: a .pt file, a run folder (its newest), or "latest" (newest run under output)."""
    if resume == "latest":
        runs = [p for p in Path(output).glob("*") if p.is_dir() and list_checkpoints(p)]
        if not runs:
            raise ConfigError(f"no run under {output} has a checkpoint to resume",
                              "start a fresh run, or give --resume RUN_FOLDER or a checkpoint file")
        newest = max(runs, key=lambda p: list_checkpoints(p)[-1][1].stat().st_mtime)
        return list_checkpoints(newest)[-1][1]
    path = Path(resume).expanduser()
    if path.is_dir():
        found = list_checkpoints(path.parent if path.name == CHECKPOINTS_DIR else path)
        if not found:
            raise ConfigError(f"{path} holds no checkpoints ({CHECKPOINTS_DIR}/step-*.pt)",
                              "give a run folder written by clipsearch train, or a checkpoint file")
        return found[-1][1]
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist", "give a checkpoint file, a run folder, or 'latest'")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint (on the CPU)."""
    path = Path(path)
    try:
        # weights_only=False: optimiser/RNG states hold Python objects; only load checkpoints you wrote
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"cannot read the checkpoint {path}: {e}", "resume from an older checkpoint of the run") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not a clipsearch training checkpoint",
                          "to start from plain model weights, pass them as `pretrained` instead")
    return Checkpoint(path=path, step=payload["step"], epoch=payload["epoch"], batch=payload["batch"],
                      model=payload["model"], optimizer=payload["optimizer"], scheduler=payload["scheduler"],
                      scaler=payload["scaler"], rng=payload["rng"], config=payload["config"], extra=payload["extra"])


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint file belongs to."""
    path = Path(checkpoint).resolve()
    return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
