"""Data-parallel plumbing: join the process group torchrun describes (gloo on CPU, nccl on CUDA) and small helpers.

A plain `python` run is a world of one: every helper then returns its input without touching torch.distributed,
so the training loop calls them unconditionally.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from clipsearch.errors import ClipsearchError, ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "DistributedError",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "current",
    "init_distributed",
    "shutdown_distributed",
    "unwrap_model",
]

_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # a rank that is slow to load data must not be declared dead


class DistributedError(ClipsearchError):
    """The process group cannot be set up from this environment."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and the torch device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs, evaluates and writes checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


_current = DistInfo()


def current() -> DistInfo:
    """The DistInfo of the last init_distributed() (a world of one before it)."""
    return _current


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as e:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer",
                               "launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK itself") from e


def _device_for(device: str, local_rank: int, world_size: int) -> str:
    from clipsearch.encoders import resolve_device

    name = (device or "auto").strip().lower()
    if name == "auto" and world_size > 1 and not torch.cuda.is_available():
        name = "cpu"  # gloo moves CPU tensors: a multi-process run without CUDA trains on the CPU, never on MPS
    resolved = resolve_device(name)  # ConfigError, with a hint, for a device this machine lacks
    if resolved.startswith("cuda"):
        if world_size > 1:
            # One GPU per process, chosen by the rank on this node (as open_clip_train does).
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()})",
                    "start at most one process per GPU: torchrun --nproc-per-node=<number of GPUs>")
            resolved = f"cuda:{local_rank}"
        elif resolved == "cuda":
            resolved = f"cuda:{torch.cuda.current_device()}"
        torch.cuda.set_device(resolved)
    elif resolved == "mps" and world_size > 1:
        raise ConfigError("distributed training on MPS is not supported", "use device cpu (gloo) under torchrun")
    return resolved


def init_distributed(device: str = "auto", *, backend: str | None = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Join torchrun's process group (RANK/WORLD_SIZE/LOCAL_RANK + MASTER_ADDR/PORT) or return a world of one.

    The backend is nccl for CUDA devices and gloo otherwise (CPU data-parallel training works with gloo).
    An already initialised process group is reused, so a caller that set one up itself keeps it.
    """
    global _current
    import torch.distributed as dist

    world_size = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    if world_size <= 1:
        _current = DistInfo(0, 1, 0, _device_for(device, 0, 1))
        return _current
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE is {world_size} but this build of torch has no torch.distributed",
                               "install a torch build with distributed support, or run a single process")
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = _device_for(device, local_rank, world_size)
    if not dist.is_initialized():
        missing = [name for name in _ENV_VARS if not os.environ.get(name)]
        if missing:
            raise DistributedError(
                f"WORLD_SIZE is {world_size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set",
                "launch with torchrun (e.g. torchrun --nproc-per-node=2 -m clipsearch train ...), which sets them all")
        chosen = backend or ("nccl" if resolved.startswith("cuda") else "gloo")
        try:
            dist.init_process_group(backend=chosen, init_method="env://", timeout=timeout,
                                    **({"device_id": torch.device(resolved)} if chosen == "nccl" else {}))
        except Exception as e:  # noqa: BLE001 - rendezvous failures come as many exception types
            raise DistributedError(
                f"cannot join the {chosen} process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {e}",
                "check that every rank was started with the same MASTER_ADDR/MASTER_PORT and that the port is free",
            ) from e
    _current = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, resolved)
    log.info("rank %d of %d (local rank %d) on %s, backend %s", _current.rank, _current.world_size,
             local_rank, resolved, dist.get_backend())
    return _current


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown_distributed() -> None:
    """Leave the process group (no-op when there is none), so the process exits without a warning."""
    global _current
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = DistInfo(device=_current.device)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    # nccl only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device(_current.device if _current.device.startswith("cuda") else "cuda")
    return torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    """The mean of `value` over all ranks (the value itself in a world of one)."""
    if not _active():
        return float(value)
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def barrier() -> None:
    """Wait until every rank gets here (no-op in a world of one)."""
    if _active():
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[_collective_device().index or 0])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (the object itself in a world of one)."""
    if not _active():
        return obj
    import torch.distributed as dist

    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src, device=_collective_device())
    return holder[0]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
