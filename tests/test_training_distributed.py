"""Data-parallel training: 2 gloo processes on the CPU match one process with the same global batch.

Each rank sees half of every global batch; features are gathered across ranks so the loss covers the whole batch,
and DDP averages the gradients: losses, gradients and weights must equal the single-process run's.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from clipsearch.training import train
from clipsearch.training.checkpoints import checkpoint_path, load_checkpoint
from tests.training_fixtures import colour_captions, tiny_config, train_rows

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, jobs) -> None:
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    for port, config in jobs:  # several runs per spawn: starting processes costs more than these tiny runs
        # what torchrun would set for each process
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        train(config)


def _config(data: Path, output: Path, name: str, **overrides):
    settings = dict(steps=STEPS, batch_size=8, checkpoint_every=1, keep_last=STEPS, export=False)
    return tiny_config(data, output, name, **{**settings, **overrides})


def test_two_gloo_ranks_match_one_process(tmp_path):
    """Plain steps, and accumulation (cached features, DDP no_sync on all but the last micro-batch)."""
    data = colour_captions(tmp_path / "data", per_colour=4)
    variants = {"plain": {}, "accum": {"accum_steps": 2, "batch_size": 4}}
    jobs = [(_free_port(), _config(data, tmp_path, f"ddp-{name}", **extra)) for name, extra in variants.items()]
    mp.spawn(_rank_main, args=(2, jobs), nprocs=2, join=True)
    for name, extra in variants.items():
        _compare(train(_config(data, tmp_path, f"single-{name}", **extra)), tmp_path / f"ddp-{name}", data, tmp_path)


def _compare(single: Path, ddp: Path, data: Path, tmp_path: Path) -> None:
    one, two = train_rows(single), train_rows(ddp)
    assert [r["step"] for r in two] == [str(s) for s in range(1, STEPS + 1)]
    for a, b in zip(one, two):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-6)
        assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-4)
        assert b["lr"] == a["lr"]
    # gradients of the first step: AdamW's first moment after one step is (1 - beta1) * gradient
    first_one, first_two = load_checkpoint(checkpoint_path(single, 1)), load_checkpoint(checkpoint_path(ddp, 1))
    assert len(first_two.rng) == 2  # each rank's random state is saved for an exact resume
    for key, moments in first_one.optimizer["state"].items():
        # float sums run in another order over two ranks: allow 1e-4 of the tensor's largest entry
        scale = float(moments["exp_avg"].abs().max())
        torch.testing.assert_close(first_two.optimizer["state"][key]["exp_avg"], moments["exp_avg"], rtol=1e-4,
                                   atol=1e-4 * scale)
    last_one, last_two = load_checkpoint(checkpoint_path(single, STEPS)), load_checkpoint(checkpoint_path(ddp, STEPS))
    assert last_one.model.keys() == last_two.model.keys()  # saved without DDP's "module." prefix
    # AdamW divides by sqrt(v) + eps: where a gradient is ~0 its rounding noise moves a weight by a sizeable part
    # of lr, so weights get a tolerance of 5% of one step's largest update (wrong gradients move them by ~lr)
    lr = tiny_config(data, tmp_path, "x").lr
    for key, weight in last_one.model.items():
        torch.testing.assert_close(last_two.model[key], weight, rtol=1e-4, atol=0.05 * lr)
